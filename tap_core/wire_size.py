"""Sizes of component payloads at a wire dtype (what the report's ``wire`` counts)."""

from __future__ import annotations

from typing import Mapping

import torch

WIRE_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bytes_per_element(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def payload_bytes(values: Mapping[str, Mapping[str, torch.Tensor]], dtype: str) -> int:
    """Raw tensor bytes of ``values`` at wire dtype ``dtype`` (no framing)."""
    return sum(t.numel() for tensors in values.values() for t in tensors.values()) * bytes_per_element(dtype)


def quantize(values: Mapping[str, Mapping[str, torch.Tensor]], dtype: str) -> dict[str, dict[str, torch.Tensor]]:
    """What the receiver sees after a round trip through the wire dtype (fp32 values back)."""
    wire = WIRE_TORCH_DTYPES[dtype]
    if wire == torch.float32:
        return {c: dict(t) for c, t in values.items()}
    return {c: {n: t.to(wire).to(torch.float32) for n, t in ts.items()} for c, ts in values.items()}


def layout_bytes(layout: Mapping[str, list[tuple[str, tuple[int, ...]]]], dtype: str) -> int:
    """Raw bytes of every tensor of a layout (component -> [(name, shape)]) at ``dtype``."""
    elements = 0
    for tensors in layout.values():
        for _, shape in tensors:
            count = 1
            for dim in shape:
                count *= int(dim)
            elements += count
    return elements * bytes_per_element(dtype)
