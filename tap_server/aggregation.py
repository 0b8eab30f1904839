"""Streaming, per-component, sample-weighted averaging (TAP_SPEC §3.6).

One running sum per component tensor, never one copy per client: memory is
flat in the number of clients. Sums are kept in float64 and cast back to fp32,
so the order in which updates arrive changes the result only in the rare case
where float64 rounding differences survive the cast (tests check permutations
give identical results); components nobody uploaded keep their value.
"""

from __future__ import annotations

from typing import Mapping

import torch

from tap_core.model.tap_model import ComponentValues


class StreamingAggregator:
    def __init__(self) -> None:
        self._sums: dict[str, dict[str, torch.Tensor]] = {}
        self._weights: dict[str, float] = {}
        self.contributors: dict[str, int] = {}

    def add(self, values: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, float]) -> None:
        """Fold one (already validated) client update into the running sums."""
        for component, tensors in values.items():
            weight = float(weights[component])
            if weight <= 0:
                continue
            sums = self._sums.setdefault(component, {})
            for name, tensor in tensors.items():
                contribution = tensor.detach().to(torch.float64) * weight
                if name in sums:
                    sums[name] += contribution
                else:
                    sums[name] = contribution
            self._weights[component] = self._weights.get(component, 0.0) + weight
            self.contributors[component] = self.contributors.get(component, 0) + 1

    def result(self, current: ComponentValues) -> ComponentValues:
        """New global values: the weighted mean where anyone uploaded, ``current`` elsewhere."""
        out: ComponentValues = {}
        for component, tensors in current.items():
            total = self._weights.get(component, 0.0)
            if total <= 0:
                out[component] = tensors
                continue
            sums = self._sums[component]
            out[component] = {
                name: (sums[name] / total).to(torch.float32) if name in sums else value
                for name, value in tensors.items()
            }
        return out
