"""Aggregation: the streaming weighted mean, order independence, and what the federation folds in per component."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import tiny_config
from tap_cli.simulate import run_federation
from tap_server.aggregation import StreamingAggregator


def test_aggregation_equals_the_naive_weighted_average_and_keeps_untouched_components():
    g = torch.Generator().manual_seed(0)
    current = {"a": {"w": torch.randn(3, 4, generator=g)}, "b": {"w": torch.randn(2, generator=g)}}
    updates = [({"a": {"w": torch.randn(3, 4, generator=g)}}, {"a": w}) for w in (10.0, 30.0, 5.0)]
    aggregator = StreamingAggregator()
    for values, weights in updates:
        aggregator.add(values, weights)
    result = aggregator.result(current)
    naive = sum(v["a"]["w"] * w["a"] for v, w in updates) / sum(w["a"] for _, w in updates)
    assert torch.allclose(result["a"]["w"], naive, atol=1e-6)
    assert torch.equal(result["b"]["w"], current["b"]["w"])
    assert result["a"]["w"].dtype == torch.float32


def test_aggregation_does_not_depend_on_arrival_order():
    g = torch.Generator().manual_seed(1)
    updates = [({"a": {"w": torch.randn(1000, generator=g)}}, {"a": float(w)}) for w in (3, 7, 11, 13)]
    results = []
    for order in itertools.permutations(updates):
        aggregator = StreamingAggregator()
        for values, weights in order:
            aggregator.add(values, weights)
        results.append(aggregator.result({"a": {"w": torch.zeros(1000)}})["a"]["w"])
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_fusion_components_change_in_a_round_and_are_aggregated(joined):
    """The authors' code never federated mote/mome/experts; here every fusion component moves and averages."""
    config = tiny_config("fedavg", rounds=1)
    federation, rts = joined(config)
    initial = federation.global_values()
    uploads = []
    original = federation.submit_update

    def capture(update):
        uploads.append(update)
        original(update)

    federation.submit_update = capture
    run_federation(rts, config, federation=federation)
    final = federation.global_values()
    fusion = [c for c in final if c.split(".")[0] in ("mote", "mome", "expert", "adapter")]
    assert len(fusion) > 10
    for component in fusion:
        changed = any(not torch.equal(initial[component][n], final[component][n]) for n in final[component])
        assert changed, f"{component} did not change"
        contributors = [u for u in uploads if component in u.values]
        total = sum(u.weights[component] for u in contributors)
        for name in final[component]:
            expected = sum(u.values[component][name].double() * u.weights[component] for u in contributors) / total
            assert torch.allclose(final[component][name], expected.float(), atol=1e-6), (component, name)
    # the weights are the silos' training samples of the tasks that use the component
    a = next(u for u in uploads if u.silo == "a")
    assert a.weights["proj.shared"] == 2 * 48 and a.weights["head.vqa"] == 48


def _old_arithmetic(updates):
    """What the aggregator computed before its numpy loops: whole-tensor float64 expressions."""
    total = None
    for tensor, weight in updates:
        contribution = tensor.to(torch.float64) * weight
        total = contribution if total is None else total + contribution
    return (total / sum(w for _, w in updates)).to(torch.float32)


def test_aggregation_is_bitwise_the_float64_expression_and_reuses_the_last_rounds_sums():
    g = torch.Generator().manual_seed(2)
    shapes = {"w": (700, 531), "b": (531,), "s": ()}  # more elements than one numpy slice, and a scalar
    previous = None
    pointers = []
    for round_index in range(3):
        updates = [
            ({"a": {n: torch.randn(s, generator=g) * 100 for n, s in shapes.items()}}, {"a": w})
            for w in (3.0, 0.1 * (round_index + 1), 17.0)
        ]
        aggregator = StreamingAggregator(previous=previous)
        for values, weights in updates:
            aggregator.add(values, weights)
        pointers.append(aggregator._sums["a"]["w"].data_ptr())
        result = aggregator.result({"a": {n: torch.zeros(s) for n, s in shapes.items()}})
        for name in shapes:
            expected = _old_arithmetic([(v["a"][name], w["a"]) for v, w in updates])
            assert torch.equal(result["a"][name], expected), (round_index, name)
        previous = aggregator
    assert pointers[0] == pointers[1] == pointers[2]  # the float64 sums stayed allocated between rounds


def test_squared_distance_is_the_float64_sum_over_slices_and_keeps_nan_and_inf():
    from tap_server.aggregation import SLICE, squared_distance

    generator = torch.Generator().manual_seed(3)
    a = torch.randn(SLICE * 2 + 17, generator=generator)  # more than one slice, and a ragged last one
    b = torch.randn(SLICE * 2 + 17, generator=generator)
    expected = float(((a.double() - b.double()) ** 2).sum())
    assert squared_distance(a, b) == pytest.approx(expected, rel=1e-12)
    assert squared_distance(a) == pytest.approx(float((a.double() ** 2).sum()), rel=1e-12)
    half = a.to(torch.bfloat16)  # numpy has no bf16: widened exactly
    assert squared_distance(half) == pytest.approx(float((half.double() ** 2).sum()), rel=1e-12)
    a[5] = float("nan")
    assert math.isnan(squared_distance(a, b))
    b[5], a[5] = 0.0, float("inf")
    assert math.isinf(squared_distance(a, b))
