"""Images: lazy sources that decode only the rows a task keeps, as uint8 (k, 3, S, S).

Arrays are normalised from (N,H,W), (N,H,W,C) or (N,C,H,W), uint8 or float in
[0, 1]; grayscale is repeated to RGB and alpha dropped; resizing is bilinear
with antialiasing (torch for arrays, PIL for files), straight to a square.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tap_core.errors import DataError

Loader = Callable[[np.ndarray, int], np.ndarray]  # (row indices, size) -> uint8 (k, 3, S, S)
ErrorFactory = Callable[[str, str | None], DataError]  # (problem, fix) -> error naming the field

_CHUNK = 256  # images resized per torch call (bounds float memory at large S)


@dataclass
class LazyImages:
    """N images that are decoded and resized only when ``load`` is asked for rows."""

    n: int
    load: Loader

    def subset(self, rows: np.ndarray) -> "LazyImages":
        rows = np.asarray(rows, dtype=np.int64)
        base = self.load
        return LazyImages(len(rows), lambda idx, size: base(rows[np.asarray(idx, dtype=np.int64)], size))


def empty(size: int) -> np.ndarray:
    return np.zeros((0, 3, size, size), dtype=np.uint8)


def layout(shape: tuple[int, ...]) -> str | None:
    """Which layout an image array has: 'NHW', 'NHWC', 'NCHW', or None if unknown."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        if shape[-1] in (1, 3, 4):
            return "NHWC"
        if shape[1] in (1, 3, 4):
            return "NCHW"
    return None


def check_array(array: np.ndarray, error: ErrorFactory) -> None:
    """Fail early on arrays that cannot be images."""
    if layout(array.shape) is None:
        raise error(
            f"image array has shape {array.shape}", "store images as (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1, 3, 4"
        )
    if array.dtype.kind not in "uif" and array.dtype != np.bool_:
        raise error(f"image array has dtype {array.dtype}", "store images as uint8 (0-255) or float in [0, 1]")


def to_uint8_rgb(batch: np.ndarray, error: ErrorFactory | None = None) -> np.ndarray:
    """A batch in any supported layout/dtype as uint8 (k, 3, H, W)."""
    kind = layout(batch.shape)
    if kind == "NHW":
        batch = batch[:, None]
    elif kind == "NHWC":
        batch = np.moveaxis(batch, -1, 1)
    elif kind is None:
        raise (error or _plain)(f"image array has shape {batch.shape}", None)
    if batch.shape[1] == 1:
        batch = np.repeat(batch, 3, axis=1)
    elif batch.shape[1] == 4:
        batch = batch[:, :3]
    if batch.dtype != np.uint8:
        if batch.dtype.kind == "f":
            if batch.size and (np.nanmin(batch) < -1e-6 or np.nanmax(batch) > 1 + 1e-6):
                raise (error or _plain)("float images must lie in [0, 1]", "scale them to [0, 1] or store uint8")
            batch = np.rint(np.nan_to_num(batch) * 255)
        elif batch.size and (batch.min() < 0 or batch.max() > 255):
            raise (error or _plain)("integer images must lie in 0..255", "store them as uint8")
        batch = batch.astype(np.uint8)
    return np.ascontiguousarray(batch)


def _plain(problem: str, fix: str | None) -> DataError:
    return DataError("data", problem, fix)


def resize(batch: np.ndarray, size: int) -> np.ndarray:
    """uint8 (k, 3, H, W) -> uint8 (k, 3, S, S), bilinear with antialiasing."""
    if batch.shape[2] == size and batch.shape[3] == size:
        return batch
    if len(batch) == 0:
        return empty(size)
    import torch  # lazy: text-only tasks never pay for it
    import torch.nn.functional as F

    out = np.empty((len(batch), 3, size, size), dtype=np.uint8)
    for start in range(0, len(batch), _CHUNK):
        chunk = torch.from_numpy(batch[start : start + _CHUNK]).float()
        scaled = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + _CHUNK] = scaled.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def from_array(array: np.ndarray, error: ErrorFactory | None = None) -> LazyImages:
    """Images held in one array (any supported layout); rows are converted on demand."""

    def load(rows: np.ndarray, size: int) -> np.ndarray:
        return resize(to_uint8_rgb(array[np.asarray(rows, dtype=np.int64)], error), size)

    return LazyImages(len(array), load)


def decode_file(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 (3, S, S)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def from_files(paths: Sequence[Path], error: Callable[[int, Path, str], DataError]) -> LazyImages:
    """Images stored as files; ``error(row, path, problem)`` names the row that failed."""

    def load(rows: np.ndarray, size: int) -> np.ndarray:
        out = np.empty((len(rows), 3, size, size), dtype=np.uint8)
        for k, row in enumerate(np.asarray(rows, dtype=np.int64)):
            path = paths[int(row)]
            if not path.is_file():
                raise error(int(row), path, "image file not found")
            try:
                out[k] = decode_file(path, size)
            except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
                raise error(int(row), path, f"cannot be read as an image ({exc})") from exc
        return out

    return LazyImages(len(paths), load)


def from_callable(n: int, get: Callable[[int], object], error: Callable[[int, str], DataError]) -> LazyImages:
    """Images fetched one by one (e.g. a Hugging Face dataset cell): PIL image, array or path.

    ``error(row, problem)`` names the row that failed.
    """

    def load(rows: np.ndarray, size: int) -> np.ndarray:
        out = np.empty((len(rows), 3, size, size), dtype=np.uint8)
        for k, row in enumerate(np.asarray(rows, dtype=np.int64)):
            try:
                out[k] = as_image(get(int(row)), size, lambda problem, fix, row=int(row): error(row, problem))
            except OSError as exc:
                raise error(int(row), f"cannot be read as an image ({exc})") from exc
        return out

    return LazyImages(n, load)


def as_image(value: object, size: int, error: ErrorFactory) -> np.ndarray:
    """A single image in any common container as uint8 (3, S, S)."""
    from PIL import Image

    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):  # undecoded datasets.Image
        import io

        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with Image.open(source) as image:
            value = image.convert("RGB")
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise error(f"image file not found: {path}", None)
        return decode_file(path, size)
    if isinstance(value, Image.Image):
        image = value.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    array = np.asarray(value)
    if array.ndim in (2, 3):
        return resize(to_uint8_rgb(array[None], error), size)[0]
    raise error(f"cannot read an image from a {type(value).__name__}", "store PIL images, arrays or file paths")
