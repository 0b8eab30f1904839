"""Prediction inputs: every row of one file, read by the training adapters, without labels or targets.

``tap-client predict`` reads csv, jsonl, npz, an image folder or a saved Hugging
Face dataset with the same readers (and therefore the same image decoding and
resizing) as training. Only the roles the task's modalities need are read
(texts, images), all rows, in file order: no test split, partition or cap.
Errors name the file, the row and the command-line option to fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from tap_core.config import TaskSpec
from tap_core.data.block import DataBlock, did_you_mean
from tap_core.data.generic import (
    _COLUMN_KEYS,
    _HF_KEYS,
    _KEY_KEYS,
    _NPZ_KEYS,
    read_csv,
    read_hf_disk,
    read_imagefolder,
    read_jsonl,
    read_npz,
)
from tap_core.data.images import LazyImages, empty
from tap_core.data.types import Examples
from tap_core.errors import DataError

INPUT_ROLES = ("texts", "images")
READERS = {
    "csv": read_csv,
    "jsonl": read_jsonl,
    "npz": read_npz,
    "imagefolder": read_imagefolder,
    "hf_disk": read_hf_disk,
}
INPUT_FORMATS = tuple(READERS)
# the data key that names a role's column in each format (what the reader looks up)
_ROLE_KEY = {
    "csv": {"texts": "text_column", "images": "image_column"},
    "jsonl": {"texts": "text_key", "images": "images_key"},
    "npz": {"texts": "texts_key", "images": "images_key"},
    "hf_disk": {"texts": "text_key", "images": "image_key"},
    "imagefolder": {},
}
# command-line options a person sets instead of those data keys
OPTIONS = {"texts": "--text-column", "images": "--image-column"}
_KEY_OPTION = {
    key: OPTIONS[role]
    for table in (_COLUMN_KEYS, _KEY_KEYS, _NPZ_KEYS, _HF_KEYS)
    for role, keys in table.items()
    if role in OPTIONS
    for key in keys
}
_KEY_OPTION.update(path="--input", format="--format")
_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".npz": "npz"}


def input_roles(task: TaskSpec) -> frozenset[str]:
    """What a prediction of ``task`` reads: the fields of its modalities."""
    return frozenset(role for role, modality in (("texts", "text"), ("images", "image")) if modality in task.modalities)


def trained_columns(task: TaskSpec) -> dict[str, str]:
    """role -> the column / key / array name the task's ``data:`` block read it from (where it names one)."""
    columns = {}
    for role in INPUT_ROLES:
        spellings = dict.fromkeys(k for table in (_COLUMN_KEYS, _KEY_KEYS, _NPZ_KEYS, _HF_KEYS) for k in table[role])
        value = next((task.data[k] for k in spellings if task.data.get(k) not in (None, "")), None)
        if value is not None:
            columns[role] = str(value)
    return columns


def guess_format(path: Path) -> str:
    """The input format from the file name (a folder: an image folder, or a saved Hugging Face dataset)."""
    if path.is_dir():
        saved = ("dataset_info.json", "dataset_dict.json", "state.json")
        return "hf_disk" if any((path / name).is_file() for name in saved) else "imagefolder"
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".gz", ".bz2")]
    fmt = _SUFFIXES.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise DataError(
            f"--input {path}",
            "cannot tell its format from the name",
            f"name it .csv, .tsv, .jsonl or .npz, or pass --format (one of {', '.join(INPUT_FORMATS)})",
        )
    return fmt


class _InputBlock(DataBlock):
    """A data block built from command-line options: messages name the options, not YAML keys."""

    def loc(self, field: str) -> str:
        return f"{self.where} ({_KEY_OPTION.get(field, field)})"

    def error(self, field: str, problem: str, fix: str | None = None) -> DataError:
        return DataError(self.loc(field), _as_options(problem), _as_options(fix) if fix else None)


def _as_options(text: str) -> str:
    text = text.replace("the file's folder or images_path", "the input file's folder")  # no such option here
    text = re.sub(r"\bset (\w+): to\b", lambda m: f"pass {_KEY_OPTION.get(m.group(1), m.group(1))}", text)
    return re.sub(r"\b(\w+_(?:column|key))\b", lambda m: _KEY_OPTION.get(m.group(1), m.group(1)), text)


@dataclass
class InputRows:
    """The rows of one input file; images are decoded only when a batch of rows is asked for."""

    source: str
    n: int
    texts: list[str] | None
    images: LazyImages | None
    files: list[str] | None = None  # per row, for image folders: the file relative to the folder

    def examples(self, rows: np.ndarray, image_size: int) -> Examples:
        rows = np.asarray(rows, dtype=np.int64)
        images = None
        if self.images is not None:
            images = self.images.load(rows, image_size) if len(rows) else empty(image_size)
        texts = None if self.texts is None else [self.texts[int(i)] for i in rows]
        return Examples(images=images, texts=texts)


def read_inputs(
    path: Path, task: TaskSpec, columns: Mapping[str, str | None] | None = None, fmt: str | None = None, where: str = ""
) -> InputRows:
    """Every row of ``path`` with the fields ``task`` reads. ``columns``: role -> column (None: the defaults)."""
    path = Path(path)
    where = where or f"--input {path}"
    if fmt is None:
        if not path.exists():
            raise DataError(f"{where} (--input)", f"not found: {path}", "check the path")
        fmt = guess_format(path)
    if fmt not in READERS:
        raise DataError(f"{where} (--format)", f"unknown input format {fmt!r}", did_you_mean(fmt, INPUT_FORMATS))
    needs = input_roles(task)
    data: dict[str, str] = {"format": fmt, "path": str(path)}
    for role, column in (columns or {}).items():
        if column and role in needs and role in _ROLE_KEY[fmt]:
            data[_ROLE_KEY[fmt][role]] = column
    raw = READERS[fmt](_InputBlock(data, where), task, needs)
    split = raw.train
    for role in needs:
        if not split.has(role):
            raise DataError(
                f"{where} (--format)",
                f"format {fmt} gave no {role} for task {task.name}",
                "see docs/data.md for what each format provides",
            )
    if split.n == 0:
        raise DataError(f"{where} (--input)", f"{path} has no rows", "give a file with at least one row")
    texts = None if split.texts is None else list(split.texts)
    files = list(split.keys["file"]) if "file" in split.keys else None
    return InputRows(str(path), split.n, texts, split.images, files)
