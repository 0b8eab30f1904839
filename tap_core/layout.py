"""The tensor layout: which trainable tensors (name, shape) each component holds, in wire order.

Both ends derive it from the same plan (the server sends it with an assignment);
the codec refers to tensors by their position in it, validation checks uploads
against it, and the sizes below are what the report's ``wire`` counts.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from tap_core.wire_dtype import bytes_per_element

Layout = dict[str, list[tuple[str, tuple[int, ...]]]]  # component -> ordered (tensor name, shape)


def select(layout: Layout, components: Iterable[str]) -> Layout:
    """The part of ``layout`` holding ``components`` (in that order)."""
    return {c: layout[c] for c in components}


def layout_bytes(layout: Layout, dtype: str) -> int:
    """Raw bytes of every tensor of ``layout`` at wire dtype ``dtype`` (no framing)."""
    elements = 0
    for tensors in layout.values():
        for _, shape in tensors:
            count = 1
            for dim in shape:
                count *= int(dim)
            elements += count
    return elements * bytes_per_element(dtype)


def payload_bytes(values: Mapping[str, Mapping[str, torch.Tensor]], dtype: str) -> int:
    """Raw tensor bytes of ``values`` at wire dtype ``dtype`` (no framing)."""
    return sum(t.numel() for tensors in values.values() for t in tensors.values()) * bytes_per_element(dtype)


def layout_to_json(layout: Layout) -> dict[str, list[list[Any]]]:
    return {c: [[name, list(shape)] for name, shape in tensors] for c, tensors in layout.items()}


def layout_from_json(data: Mapping[str, list[list[Any]]]) -> Layout:
    return {
        str(c): [(str(name), tuple(int(d) for d in shape)) for name, shape in tensors] for c, tensors in data.items()
    }
