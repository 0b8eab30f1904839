"""``load_task_data``: read a task's source, slice it, and hand back TaskData.

Order of work (all seeded by ``data.seed`` only):
read the source -> carve a test split if it has none (test_fraction)
-> partition train and test into ``count`` non-IID slices, keep slice ``index``
-> drop rows a filter excludes -> cap (max_train / max_test)
-> carve validation from train -> decode and resize the kept images.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from tap_core.config import TaskSpec
from tap_core.data import builtin_easy_vqa, builtin_fashion, builtin_text, generic
from tap_core.data.block import COMMON_KEYS, DataBlock, PartitionSpec, listing
from tap_core.data.images import empty
from tap_core.data.partition import (
    CAP_TEST,
    CAP_TRAIN,
    carve_val,
    cap,
    partition_units,
    rows_of,
    split_test,
    units_of,
)
from tap_core.data.source import RawData, RawSplit
from tap_core.data.types import Examples, TaskData

Reader = Callable[[DataBlock, TaskSpec, frozenset], RawData]

# format name -> (keys it accepts beyond COMMON_KEYS, reader)
FORMATS: Mapping[str, tuple[tuple[str, ...], Reader]] = {
    "csv": (generic.CSV_KEYS, generic.read_csv),
    "jsonl": (generic.JSONL_KEYS, generic.read_jsonl),
    "npz": (generic.NPZ_KEYS, generic.read_npz),
    "imagefolder": (generic.IMAGEFOLDER_KEYS, generic.read_imagefolder),
    "hf_disk": (generic.HF_KEYS, generic.read_hf_disk),
    "easy_vqa": (builtin_easy_vqa.KEYS, builtin_easy_vqa.read),
    "fashion_mnist": (builtin_fashion.KEYS, builtin_fashion.read),
    "rotten_tomatoes": (builtin_text.ROTTEN_KEYS, builtin_text.read_rotten_tomatoes),
    "trec": (builtin_text.TREC_KEYS, builtin_text.read_trec),
}


def required_roles(task: TaskSpec) -> frozenset[str]:
    """Which Examples fields this task reads: its modalities plus its supervision."""
    roles = set()
    if "image" in task.modalities or task.kind == "image_generation":
        roles.add("images")
    if "text" in task.modalities:
        roles.add("texts")
    if task.kind == "classification":
        roles.add("labels")
    if task.kind == "text_generation":
        roles.add("targets")
    return frozenset(roles)


def load_task_data(task: TaskSpec, image_size: int, val_fraction: float = 0.1, where: str = "") -> TaskData:
    """Train / val / test Examples of one task on one silo (see docs/data.md)."""
    if image_size < 1 or not 0 <= val_fraction < 1:
        raise ValueError(f"image_size must be >= 1 and val_fraction in [0, 1), got {image_size}, {val_fraction}")
    block = DataBlock(task.data, where)
    if "format" not in block:
        raise block.error("format", "is required", f"set format: one of {', '.join(FORMATS)}")
    fmt = block.choice("format", tuple(FORMATS))
    extra_keys, read = FORMATS[fmt]
    block.check_keys(COMMON_KEYS + extra_keys, fmt)
    seed = block.int_("seed", 0, minimum=0)
    test_fraction = block.fraction("test_fraction", 0.2)
    max_train = block.int_("max_train", None, minimum=1)
    max_test = block.int_("max_test", None, minimum=1)
    part = block.partition()
    needs = required_roles(task)

    raw = read(block, task, needs)
    for role in needs:
        if not raw.train.has(role) or (raw.test is not None and not raw.test.has(role)):
            raise block.error("format", f"format {fmt} gave no {role} for this task", "see docs/data.md")
    train, test = raw.train, raw.test
    source_field = "path" if "path" in block else "format"
    if train.n == 0:
        raise block.error(source_field, "the source has no examples", "check the file or filters")
    if test is None:
        train_rows, test_rows = split_test(train.n, train.groups, test_fraction, seed)
        train, test = train.subset(train_rows), train.subset(test_rows)

    train_rows, test_rows = np.arange(train.n), np.arange(test.n)
    if part is not None:
        train_rows, test_rows = _slice(block, task, raw, train, test, part, seed)
    train_rows, test_rows = _valid(train, train_rows), _valid(test, test_rows)
    train_rows = cap(train_rows, max_train, seed, CAP_TRAIN)
    test_rows = cap(test_rows, max_test, seed, CAP_TEST)
    sizes = f"(the source has {train.n} train and {test.n} test examples before slicing and filtering)"
    if len(train_rows) == 0:
        raise block.error(
            "partition" if part is not None else source_field,
            f"leaves no training examples for this task {sizes}",
            "use fewer partitions (count), a larger alpha, or looser filters",
        )
    if len(test_rows) == 0:
        test_field = "test_path" if "test_path" in block else "test_fraction" if raw.test is None else source_field
        raise block.error(
            "partition" if part is not None else test_field,
            f"leaves no test examples for this task {sizes}",
            "raise test_fraction, give a larger test split, or use fewer partitions",
        )
    if task.kind == "classification" and task.labels is not None:
        _check_declared_labels(block, task, raw.label_field, (train, train_rows), (test, test_rows))
    fit_rows, val_rows = carve_val(train_rows, train.groups, val_fraction, seed)
    return TaskData(
        train=_examples(train, fit_rows, needs, image_size),
        val=_examples(train, val_rows, needs, image_size),
        test=_examples(test, test_rows, needs, image_size),
    )


def _slice(
    block: DataBlock, task: TaskSpec, raw: RawData, train: RawSplit, test: RawSplit, part: PartitionSpec, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """This silo's rows of train and test: slice ``index`` of ``count``."""
    by = part.by or ("label" if task.kind == "classification" else raw.default_key)
    alpha = part.alpha if by is not None else None
    grouped = by is not None and by in train.group_keys and train.groups is not None
    unit_train, first_train = units_of(train.n, train.groups if grouped else None)
    unit_test, first_test = units_of(test.n, test.groups if grouped else None)
    train_keys = test_keys = None
    if by is not None:
        values_train, values_test = train.key(by), test.key(by)
        if values_train is None or values_test is None:
            raise block.error(
                "partition.by",
                f"this data has no key {by!r} to partition by",
                f"use one of: {listing(train.key_names())}",
            )
        train_keys = [values_train[int(i)] for i in first_train]
        test_keys = [values_test[int(i)] for i in first_test]
    slices_train, slices_test = partition_units(
        train_keys, test_keys, len(first_train), len(first_test), part.count, alpha, seed
    )
    return rows_of(unit_train, slices_train[part.index]), rows_of(unit_test, slices_test[part.index])


def _valid(split: RawSplit, rows: np.ndarray) -> np.ndarray:
    return rows if split.valid is None else rows[split.valid[rows]]


def _check_declared_labels(block: DataBlock, task: TaskSpec, field: str, *splits: tuple[RawSplit, np.ndarray]) -> None:
    declared = set(task.labels or ())
    for split, rows in splits:
        for label in sorted({split.labels[int(i)] for i in rows}) if split.labels is not None else ():
            if label not in declared:
                raise block.error(
                    field,
                    f"has label {label!r}, which is not among the task's labels ({listing(task.labels or ())})",
                    f"add {label!r} to the task's labels, or drop those rows",
                )


def _examples(split: RawSplit, rows: np.ndarray, needs: frozenset, image_size: int) -> Examples:
    def take(values):
        return None if values is None else [values[int(i)] for i in rows]

    images = None
    if "images" in needs:
        images = split.images.load(rows, image_size) if len(rows) else empty(image_size)
    return Examples(
        images=images,
        texts=take(split.texts) if "texts" in needs else None,
        labels=take(split.labels) if "labels" in needs else None,
        targets=take(split.targets) if "targets" in needs else None,
    )


__all__ = ["FORMATS", "load_task_data", "required_roles"]
