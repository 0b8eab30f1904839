"""Checks on a client update before anything touches the aggregate.

Every rule raises :class:`UpdateRejected` with a short ``reason`` (the
Prometheus label, mapped to a gRPC status by the servicer) and a message that
says what was wrong and what was expected.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from tap_core.errors import WireError
from tap_core.messages import ClientUpdate

Manifest = Mapping[str, list[tuple[str, tuple[int, ...]]]]  # component -> ordered (name, shape)


class UpdateRejected(WireError):
    pass


def check_update(update: ClientUpdate, expected: Manifest, owned: set[str], expected_weights: Mapping[str, float]) -> None:
    """Raise UpdateRejected unless ``update`` holds exactly the expected, finite tensors.

    ``expected``: the components this silo must upload this round and their layout;
    ``owned``: every component of the silo (to tell 'foreign' from 'unknown');
    ``expected_weights``: the sample weights the silo's declaration implies.
    """
    for component in update.values:
        if component not in expected:
            if component in owned:
                raise UpdateRejected("unexpected_component", f"component {component} is not shared by this algorithm")
            raise UpdateRejected("foreign_component", f"component {component} is not one of this silo's components")
    missing = [c for c in expected if c not in update.values]
    if missing:
        raise UpdateRejected("missing_component", f"update lacks component {missing[0]} ({len(missing)} missing)")
    for component, layout in expected.items():
        tensors = update.values[component]
        names = dict(layout)
        for name in tensors:
            if name not in names:
                raise UpdateRejected("unknown_tensor", f"component {component} has no trainable tensor {name!r}")
        for name, shape in layout:
            if name not in tensors:
                raise UpdateRejected("missing_tensor", f"component {component} lacks tensor {name}")
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(shape):
                raise UpdateRejected("wrong_shape", f"{component}/{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            if not tensor.is_floating_point():
                raise UpdateRejected("wrong_dtype", f"{component}/{name}: dtype {tensor.dtype} is not floating point")
            if not bool(torch.isfinite(tensor).all()):
                raise UpdateRejected("non_finite", f"{component}/{name} contains NaN or infinite values")
    for component in expected:
        claimed = update.weights.get(component)
        if claimed is None or not math.isfinite(claimed) or abs(claimed - expected_weights.get(component, 0.0)) > 1e-6:
            raise UpdateRejected(
                "bad_weight",
                f"component {component}: sample weight {claimed} does not match the {expected_weights.get(component)} "
                f"training samples the silo declared at join",
            )
