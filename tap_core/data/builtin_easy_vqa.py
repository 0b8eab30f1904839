"""easy-VQA (pip package ``easy-vqa``): 64x64 shape images with questions, offline.

4000 train / 1000 test images, ~38.6k / 9.7k questions, 13 answers. Targets:

- ``vqa`` (text_generation): question -> answer, with the image.
- ``answer`` (classification): the same as 13-way classification.
- ``yes_no`` (classification): yes/no questions only, labels yes / no.
- ``question_type`` (classification): the question's type (see QUESTION_TYPES).
- ``shape``, ``color``, ``shape_color`` (classification): one row per image.
- ``reconstruct`` (image_generation): one row per image; texts are a caption.

The question file carries no type, so it is derived: an answer that is a shape
or colour makes a ``shape`` / ``color`` question, a yes/no question is
``shape_yes_no`` or ``color_yes_no`` by the word it asks about. An image's
shape and colour are read off its questions (direct answers, and yes/no
questions with their negations); the few images whose questions do not pin
them down are "unknown" and dropped by the per-image classification targets.

Partitions work on images (all questions of an image stay on one silo) when
the key is ``shape`` (the default for vqa / reconstruct) or ``color``.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tap_core.config import TaskSpec
from tap_core.data.block import DataBlock, did_you_mean
from tap_core.data.cache import cached_arrays
from tap_core.data.images import LazyImages, resize
from tap_core.data.source import RawData, RawSplit, check_provides

KEYS = ("target", "question_types")
TARGET_KINDS = {
    "vqa": "text_generation",
    "answer": "classification",
    "yes_no": "classification",
    "question_type": "classification",
    "shape": "classification",
    "color": "classification",
    "shape_color": "classification",
    "reconstruct": "image_generation",
}
PER_QUESTION = ("vqa", "answer", "yes_no", "question_type")
QUESTION_TYPES = ("shape", "color", "shape_yes_no", "color_yes_no")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
UNKNOWN = "unknown"
NATIVE_SIZE = 64
INSTALL = "pip install easy-vqa"


@dataclass(frozen=True)
class Split:
    """One official split: questions plus per-image attributes (image id = index)."""

    name: str
    questions: list[str]
    answers: list[str]
    image_of: np.ndarray  # image id of each question
    qtypes: list[str]
    image_paths: list[Path]
    shapes: list[str]  # per image, or UNKNOWN
    colors: list[str]


def _package_data() -> Path | None:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def question_type(question: str, answer: str) -> str:
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    words = set(re.findall(r"[a-z]+", question.lower()))
    return "shape_yes_no" if words & set(SHAPES) else "color_yes_no"


def _attributes(
    questions: list[str], answers: list[str], image_of: np.ndarray, n_images: int
) -> tuple[list[str], list[str]]:
    """Each image's shape and colour as far as its questions determine them."""
    present: list[set[str]] = [set() for _ in range(n_images)]
    absent: list[set[str]] = [set() for _ in range(n_images)]
    vocabulary = set(SHAPES) | set(COLORS)
    for question, answer, image in zip(questions, answers, image_of):
        words = re.findall(r"[a-z]+", question.lower())
        mentioned = [w for w in words if w in vocabulary]
        if answer in vocabulary:  # "what color is the triangle?" -> blue: both are present
            present[image].update(mentioned + [answer])
        elif answer in ("yes", "no"):  # "is there not a red shape?" -> no: red is present
            negated = "not" in words or "no" in words
            (present if (answer == "yes") != negated else absent)[image].update(mentioned)

    def resolve(image: int, options: tuple[str, ...]) -> str:
        hits = [o for o in options if o in present[image]]
        if len(hits) == 1:
            return hits[0]
        left = [o for o in options if o not in absent[image]]
        return left[0] if not hits and len(left) == 1 else UNKNOWN

    return ([resolve(i, SHAPES) for i in range(n_images)], [resolve(i, COLORS) for i in range(n_images)])


@functools.lru_cache(maxsize=2)
def load_split(name: str) -> Split:
    import easy_vqa

    if name == "train":
        questions, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    n_images = len(paths)
    assert sorted(paths) == list(range(n_images)), "easy-VQA image ids must be 0..N-1"
    image_of = np.asarray(ids, dtype=np.int64)
    shapes, colors = _attributes(questions, answers, image_of, n_images)
    return Split(
        name=name,
        questions=list(questions),
        answers=list(answers),
        image_of=image_of,
        qtypes=[question_type(q, a) for q, a in zip(questions, answers)],
        image_paths=[Path(paths[i]) for i in range(n_images)],
        shapes=shapes,
        colors=colors,
    )


