"""all_finite: the sum-based check says exactly what torch.isfinite(t).all() says."""

from __future__ import annotations

import pytest
import torch

from tap_core.finite import all_finite

MAX32 = torch.finfo(torch.float32).max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("special", [None, float("nan"), float("inf"), -float("inf")])
def test_agrees_with_isfinite(dtype, special):
    tensor = torch.randn(1000, 17).to(dtype)
    if special is not None:
        tensor[613, 5] = special
    assert all_finite(tensor) == bool(torch.isfinite(tensor).all()) == (special is None)


def test_finite_values_whose_sum_overflows_are_finite():
    huge = torch.full((64,), MAX32)  # the float32 sum is inf; every element is finite
    assert not torch.isfinite(huge.sum()) and all_finite(huge)
    mixed = torch.tensor([MAX32, -MAX32, float("inf")])  # inf hidden behind a cancelling pair is still found
    assert not all_finite(mixed)
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))  # sums to NaN


def test_edge_cases():
    assert (
        all_finite(torch.empty(0, 3)) and all_finite(torch.tensor(2.5)) and not all_finite(torch.tensor(float("nan")))
    )
    assert all_finite(torch.arange(10))  # integers are always finite
    strided = torch.randn(40, 30).t()
    strided[3, 7] = float("nan")
    assert not strided.is_contiguous() and not all_finite(strided)
    assert all_finite(torch.randn(5, requires_grad=True))
