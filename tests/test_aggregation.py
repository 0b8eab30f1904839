"""Aggregation: the streaming weighted mean, order independence, and what the federation folds in per component."""

from __future__ import annotations

import itertools

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
