"""Operators' own data: csv, jsonl, npz, imagefolder and Hugging Face ``save_to_disk``.

Tabular formats (csv, jsonl, hf_disk) share one path: pick a column per role
(texts, labels, targets, images) from the data block, falling back to
conventional column names only when the task needs that role, then read the
columns. Images stay lazy (file paths or dataset cells) until rows are final.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from tap_core.config import TaskSpec
from tap_core.data import images as img
from tap_core.data.block import DataBlock, listing
from tap_core.data.source import RawData, RawSplit

# Data keys naming each role's column. The first spelling is the one messages use;
# the others are accepted aliases (``prompt_*`` reads better for text generation).
_COLUMN_KEYS = {
    "texts": ("text_column", "prompt_column", "text_key", "prompt_key"),
    "labels": ("label_column", "label_key"),
    "targets": ("target_column", "target_key"),
    "images": ("image_column", "image_key", "images_key"),
}
_KEY_KEYS = {
    "texts": ("text_key", "prompt_key", "text_column", "prompt_column"),
    "labels": ("label_key", "label_column"),
    "targets": ("target_key", "target_column"),
    "images": ("images_key", "image_key", "image_column"),
}
_HF_KEYS = dict(_KEY_KEYS, images=("image_key", "images_key", "image_column"))
_NPZ_KEYS = {"texts": ("texts_key",), "labels": ("labels_key",), "targets": ("targets_key",), "images": ("images_key",)}

# Column names tried, in order, when the task needs a role the block does not name.
DEFAULT_COLUMNS = {
    "texts": ("text", "prompt", "question"),
    "labels": ("label",),
    "targets": ("target", "answer"),
    "images": ("image", "image_path"),
}
NPZ_DEFAULTS = {"texts": ("texts",), "labels": ("labels",), "targets": ("targets",), "images": ("images",)}

WHY = {
    "texts": "reads text (modality text)",
    "labels": "is a classification task, so it needs labels",
    "targets": "is a text_generation task, so it needs targets",
    "images": "reads images (modality image)",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _all_keys(table: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(k for keys in table.values() for k in keys)


CSV_KEYS = ("path", "test_path", "images_path", "delimiter") + _all_keys(_COLUMN_KEYS)
JSONL_KEYS = ("path", "test_path", "images_path") + _all_keys(_KEY_KEYS)
NPZ_KEYS = ("path", "test_path") + _all_keys(_NPZ_KEYS)
IMAGEFOLDER_KEYS = ("path", "test_path")
HF_KEYS = ("path", "test_path", "split", "test_split") + _all_keys(_HF_KEYS)


# ---------------------------------------------------------------------------
# Tables: csv, jsonl and hf_disk seen the same way.


@dataclass
class Table:
    name: str  # the file or folder, for messages
    columns: list[str]
    n: int
    values: Callable[[str], Sequence[Any]]  # a whole column
    row_name: Callable[[int], str]  # "row 3", "line 7", "example 12"
    images: Callable[[str, Callable[[int, Any, str], Exception]], img.LazyImages]  # lazy image column


def _open_text(path: Path) -> io.TextIOBase:
    """A text file, transparently decompressing .gz / .bz2."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8-sig", newline="")
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _file_images(base: Path) -> Callable:
    """A factory of lazy images from a column of file paths relative to ``base``."""

    def make(column: str, values: Sequence[Any], error: Callable[[int, Any, str], Exception]) -> img.LazyImages:
        paths = []
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise error(i, value, "has no image path")
            paths.append(base / value)
        return img.from_files(paths, lambda row, path, problem: error(row, path, problem))

    return make


def _csv_table(block: DataBlock, key: str, path: Path) -> Table:
    delimiter = block.str_("delimiter", "\t" if path.suffixes[:1] == [".tsv"] else ",")
    try:
        with _open_text(path) as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = list(reader)
            columns = [c for c in (reader.fieldnames or []) if c is not None]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise block.error(key, f"cannot read {path} as CSV: {exc}", "save it as UTF-8 CSV with a header row") from exc
    if not columns:
        raise block.error(key, f"{path} has no header row", "the first line must name the columns")
    base = block.path("images_path", required=False, kind="folder") or path.parent
    row_name = lambda i: f"data row {i + 1}"  # noqa: E731
    files = _file_images(base)
    values = lambda c: [r.get(c) for r in rows]  # noqa: E731
    return Table(str(path), columns, len(rows), values, row_name, lambda c, e: files(c, values(c), e))


