"""What a format adapter returns: raw rows of a source, before slicing.

Text columns are plain lists (cheap), images stay lazy until the final rows are
known. ``keys`` holds the values a partition may skew over (``label``, a
builtin's own keys, a CSV column, ...). Rows may belong to ``groups`` (e.g. the
questions of one easy-VQA image): a partition over a key listed in
``group_keys`` then moves whole groups, so an image never lands on two silos.
``valid`` marks rows to drop *after* partitioning (filters that must not change
which slice a group falls into).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from tap_core.data.images import LazyImages

ROLES = ("images", "texts", "labels", "targets")


def _take(values: Sequence | None, rows: np.ndarray) -> list | None:
    if values is None:
        return None
    return [values[int(i)] for i in rows]


@dataclass
class RawSplit:
    n: int
    texts: Sequence[str] | None = None
    labels: Sequence[str] | None = None
    targets: Sequence[str] | None = None
    images: LazyImages | None = None
    keys: dict[str, Sequence[str]] = field(default_factory=dict)
    groups: np.ndarray | None = None
    group_keys: frozenset[str] = frozenset()
    valid: np.ndarray | None = None

    def has(self, role: str) -> bool:
        return getattr(self, role) is not None

    def key(self, name: str) -> Sequence[str] | None:
        """Partition key values per row; ``label``/``target`` fall back to those columns."""
        if name in self.keys:
            return self.keys[name]
        if name == "label":
            return self.labels
        if name == "target":
            return self.targets
        return None

    def key_names(self) -> list[str]:
        names = set(self.keys)
        if self.labels is not None:
            names.add("label")
        if self.targets is not None:
            names.add("target")
        return sorted(names)

    def subset(self, rows: np.ndarray) -> "RawSplit":
        rows = np.asarray(rows, dtype=np.int64)
        return replace(
            self,
            n=len(rows),
            texts=_take(self.texts, rows),
            labels=_take(self.labels, rows),
            targets=_take(self.targets, rows),
            images=None if self.images is None else self.images.subset(rows),
            keys={k: _take(v, rows) for k, v in self.keys.items()},
            groups=None if self.groups is None else self.groups[rows],
            valid=None if self.valid is None else self.valid[rows],
        )


@dataclass
class RawData:
    """A source's train rows and, if it has one, its own test rows."""

    train: RawSplit
    test: RawSplit | None = None  # None: carved from train with test_fraction
    default_key: str | None = None  # partition key for non-classification tasks (None: IID)
    label_field: str = "label_column"  # the data field to blame for a bad label


ROLE_NEEDS = {
    "images": "reads images (modality image)",
    "texts": "reads text (modality text)",
    "labels": "is a classification task (needs labels)",
    "targets": "is a text_generation task (needs targets)",
}


def check_provides(block, field: str, what: str, provided: set[str], needs: frozenset, fix: str) -> None:
    """Fail if the task needs a role that source ``what`` does not provide."""
    for role in ("images", "texts", "labels", "targets"):
        if role in needs and role not in provided:
            raise block.error(field, f"{what} gives {', '.join(sorted(provided))} but the task {ROLE_NEEDS[role]}", fix)
