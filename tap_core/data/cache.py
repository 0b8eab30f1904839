"""A small on-disk cache of decoded arrays under ``$TAP_CACHE_DIR`` (default ~/.cache/tap).

Entries are .npz files written atomically (temp file + rename), so concurrent
loaders never read half a file; an unreadable or stale entry is rebuilt, and a
read-only cache folder just means no caching.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np


def cache_dir() -> Path:
    return Path(os.environ.get("TAP_CACHE_DIR") or Path.home() / ".cache" / "tap").expanduser()


def cached_arrays(
    name: str, build: Callable[[], dict[str, np.ndarray]], is_valid: Callable[[dict[str, np.ndarray]], bool]
) -> dict[str, np.ndarray]:
    """The arrays stored under ``name``, building and storing them on a miss."""
    path = cache_dir() / f"{name}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
            if is_valid(arrays):
                return arrays
        except (OSError, ValueError, EOFError):
            pass  # corrupt entry: rebuild below
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, **arrays)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # caching is an optimisation only
    return arrays