def _jsonl_table(block: DataBlock, key: str, path: Path) -> Table:
    rows: list[dict] = []
    lines: list[int] = []
    columns: dict[str, None] = {}
    try:
        with _open_text(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise block.error(
                        key, f"line {lineno} of {path} is not valid JSON: {exc.msg}", "write one JSON object per line"
                    ) from exc
                if not isinstance(row, dict):
                    raise block.error(
                        key, f"line {lineno} of {path} is not a JSON object", "write one JSON object per line"
                    )
                rows.append(row)
                lines.append(lineno)
                columns.update(dict.fromkeys(row))
    except (OSError, UnicodeDecodeError) as exc:
        raise block.error(key, f"cannot read {path}: {exc}", "save it as UTF-8 JSON lines") from exc
    base = block.path("images_path", required=False, kind="folder") or path.parent
    row_name = lambda i: f"line {lines[i]}"  # noqa: E731
    files = _file_images(base)
    values = lambda c: [r.get(c) for r in rows]  # noqa: E731
    return Table(str(path), list(columns), len(rows), values, row_name, lambda c, e: files(c, values(c), e))


def _resolve_columns(
    block: DataBlock,
    table: Table,
    role_keys: dict[str, tuple[str, ...]],
    task: TaskSpec,
    needs: frozenset,
    defaults: dict[str, tuple[str, ...]] = DEFAULT_COLUMNS,
    what: str = "column",
) -> dict[str, tuple[str, str]]:
    """role -> (data key to blame, column) for every role named in the block or needed by the task."""
    chosen: dict[str, tuple[str, str]] = {}
    for role, keys in role_keys.items():
        key, column = block.alias(*keys)
        shown = keys[1] if role == "texts" and task.kind == "text_generation" and len(keys) > 1 else keys[0]
        if column is not None:
            if column not in table.columns:
                raise block.error(
                    key,
                    f"{what} {column!r} not found in {table.name}",
                    f"use one of the available {what}s: {listing(table.columns)}",
                )
            chosen[role] = (key, column)
        elif role in needs:
            found = next((c for c in defaults[role] if c in table.columns), None)
            if found is None:
                tried = " or ".join(repr(c) for c in defaults[role])
                raise block.error(
                    shown,
                    f"the task {WHY[role]}, but {shown} is not set and {table.name} has no {tried} {what}",
                    f"set {shown}: to one of the available {what}s: {listing(table.columns)}",
                )
            chosen[role] = (shown, found)
    return chosen


def _table_split(block: DataBlock, table: Table, chosen: dict[str, tuple[str, str]], by: str | None) -> RawSplit:
    split = RawSplit(n=table.n)
    for role, (key, column) in chosen.items():

        def error(row: int, value: Any, problem: str, key=key, column=column) -> Exception:
            return block.error(
                key,
                f"{table.row_name(row)} of {table.name} (column {column!r}) {problem}"
                + (f": {value}" if value not in (None, "") else ""),
                "fix or drop that row (image paths are relative to the file's folder or images_path)",
            )

        if role == "images":
            split.images = table.images(column, error)
            continue
        values = table.values(column)
        out: list[str] = []
        for i, value in enumerate(values):
            if value is None or (role != "texts" and value == ""):
                raise error(i, None, "has no value")
            out.append(value if isinstance(value, str) else str(value))
        setattr(split, role, out)
    if by is not None and by not in ("label", "target"):
        if by not in table.columns:
            raise block.error(
                "partition.by",
                f"{table.name} has no column {by!r} to partition by",
                f"use label, target or one of: {listing(table.columns)}",
            )
        split.keys[by] = ["" if v is None else str(v) for v in table.values(by)]
    return split


def _partition_by(block: DataBlock) -> str | None:
    part = block.data.get("partition")
    return part.get("by") if isinstance(part, Mapping) else None


def _tabular(
    block: DataBlock,
    task: TaskSpec,
    needs: frozenset,
    role_keys: dict,
    open_table: Callable[[DataBlock, str, Path], Table],
) -> RawData:
    path = block.path("path")
    train_table = open_table(block, "path", path)
    chosen = _resolve_columns(block, train_table, role_keys, task, needs)
    by = _partition_by(block)
    train = _table_split(block, train_table, chosen, by)
    test = None
    test_path = block.path("test_path", required=False)
    if test_path is not None:
        test_table = open_table(block, "test_path", test_path)
        for key, column in chosen.values():
            if column not in test_table.columns:
                raise block.error(
                    "test_path",
                    f"{test_table.name} has no column {column!r} (set by {key})",
                    f"give the test file the same columns; it has: {listing(test_table.columns)}",
                )
        test = _table_split(block, test_table, chosen, by)
    return _raw(train, test, chosen.get("labels", ("label_column",))[0])


def _raw(train: RawSplit, test: RawSplit | None, label_field: str) -> RawData:
    default = "label" if train.labels is not None else "target" if train.targets is not None else None
    return RawData(train=train, test=test, default_key=default, label_field=label_field)


def read_csv(block: DataBlock, task: TaskSpec, needs: frozenset) -> RawData:
    return _tabular(block, task, needs, _COLUMN_KEYS, _csv_table)


def read_jsonl(block: DataBlock, task: TaskSpec, needs: frozenset) -> RawData:
    return _tabular(block, task, needs, _KEY_KEYS, _jsonl_table)


# ---------------------------------------------------------------------------
# npz


def read_npz(block: DataBlock, task: TaskSpec, needs: frozenset) -> RawData:
    train = _npz_split(block, task, needs, "path")
    test = _npz_split(block, task, needs, "test_path") if "test_path" in block else None
    return _raw(train, test, "labels_key")


def _npz_split(block: DataBlock, task: TaskSpec, needs: frozenset, key: str) -> RawSplit:
    path = block.path(key)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as exc:
        raise block.error(
            key,
            f"{path} holds object arrays, which are not loaded for safety ({exc})",
            "save strings as a numpy str array (np.array(list_of_str))",
        ) from exc
    except (OSError, EOFError) as exc:
        raise block.error(key, f"cannot read {path} as .npz: {exc}", "write it with numpy.savez") from exc
    table = Table(str(path), list(arrays), 0, arrays.__getitem__, lambda i: f"item {i}", None)  # type: ignore[arg-type]
    chosen = _resolve_columns(block, table, _NPZ_KEYS, task, needs, NPZ_DEFAULTS, what="array")
    lengths = {name: len(arrays[col]) for name, (_, col) in chosen.items()}
    n = next(iter(lengths.values()), 0)
    split = RawSplit(n=n)
    for role, (field, col) in chosen.items():
        array = arrays[col]
        if len(array) != n:
            sizes = ", ".join(f"{chosen[r][1]}: {m}" for r, m in lengths.items())
            raise block.error(
                field,
                f"array {col!r} in {path} has {len(array)} entries but the others have {n} ({sizes})",
                "store one entry per example in every array",
            )
        if role == "images":

            def error(problem: str, fix: str | None, field=field, col=col) -> Exception:
                return block.error(field, f"array {col!r} in {path}: {problem}", fix)

            img.check_array(array, error)
            split.images = img.from_array(array, error)
        else:
            if array.ndim != 1:
                raise block.error(
                    field,
                    f"array {col!r} in {path} has shape {array.shape}",
                    "store a 1-D array, one value per example",
                )
            setattr(split, role, [str(v) for v in array.tolist()])
    by = _partition_by(block)
    if by is not None and by not in ("label", "target"):
        if by not in arrays or arrays[by].ndim != 1 or len(arrays[by]) != n:
            raise block.error(
                "partition.by",
                f"{path} has no 1-D array {by!r} with {n} entries to partition by",
                f"use label or one of: {listing(arrays)}",
            )
        split.keys[by] = [str(v) for v in arrays[by].tolist()]
    return split


# ---------------------------------------------------------------------------
# imagefolder


def read_imagefolder(block: DataBlock, task: TaskSpec, needs: frozenset) -> RawData:
    for role in ("texts", "targets"):
        if role in needs:
            raise block.error(
                "format",
                f"imagefolder holds only images and labels, but the task {WHY[role]}",
                "use csv or jsonl with an image column, or another task kind/modality",
            )
    labelled = "labels" in needs
    train = _folder_split(block, "path", labelled)
    test = _folder_split(block, "test_path", labelled) if "test_path" in block else None
    return _raw(train, test, "path")


def _image_files(folder: Path) -> list[Path]:
    return [f for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]


def _folder_split(block: DataBlock, key: str, labelled: bool = True) -> RawSplit:
    """Images in ``<root>/<label>/``, in sorted order. Unlabelled (prediction inputs, reconstruction):
    images directly in ``<root>`` count too, first; they leave the split without labels.
    Unlabelled splits name each row's file (relative to the root) under the key ``file``."""
    root = block.path(key, kind="folder")
    loose = [] if labelled else _image_files(root)
    paths: list[Path] = list(loose)
    labels: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in _image_files(folder):
            paths.append(file)
            labels.append(folder.name)
    if not paths:
        layouts = f"{root}/<label>/<file>.png" + ("" if labelled else f" or {root}/<file>.png")
        raise block.error(
            key,
            f"{root} has no images in label subfolders" + ("" if labelled else " or in itself"),
            f"put images ({', '.join(IMAGE_SUFFIXES)}) in {'one subfolder per label' if labelled else 'it'}: {layouts}",
        )

    def error(row: int, path: Path, problem: str) -> Exception:
        return block.error(key, f"{path}: {problem}", "remove or replace the file")

    split = RawSplit(n=len(paths), labels=None if loose else labels, images=img.from_files(paths, error))
    if not labelled:
        split.keys["file"] = [str(p.relative_to(root)) for p in paths]
    return split


# ---------------------------------------------------------------------------
# Hugging Face datasets saved with save_to_disk


def read_hf_disk(block: DataBlock, task: TaskSpec, needs: frozenset) -> RawData:
    try:
        import datasets
    except ImportError as exc:
        raise block.error(
            "format", "hf_disk needs the Hugging Face datasets package, which is not installed", "pip install datasets"
        ) from exc
    train_name = block.str_("split", "train")
    loaded = _load_hf(block, datasets, "path")
    if isinstance(loaded, datasets.DatasetDict):
        if train_name not in loaded:
            raise block.error(
                "split", f"{block.data['path']} has no split {train_name!r}", f"use one of: {listing(loaded)}"
            )
        train_ds = loaded[train_name]
    else:
        train_ds = loaded
    test_ds = None
    test_name = block.str_("test_split")
    if "test_path" in block:
        other = _load_hf(block, datasets, "test_path")
        test_ds = (
            other
            if not isinstance(other, datasets.DatasetDict)
            else _pick_split(block, other, test_name or "test", "test_split")
        )
    elif isinstance(loaded, datasets.DatasetDict) and (test_name or "test") in loaded:
        test_ds = loaded[test_name or "test"]
    elif test_name is not None:
        raise block.error(
            "test_split",
            f"{block.data['path']} has no split {test_name!r}",
            f"use one of: {listing(loaded) if isinstance(loaded, datasets.DatasetDict) else '(a single Dataset)'}",
        )
    train_table = _hf_table(train_ds, f"{block.data['path']} [{train_name}]")
    chosen = _resolve_columns(block, train_table, _HF_KEYS, task, needs)
    by = _partition_by(block)
    train = _table_split(block, train_table, chosen, by)
    test = None
    if test_ds is not None:
        test_table = _hf_table(test_ds, f"{block.data.get('test_path') or block.data['path']} [test]")
        for key, column in chosen.values():
            if column not in test_table.columns:
                raise block.error(
                    key,
                    f"{test_table.name} has no column {column!r}",
                    f"give the test split the same columns; it has: {listing(test_table.columns)}",
                )
        test = _table_split(block, test_table, chosen, by)
    return _raw(train, test, chosen.get("labels", ("label_key",))[0])


def _load_hf(block: DataBlock, datasets: Any, key: str) -> Any:
    path = block.path(key, kind="folder")
    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise block.error(
            key,
            f"{path} is not a dataset saved with save_to_disk ({exc})",
            "save it with Dataset.save_to_disk(path) or DatasetDict.save_to_disk(path)",
        ) from exc


def _pick_split(block: DataBlock, dataset_dict: Any, name: str, key: str) -> Any:
    if name in dataset_dict:
        return dataset_dict[name]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise block.error(key, f"no split {name!r}", f"use one of: {listing(dataset_dict)}")


def _hf_table(ds: Any, name: str) -> Table:
    import datasets

    features = ds.features

    def values(column: str) -> list[Any]:
        feature = features[column]
        if isinstance(feature, datasets.Image):
            return [0] * len(ds)  # images are read lazily, never as a whole column
        cells = list(ds[column])
        if isinstance(feature, datasets.ClassLabel):
            return [feature.int2str(int(v)) if v is not None and int(v) >= 0 else None for v in cells]
        return cells

    def images(column: str, error: Callable[[int, Any, str], Exception]) -> img.LazyImages:
        return img.from_callable(len(ds), lambda i: ds[i][column], lambda row, problem: error(row, None, problem))

    return Table(name, list(ds.column_names), len(ds), values, lambda i: f"example {i}", images)
