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


def capped_weights(declared: Mapping[str, Mapping[str, float]],
                   max_share: float | None) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """Per silo and component, the weight it aggregates with: at most ``max_share`` of the component's total.

    ``declared``: silo -> component -> weight from its declaration. For each component the largest weights
    are lowered to one level C chosen so that C is exactly ``max_share`` of the new total (water-filling);
    when that is impossible (fewer than 1/max_share silos hold the component) every holder gets the same
    weight. Returns the weights and, per silo, the components where its weight was capped. The weights
    depend on the declarations and the selection only: the aggregate stays a sum of per-silo contributions
    with weights known before any update arrives.
    """
    weights = {silo: dict(components) for silo, components in declared.items()}
    capped: dict[str, list[str]] = {}
    if max_share is None or max_share >= 1:
        return weights, capped
    holders: dict[str, dict[str, float]] = {}
    for silo, components in declared.items():
        for component, weight in components.items():
            if weight > 0:
                holders.setdefault(component, {})[silo] = weight
    for component, by_silo in sorted(holders.items()):
        level = _cap_level(sorted(by_silo.values(), reverse=True), max_share)
        for silo, weight in by_silo.items():
            if weight > level:
                weights[silo][component] = level
                capped.setdefault(silo, []).append(component)
    return weights, capped


def _cap_level(descending: list[float], share: float) -> float:
    """The level C with min(w, C) summing so that C = share x total; the smallest weight if none exists."""
    rest = sum(descending)
    for k, weight in enumerate(descending):  # k weights above the level, the rest below it
        if k * share >= 1:
            break
        level = share * rest / (1 - k * share)
        if level >= weight:
            return float("inf") if k == 0 else level
        rest -= weight
    return descending[-1]
