"""Reading one task's ``data:`` block: typed getters that fail as DataError.

Every error names its field as ``"<where> data.<field>"``, says what is wrong
and how to fix it, so a person can correct the YAML without reading code.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tap_core.errors import DataError

# Keys every format accepts.
COMMON_KEYS = ("format", "test_fraction", "max_train", "max_test", "seed", "partition")
PARTITION_KEYS = ("index", "count", "alpha", "by")


def did_you_mean(value: str, choices: Iterable[str], what: str = "one of") -> str:
    choices = sorted(set(choices))
    close = difflib.get_close_matches(value, choices, n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"use {what}: {', '.join(choices)}" if choices else "remove it"


def listing(names: Iterable[str], limit: int = 30) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "(none)"


@dataclass(frozen=True)
class PartitionSpec:
    index: int
    count: int
    alpha: float | None  # None: IID
    by: str | None  # partition key; None: the loader's default


class DataBlock:
    """The task's data mapping plus where it came from (for messages)."""

    def __init__(self, data: Mapping[str, Any], where: str = ""):
        if not isinstance(data, Mapping):
            raise DataError(self._loc(where, ""), f"must be a mapping, got {data!r}", "write data: {format: ..., ...}")
        self.data = dict(data)
        self.where = where

    @staticmethod
    def _loc(where: str, field: str) -> str:
        name = f"data.{field}" if field else "data"
        return f"{where} {name}" if where else name

    def loc(self, field: str) -> str:
        return self._loc(self.where, field)

    def error(self, field: str, problem: str, fix: str | None = None) -> DataError:
        return DataError(self.loc(field), problem, fix)

    def __contains__(self, key: str) -> bool:
        return self.data.get(key) is not None

    # -- checks -----------------------------------------------------------------

    def check_keys(self, allowed: Sequence[str], fmt: str) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.error(
                    str(key),
                    f"unknown key for format {fmt}",
                    did_you_mean(str(key), allowed, f"the keys format {fmt} accepts"),
                )

    def choice(self, key: str, choices: Sequence[str], default: str | None = None) -> str:
        value = self.data.get(key, default)
        if value is None:
            raise self.error(key, "is required", f"set {key}: one of {', '.join(choices)}")
        value = str(value)
        if value not in choices:
            raise self.error(key, f"unknown {key} {value!r}", did_you_mean(value, choices))
        return value

    # -- typed getters ------------------------------------------------------------

    def str_(self, key: str, default: str | None = None) -> str | None:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise self.error(key, f"expected a string, got {value!r}")
        return str(value)

    def int_(self, key: str, default: int | None = None, minimum: int | None = None) -> int | None:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def fraction(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise self.error(key, f"must be a number between 0 and 1 (exclusive), got {value!r}")
        return float(value)

    def str_list(self, key: str) -> list[str] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise self.error(key, f"expected a non-empty list of strings, got {value!r}")
        return [str(v) for v in value]

    def path(
        self, key: str = "path", required: bool = True, kind: str = "file", default: Path | None = None
    ) -> Path | None:
        """An existing file or folder; relative paths resolve against the current directory."""
        value = self.data.get(key)
        if value is None:
            if default is not None:
                return default
            if required:
                raise self.error(key, "is required", f"set {key}: to the {kind} holding the data")
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a path, got {value!r}")
        path = Path(value).expanduser()
        if not path.exists():
            raise self.error(
                key,
                f"{kind} not found: {path}",
                "check the path (relative paths in a scenario resolve against the YAML file's folder)",
            )
        if kind == "folder" and not path.is_dir():
            raise self.error(key, f"is not a folder: {path}")
        if kind == "file" and not path.is_file():
            raise self.error(key, f"is not a file: {path}")
        return path

    def alias(self, *names: str) -> tuple[str, str] | tuple[None, None]:
        """The one of several spellings of a key that is set: (key, value)."""
        found = [(n, self.data[n]) for n in names if self.data.get(n) is not None]
        if len(found) > 1:
            raise self.error(
                found[1][0], f"sets the same thing as {found[0][0]}", f"keep only one of {', '.join(names)}"
            )
        if not found:
            return None, None
        key, value = found[0]
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise self.error(key, f"expected a column/key name, got {value!r}")
        return key, str(value)

    def partition(self) -> PartitionSpec | None:
        raw = self.data.get("partition")
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise self.error("partition", f"expected a mapping {{index, count, alpha, by}}, got {raw!r}")
        for key in raw:
            if key not in PARTITION_KEYS:
                raise self.error(f"partition.{key}", "unknown key", did_you_mean(str(key), PARTITION_KEYS))
        count, index = raw.get("count"), raw.get("index")
        for key, value in (("count", count), ("index", index)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.error(
                    f"partition.{key}",
                    f"expected an integer, got {value!r}",
                    "partition: {index: i, count: n} takes slice i of n (0 <= i < n)",
                )
        if count < 1:
            raise self.error("partition.count", f"must be >= 1, got {count}")
        if not 0 <= index < count:
            raise self.error("partition.index", f"must be in [0, {count - 1}] for count {count}, got {index}")
        alpha = raw.get("alpha", 0.5)
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
            raise self.error("partition.alpha", f"must be a positive number or null (IID), got {alpha!r}")
        by = raw.get("by")
        if by is not None and not isinstance(by, str):
            raise self.error("partition.by", f"expected a key name, got {by!r}")
        return PartitionSpec(index=index, count=count, alpha=None if alpha is None else float(alpha), by=by)
