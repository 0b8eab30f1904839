"""The wire dtypes (fp32, bf16, fp16): their torch dtype, their size, and the rounding a round trip applies."""

from __future__ import annotations

from typing import Mapping

import torch

WIRE_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bytes_per_element(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def quantize(values: Mapping[str, Mapping[str, torch.Tensor]], dtype: str) -> dict[str, dict[str, torch.Tensor]]:
    """What the receiver sees after a round trip through the wire dtype (fp32 values back)."""
    wire = WIRE_TORCH_DTYPES[dtype]
    if wire == torch.float32:
        return {c: dict(t) for c, t in values.items()}
    return {c: {n: t.to(wire).to(torch.float32) for n, t in ts.items()} for c, ts in values.items()}
