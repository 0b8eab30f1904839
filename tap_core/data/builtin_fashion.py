"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or any folder of idx files).

60k train / 10k test 28x28 grayscale images of 10 clothing classes. Targets:
``label`` (classification, class names below) and ``reconstruct``
(image_generation). The partition key is the class (``label``) for both.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

from tap_core.config import TaskSpec
from tap_core.data.block import DataBlock
from tap_core.data.images import from_array
from tap_core.data.source import RawData, RawSplit, check_provides

KEYS = ("path", "target")
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TARGET_KINDS = {"label": "classification", "reconstruct": "image_generation"}
INSTALL = "apt-get install dataset-fashion-mnist, or set path: to a folder with the four idx files"


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=4)
def load_split(images_path: Path, labels_path: Path, _mtime: float) -> tuple[np.ndarray, list[str]]:
    """(uint8 images (N, 28, 28), class names); memoised per file and modification time."""
    images = _read_idx(images_path, 0x00000803)
    labels = _read_idx(labels_path, 0x00000801)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, [CLASSES[int(i)] for i in labels]


def read(block: DataBlock, task: TaskSpec, needs: frozenset) -> RawData:
    folder = block.path("path", required=False, kind="folder", default=DEFAULT_DIR)
    target = block.choice(
        "target", tuple(TARGET_KINDS), default="label" if task.kind == "classification" else "reconstruct"
    )
    if TARGET_KINDS[target] != task.kind:
        raise block.error(
            "target",
            f"target {target!r} is for {TARGET_KINDS[target]} tasks, but this task is {task.kind}",
            "use label for classification or reconstruct for image_generation",
        )
    provided = {"images", "labels"} if target == "label" else {"images"}
    check_provides(
        block,
        "target",
        f"fashion_mnist target {target!r}",
        provided,
        needs,
        "Fashion-MNIST has only images and class labels: use modalities [image]",
    )
    splits = {}
    for name, (image_stem, label_stem) in FILES.items():
        images_path, labels_path = _find(folder, image_stem), _find(folder, label_stem)
        if images_path is None or labels_path is None:
            missing = image_stem if images_path is None else label_stem
            raise block.error(
                "path" if "path" in block else "format",
                f"Fashion-MNIST file {missing}(.gz) not found in {folder}",
                INSTALL,
            )
        try:
            images, labels = load_split(images_path, labels_path, images_path.stat().st_mtime)
        except (OSError, ValueError, EOFError) as exc:
            raise block.error(
                "path" if "path" in block else "format", f"cannot read Fashion-MNIST: {exc}", INSTALL
            ) from exc
        splits[name] = RawSplit(
            n=len(images),
            labels=labels,
            images=from_array(images),
        )
    return RawData(train=splits["train"], test=splits["test"], default_key="label", label_field="target")
