"""Seeded splits: test carving, non-IID partitions, caps and the validation split.

Everything here depends only on the data seed (never on the run seed), so
every silo that loads the same source with the same seed and count computes
the same partition and keeps its own disjoint slice of it.

Partitions work on *units*: rows, or groups of rows (all questions of one
image) when the partition key is constant within a group.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Independent random streams per purpose: np.random.default_rng([seed, STREAM]).
TEST_SPLIT, PARTITION, PARTITION_TEST, CAP_TRAIN, CAP_TEST, VAL = 1, 2, 3, 4, 5, 6
MAX_TRIES = 1000  # Dirichlet redraws until no slice is tiny (checked on sizes: cheap)
MIN_SHARE = 0.4  # ... i.e. every slice holds at least this fraction of an even share


def rng_for(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def units_of(n: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(unit id of each row, first row of each unit); units are rows when ungrouped."""
    if groups is None:
        rows = np.arange(n)
        return rows, rows
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    return inverse.reshape(-1), first


def rows_of(unit_of_row: np.ndarray, units: np.ndarray) -> np.ndarray:
    mask = np.zeros(int(unit_of_row.max(initial=-1)) + 1, dtype=bool)
    mask[units] = True
    return np.flatnonzero(mask[unit_of_row]) if len(unit_of_row) else np.zeros(0, dtype=np.int64)


def split_test(n: int, groups: np.ndarray | None, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train rows, test rows) for a source without its own test split."""
    unit_of_row, first = units_of(n, groups)
    n_units = len(first)
    order = rng_for(seed, TEST_SPLIT).permutation(n_units)
    n_test = min(max(1, int(round(n_units * test_fraction))), n_units - 1) if n_units >= 2 else 0
    return rows_of(unit_of_row, order[n_test:]), rows_of(unit_of_row, order[:n_test])


def _split_classes(
    keys: np.ndarray, classes: list[str], shares: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split each class's members among slices in proportion to ``shares[class]``."""
    count = shares.shape[1]
    parts: list[list[np.ndarray]] = [[] for _ in range(count)]
    for c, name in enumerate(classes):
        members = rng.permutation(np.flatnonzero(keys == name))
        bounds = np.round(np.cumsum(shares[c])[:-1] * len(members)).astype(int)
        for j, piece in enumerate(np.split(members, bounds)):
            parts[j].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def partition_units(
    train_keys: Sequence[str] | None,
    test_keys: Sequence[str] | None,
    n_train: int,
    n_test: int,
    count: int,
    alpha: float | None,
    seed: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All ``count`` slices of the train units and of the test units.

    ``alpha=None`` (or no keys) is IID; otherwise each key value's units are
    split by Dirichlet(alpha) shares, the same shares for train and test, so a
    silo's test set follows its own label mix.
    """
    rng, rng_test = rng_for(seed, PARTITION), rng_for(seed, PARTITION_TEST)
    if alpha is None or train_keys is None:
        return (np.array_split(rng.permutation(n_train), count), np.array_split(rng_test.permutation(n_test), count))
    train_arr = np.asarray([str(k) for k in train_keys], dtype=object)
    test_arr = np.asarray([str(k) for k in (test_keys or [])], dtype=object)
    classes = sorted(set(train_arr.tolist()) | set(test_arr.tolist()))
    counts = np.array([np.count_nonzero(train_arr == c) for c in classes])
    need = max(1, int(MIN_SHARE * n_train / count))
    best: tuple[int, np.ndarray] | None = None
    for _ in range(MAX_TRIES):  # redraw (cheaply, on sizes only) until no slice is tiny
        shares = rng.dirichlet(np.full(count, alpha), size=len(classes))
        smallest = int(_slice_sizes(counts, shares).min())
        if best is None or smallest > best[0]:
            best = (smallest, shares)
        if smallest >= need:
            break
    shares = best[1]
    return _split_classes(train_arr, classes, shares, rng), _split_classes(test_arr, classes, shares, rng_test)


def _slice_sizes(counts: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Units per slice that ``_split_classes`` would produce (same rounding)."""
    bounds = np.round(np.cumsum(shares, axis=1)[:, :-1] * counts[:, None]).astype(int)
    edges = np.concatenate([np.zeros((len(counts), 1), int), bounds, counts[:, None]], axis=1)
    return np.diff(edges, axis=1).sum(axis=0)


def cap(rows: np.ndarray, limit: int | None, seed: int, stream: int) -> np.ndarray:
    """At most ``limit`` rows, a seeded random subset in the original order."""
    if limit is None or len(rows) <= limit:
        return rows
    return np.sort(rng_for(seed, stream).choice(rows, size=limit, replace=False))


def carve_val(
    rows: np.ndarray, groups: np.ndarray | None, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows): about ``val_fraction`` of the rows, at least 1 when there are 2.

    With groups, whole groups move to validation (no image in both splits),
    as long as there are at least two groups.
    """
    n = len(rows)
    if n < 2:
        return rows, rows[:0]
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    rng = rng_for(seed, VAL)
    if groups is not None:
        row_groups = groups[rows]
        unique, counts = np.unique(row_groups, return_counts=True)
        if len(unique) >= 2:
            perm = rng.permutation(len(unique))
            order, sizes = unique[perm], counts[perm]
            take = int(np.searchsorted(np.cumsum(sizes), n_val) + 1)
            take = min(take, len(order) - 1)
            in_val = np.isin(row_groups, order[:take])
            return rows[~in_val], rows[in_val]
    order = rng.permutation(n)
    return np.sort(rows[order[n_val:]]), np.sort(rows[order[:n_val]])
