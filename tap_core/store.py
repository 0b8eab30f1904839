"""Atomic on-disk state: JSON + safetensors, written temp-file, fsync, rename.

Used by the server (federation state + global components) and by the client
agent (personal model + histories). A reader never sees a half-written file:
each checkpoint writes a new, uniquely named tensor file first, then replaces
the JSON that points at it, then removes the previous tensor file.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tap_core import atomic_files
from tap_core.errors import ConfigError, TapError
from tap_core.model.tap_model import ComponentValues

R = TypeVar("R", bound="JsonRecord")
SEPARATOR = "/"  # component names contain dots, local names too: "encoder.image/proj.weight"


def flatten(values: ComponentValues) -> dict[str, torch.Tensor]:
    return {f"{c}{SEPARATOR}{n}": t.contiguous() for c, tensors in values.items() for n, t in tensors.items()}


def unflatten(flat: dict[str, torch.Tensor]) -> ComponentValues:
    values: ComponentValues = {}
    for key, tensor in flat.items():
        component, _, name = key.partition(SEPARATOR)
        values.setdefault(component, {})[name] = tensor
    return values


def atomic_save_tensors(path: Path, values: ComponentValues, metadata: dict[str, str] | None = None) -> None:
    with atomic_files.atomic_file(path) as tmp:  # looked up at call time (tap_testing.faults patches it)
        try:
            save_file(flatten(values), tmp, metadata=metadata)
        except SafetensorError as exc:  # an I/O failure (a full disk) is a SafetensorError, not an OSError
            found = re.search(r"os error (\d+)", str(exc))
            code = int(found.group(1)) if found else errno.EIO
            raise OSError(code, os.strerror(code), str(path)) from exc


def load_tensors(path: Path) -> ComponentValues:
    try:
        return unflatten(load_file(str(path)))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise TapError(f"cannot read {path}: {exc}") from exc


class CheckpointStore:
    """A directory holding ``<name>.json`` that points at the current ``<name>-<tag>.safetensors``."""

    def __init__(self, directory: Path, name: str):
        self.directory = Path(directory)
        self.name = name
        self.json_path = self.directory / f"{name}.json"

    def exists(self) -> bool:
        return self.json_path.is_file()

    def check_writable(self) -> None:
        """Refuse now, saying why, a directory no checkpoint could be written to (ConfigError)."""
        probe = self.directory / f".{self.name}.write-test"
        try:
            atomic_files.atomic_write_bytes(probe, b"ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                str(self.directory),
                f"cannot write there ({exc.strerror or exc})",
                "give a directory this user can write, on a volume mounted read-write with free space",
            ) from exc

    def save(self, state: dict[str, Any], values: ComponentValues | None, tag: str) -> None:
        """Write tensors (if given) under a new file, then the JSON pointing at it."""
        previous = self._tensor_file(self.load_json()) if self.exists() else None
        state = dict(state)
        if values is not None:
            tensor_file = f"{self.name}-{tag}.safetensors"
            atomic_save_tensors(self.directory / tensor_file, values)
            state["tensor_file"] = tensor_file
        elif previous is not None:
            state["tensor_file"] = previous
        atomic_files.atomic_write_json(self.json_path, state)
        if previous and previous != state.get("tensor_file"):
            (self.directory / previous).unlink(missing_ok=True)
        self._remove_leftovers(keep=state.get("tensor_file"))

    def _remove_leftovers(self, keep: str | None) -> None:
        """What a writer killed mid-checkpoint left behind: its temp files, and a tensor file no JSON points at
        (written just before the kill). Without this each crash would leave up to a whole model on disk."""
        for path in self.directory.glob(f".{self.name}*.tmp"):
            path.unlink(missing_ok=True)
        for path in self.directory.glob(f"{self.name}-*.safetensors"):
            if path.name != keep:
                path.unlink(missing_ok=True)

    def load_json(self) -> dict[str, Any]:
        try:
            return json.loads(self.json_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TapError(f"cannot read state {self.json_path}: {exc}") from exc

    def load(self) -> tuple[dict[str, Any], ComponentValues | None]:
        state = self.load_json()
        tensor_file = self._tensor_file(state)
        values = load_tensors(self.directory / tensor_file) if tensor_file else None
        return state, values

    @staticmethod
    def _tensor_file(state: dict[str, Any]) -> str | None:
        return state.get("tensor_file")


def json_codec(encode: Callable[[Any], Any], decode: Callable[[Any], Any]) -> dict[str, Any]:
    """Field metadata of a :class:`JsonRecord` field that is not plain JSON: how it is written and read."""
    return {"json": (encode, decode)}


def json_each(encode: Callable[[Any], Any], decode: Callable[[Any], Any]) -> dict[str, Any]:
    """Field metadata of a ``dict[str, X]`` field: ``encode``/``decode`` applied to each value."""
    return json_codec(
        lambda d: {k: encode(v) for k, v in sorted(d.items())}, lambda d: {str(k): decode(v) for k, v in d.items()}
    )


NOT_IN_JSON = {"json": None}  # field metadata: persisted elsewhere (tensors) or not at all


class JsonRecord:
    """A dataclass persisted as one JSON object, each field named once: in the class.

    Fields convert with their ``json_codec`` metadata, or as they are (plain JSON);
    a key missing when reading keeps the field's default.
    """

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            codec = f.metadata.get("json", ())
            if codec is None:
                continue
            value = getattr(self, f.name)
            out[f.name] = codec[0](value) if codec else value
        return out

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any], **extra: Any) -> R:
        kwargs = dict(extra)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            codec = f.metadata.get("json", ())
            if codec is None or f.name not in data:
                continue
            kwargs[f.name] = codec[1](data[f.name]) if codec else data[f.name]
        return cls(**kwargs)
