"""Deterministic seeds derived from names, so results never depend on process history.

Every random choice (a component's initial values, a phase's data order, the
clients picked for a round) draws from a seed derived from the run seed and the
names of what it is for. The same seed therefore gives the same numbers in
``tap simulate`` and in a deployed federation, whatever the arrival order.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts: derive_seed(0, "init", "head.vqa")."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def torch_seed(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the previous state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g