@functools.lru_cache(maxsize=2)
def native_images(name: str) -> np.ndarray:
    """All images of a split at 64x64 as uint8 (N, 3, 64, 64), cached on disk."""
    split = load_split(name)

    def build() -> dict[str, np.ndarray]:
        from PIL import Image

        out = np.empty((len(split.image_paths), 3, NATIVE_SIZE, NATIVE_SIZE), dtype=np.uint8)
        for i, path in enumerate(split.image_paths):
            with Image.open(path) as image:
                rgb = image.convert("RGB")
                if rgb.size != (NATIVE_SIZE, NATIVE_SIZE):
                    rgb = rgb.resize((NATIVE_SIZE, NATIVE_SIZE), Image.Resampling.BILINEAR)
                out[i] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
        return {"images": out}

    def valid(arrays: dict[str, np.ndarray]) -> bool:
        images = arrays.get("images")
        return images is not None and images.shape == (len(split.image_paths), 3, NATIVE_SIZE, NATIVE_SIZE)

    return cached_arrays(f"easy_vqa-{name}-{NATIVE_SIZE}", build, valid)["images"]


def _images(name: str, image_of: np.ndarray) -> LazyImages:
    """Lazy images for rows whose image ids are ``image_of``."""
    return LazyImages(
        len(image_of), lambda rows, size: resize(native_images(name)[image_of[np.asarray(rows, dtype=np.int64)]], size)
    )


def _rows(split: Split, target: str, types: set[str] | None) -> RawSplit:
    n_images = len(split.image_paths)
    if target in PER_QUESTION:
        n = len(split.questions)
        labels = {"answer": split.answers, "yes_no": split.answers, "question_type": split.qtypes}.get(target)
        valid = np.ones(n, dtype=bool)
        if types is not None:
            valid &= np.isin(np.asarray(split.qtypes, dtype=object), list(types))
        if target == "yes_no":
            valid &= np.isin(np.asarray(split.answers, dtype=object), ["yes", "no"])
        return RawSplit(
            n=n,
            texts=split.questions,
            labels=labels,
            targets=split.answers if target == "vqa" else None,
            images=_images(split.name, split.image_of),
            keys={
                "shape": [split.shapes[i] for i in split.image_of],
                "color": [split.colors[i] for i in split.image_of],
                "answer": split.answers,
                "question_type": split.qtypes,
            },
            groups=split.image_of,
            group_keys=frozenset({"shape", "color"}),
            valid=valid,
        )
    ids = np.arange(n_images)
    both = [UNKNOWN if UNKNOWN in (s, c) else f"{c} {s}" for s, c in zip(split.shapes, split.colors)]
    labels = {"shape": split.shapes, "color": split.colors, "shape_color": both}.get(target)
    captions = [
        f"a {'' if c == UNKNOWN else c + ' '}{'shape' if s == UNKNOWN else s}"
        for s, c in zip(split.shapes, split.colors)
    ]
    return RawSplit(
        n=n_images,
        texts=captions if target == "reconstruct" else None,
        labels=labels,
        images=_images(split.name, ids),
        keys={"shape": split.shapes, "color": split.colors},
        groups=ids,
        group_keys=frozenset({"shape", "color", "label"}),
        valid=None if labels is None else np.asarray([v != UNKNOWN for v in labels]),
    )


def read(block: DataBlock, task: TaskSpec, needs: frozenset) -> RawData:
    if _package_data() is None:
        raise block.error("format", "the easy_vqa builtin needs the easy-vqa package, which is not installed", INSTALL)
    target = _target(block, task)
    types = block.str_list("question_types")
    if types is not None:
        if target not in PER_QUESTION:
            raise block.error(
                "question_types",
                f"only applies to the per-question targets ({', '.join(PER_QUESTION)}), not to target {target!r}",
                "remove question_types",
            )
        for t in types:
            if t not in QUESTION_TYPES:
                raise block.error("question_types", f"unknown question type {t!r}", did_you_mean(t, QUESTION_TYPES))
    if target in PER_QUESTION:
        provided = {"images", "texts", "targets" if target == "vqa" else "labels"}
        fix = "change the task's modalities or pick another target"
    else:
        provided = {"images", "texts"} if target == "reconstruct" else {"images", "labels"}
        fix = f"drop text from the task's modalities, or use a per-question target ({', '.join(PER_QUESTION)})"
    check_provides(block, "target", f"easy_vqa target {target!r}", provided, needs, fix)
    type_set = set(types) if types else None
    return RawData(
        train=_rows(load_split("train"), target, type_set),
        test=_rows(load_split("test"), target, type_set),
        default_key="shape",
        label_field="target",
    )


def _target(block: DataBlock, task: TaskSpec) -> str:
    """The block's target, or the only one that fits the task kind."""
    fitting = [t for t, kind in TARGET_KINDS.items() if kind == task.kind]
    if "target" not in block:
        if len(fitting) == 1:
            return fitting[0]
        raise block.error(
            "target", f"is required for a {task.kind} task on easy_vqa", f"set target: one of {', '.join(fitting)}"
        )
    target = block.choice("target", tuple(TARGET_KINDS))
    if TARGET_KINDS[target] != task.kind:
        raise block.error(
            "target",
            f"target {target!r} is for {TARGET_KINDS[target]} tasks, but this task is {task.kind}",
            f"use one of {', '.join(fitting)}, or change the task's kind",
        )
    return target
