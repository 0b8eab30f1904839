"""What one silo declares or sends is bounded and its conflicts are refused to it, never to another (no network).

The same attacks over mTLS, as a hostile silo runs them: test_attacks.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TASKS, tiny_config
from tap_core.config import AggregationConfig, LimitsConfig, TaskSpec
from tap_core.errors import Rejected
from tap_core.messages import ClientUpdate, ReplacementEvent, RoundStats, SiloDeclaration, SiloResult, TaskResult
from tap_core.model import build_backbone
from tap_server.federation import TRAINING, WAITING, Federation
from tap_server.metrics import ServerMetrics

TEXT = TaskSpec("reviews", "classification", ("text",))
IMAGE = TaskSpec("shapes", "classification", ("image",))


@pytest.fixture(scope="module")
def fingerprint() -> str:
    return build_backbone(tiny_config().model).fingerprint


def declare(
    fingerprint: str, silo: str, task: TaskSpec, labels: list[str], samples: int = 10, **fields
) -> SiloDeclaration:
    seen = {task.name: labels} if task.kind == "classification" else {}
    return SiloDeclaration(silo, (task,), {task.name: samples}, seen, fingerprint, **fields)


def refused(federation: Federation, decl: SiloDeclaration, reason: str, words: str = "") -> Rejected:
    joined = federation.status().joined
    with pytest.raises(Rejected, match=words) as info:
        federation.register(decl)
    assert info.value.reason == reason, str(info.value)
    assert federation.status().joined == joined  # nothing of it was kept
    return info.value


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(device="x" * 300), "device: 300 characters"),
        (
            dict(
                tasks=(dataclasses.replace(TASKS["colour"], name="t" * 200),),
                train_samples={"t" * 200: 5},
                labels_seen={},
            ),
            "names are 1 to 128 characters",
        ),
        (dict(tasks=(dataclasses.replace(TASKS["colour"], domain="d" * 200),)), "names are 1 to 128 characters"),
        (
            dict(tasks=(dataclasses.replace(TASKS["colour"], labels=tuple(f"l{i}" for i in range(10_001))),)),
            "10001 declared labels, at most 10000",
        ),
        (dict(tasks=(dataclasses.replace(TASKS["colour"], labels=("red", "x" * 201)),)), "a label of 201 characters"),
        (dict(labels_seen={"colour": ["red", "y" * 201]}), "a label of 201 characters"),
        (dict(tasks=(dataclasses.replace(TASKS["colour"], data={"path": "/etc/passwd"}),)), "carries no data settings"),
        (
            dict(
                tasks=(dataclasses.replace(TASKS["colour"], labels=("red", "green")),), labels_seen={"colour": ["blue"]}
            ),
            "not in its declared labels",
        ),
        (dict(fingerprint="f" * 1000), "a SHA-256 in hex has 64"),
        (dict(train_samples={"colour": 2_000_000_000}), "limits.max_train_samples"),
    ],
)
def test_declarations_out_of_bounds_are_refused(change, words, fingerprint):
    config = tiny_config()
    federation = Federation(config, expected_silos=3)
    decl = dataclasses.replace(declare(fingerprint, "b", TASKS["colour"], ["red", "green"]), **change)
    error = refused(federation, decl, "bad_declaration", words)
    assert error.status == "FAILED_PRECONDITION"


def test_the_labels_of_all_a_silos_tasks_are_bounded_together(fingerprint):
    config = dataclasses.replace(tiny_config(), limits=LimitsConfig(max_labels_per_task=100, max_labels_per_silo=150))
    federation = Federation(config, expected_silos=3)
    tasks = tuple(dataclasses.replace(TASKS["colour"], name=f"t{i}") for i in range(2))
    decl = SiloDeclaration(
        "b", tasks, {t.name: 5 for t in tasks}, {t.name: [f"l{i}" for i in range(80)] for t in tasks}, fingerprint
    )
    refused(federation, decl, "bad_declaration", "160 labels over the silo's tasks, at most 150")


def test_a_conflicting_label_list_is_refused_to_the_silo_that_declares_it(fingerprint):
    """Attack 3: the hostile silo declares the honest silo's task with its own list; the honest start goes on."""
    federation = Federation(tiny_config(), expected_silos=2)
    federation.register(declare(fingerprint, "honest-a", TEXT, ["neg", "pos"]))
    hostile = declare(fingerprint, "hostile", dataclasses.replace(TEXT, labels=("x", "y")), ["x"])
    refused(federation, hostile, "tasks_conflict", "label 'neg' occurs in a silo's data but not in the declared list")
    assert federation.register(declare(fingerprint, "honest-b", IMAGE, ["a", "b"])).started
    assert federation.status().joined == ("honest-a", "honest-b")


def test_the_start_never_fails_because_of_another_silos_one_label_task(fingerprint, clock):
    config = dataclasses.replace(tiny_config(), min_clients=2)
    federation = Federation(config, expected_silos=3, clock=clock)
    federation.register(declare(fingerprint, "honest-a", TEXT, ["neg", "pos"]))
    lonely = declare(fingerprint, "hostile", dataclasses.replace(TEXT, name="lonely"), ["only"])
    federation.register(lonely)  # alone, one label is fine: another silo may bring more
    registration = federation.register(declare(fingerprint, "honest-b", IMAGE, ["a", "b"]))
    assert not registration.started and registration.registered == 2  # the honest last joiner is kept...
    status = federation.status()
    assert status.phase == WAITING and status.joined == ("honest-a", "honest-b")  # ...the holder of 'lonely' is not
    error = refused(federation, lonely, "tasks_conflict", "task lonely has 1 label")  # told when it joins again
    assert "hostile" in str(error)
    clock.now += config.deadlines.join_s + 1
    assert federation.tick().phase == TRAINING  # the honest silos start at the join deadline
    assert federation.status().joined == ("honest-a", "honest-b")


def test_a_joiner_that_holds_the_incomplete_task_is_the_one_refused(fingerprint):
    federation = Federation(tiny_config(), expected_silos=2)
    federation.register(declare(fingerprint, "x", TEXT, ["neg"]))
    refused(federation, declare(fingerprint, "y", TEXT, ["neg"]), "tasks_conflict", "at least 2 labels")
    assert federation.status().joined == ("x",)


def test_labels_added_to_a_shared_task_are_bounded_across_the_federation(fingerprint):
    config = dataclasses.replace(tiny_config(), limits=LimitsConfig(max_labels_per_task=50, max_labels_per_silo=100))
    federation = Federation(config, expected_silos=3)
    shared = dataclasses.replace(TEXT, shared_labels=True)
    federation.register(declare(fingerprint, "honest", shared, [f"h{i}" for i in range(30)]))
    refused(
        federation,
        declare(fingerprint, "adder", shared, [f"a{i}" for i in range(30)]),
        "tasks_conflict",
        "would have 60 labels across the federation",
    )
    assert federation.status().joined == ("honest",)


def test_a_declaration_that_would_make_another_silos_plan_too_large_is_refused(fingerprint):
    """The plan travels in one message; the join that would push any silo's plan past the bound is refused."""
    config = dataclasses.replace(tiny_config(), limits=LimitsConfig(max_plan_bytes=8192))
    federation = Federation(config, expected_silos=3)
    shared = dataclasses.replace(TEXT, shared_labels=True)
    federation.register(declare(fingerprint, "honest", shared, ["neg", "pos"]))
    long_labels = ["\u4e00" * 190 + str(i) for i in range(10)]  # JSON escapes each character as 6 bytes
    error = refused(
        federation,
        declare(fingerprint, "bloater", shared, long_labels),
        "oversize",
        "the plan of silo (bloater|honest) would take",
    )
    assert error.status == "RESOURCE_EXHAUSTED" and "limits.max_plan_bytes" in str(error)
    federation.register(declare(fingerprint, "fine", shared, ["neg", "maybe"]))
    assert federation.status().joined == ("fine", "honest")


# ------------------------------------------------------------------ robust aggregation


def _both_on_one_task(fingerprint, config, samples, metrics=None, clock=None):
    federation = Federation(config, expected_silos=len(samples), metrics=metrics, **({"clock": clock} if clock else {}))
    for silo, count in samples.items():
        federation.register(declare(fingerprint, silo, TEXT, ["neg", "pos"], count))
    payload = {silo: federation.payload(silo, 1) for silo in samples}
    return federation, payload


def _update(silo, payload, values, samples):
    return ClientUpdate(silo, payload.round, values, {c: float(samples) for c in payload.layout}, RoundStats())


def test_a_capped_silo_pulls_the_aggregate_only_its_share(fingerprint):
    config = dataclasses.replace(tiny_config(rounds=1), aggregation=AggregationConfig(max_weight_share=0.5))
    samples = {"honest": 10, "heavy": 1_000_000_000}
    metrics = ServerMetrics()
    federation, payload = _both_on_one_task(fingerprint, config, samples, metrics)
    start = payload["honest"].values
    moved = {c: {n: t + 0.04 for n, t in ts.items()} for c, ts in start.items()}
    federation.submit_update(_update("heavy", payload["heavy"], moved, samples["heavy"]))
    federation.submit_update(_update("honest", payload["honest"], start, samples["honest"]))
    after = federation.global_values()
    for component, tensors in start.items():
        for name, tensor in tensors.items():
            assert torch.allclose(after[component][name], tensor + 0.02, atol=1e-6)  # half way, not all the way
    assert metrics.registry.get_sample_value("tap_weights_capped_total") == 1


def test_an_update_far_beyond_the_global_norm_is_refused_and_leaves_no_trace(fingerprint):
    config = tiny_config(rounds=1)
    samples = {"honest": 10, "poisoner": 1_000_000_000}
    federation, payload = _both_on_one_task(fingerprint, config, samples)
    poison = {c: {n: torch.full_like(t, 1e30) for n, t in ts.items()} for c, ts in payload["poisoner"].values.items()}
    with pytest.raises(Rejected, match="aggregation.max_update_norm_ratio") as info:
        federation.submit_update(_update("poisoner", payload["poisoner"], poison, samples["poisoner"]))
    assert info.value.reason == "update_norm" and federation.status().received == ()
    nan_stats = RoundStats(replacements=[ReplacementEvent(1, "reviews", float("nan"), 1.0, 0.01, [])])
    with pytest.raises(Rejected) as info:
        federation.submit_update(
            dataclasses.replace(_update("honest", payload["honest"], payload["honest"].values, 10), stats=nan_stats)
        )
    assert info.value.reason == "non_finite" and federation.status().received == ()


def _poison(payload):
    return {c: {n: torch.full_like(t, 1e30) for n, t in ts.items()} for c, ts in payload.values.items()}


def _moved(payload, by):
    return {c: {n: t + by for n, t in ts.items()} for c, ts in payload.values.items()}


@pytest.mark.parametrize("poisoner_turn", [0, 1, 2])
def test_a_refused_update_does_not_hold_the_others_round(fingerprint, poisoner_turn):
    """The round closes as soon as every other selected silo delivered, on their updates alone, at any turn."""
    samples = {"honest-a": 10, "honest-b": 30, "poisoner": 1_000_000_000}
    federation, payload = _both_on_one_task(fingerprint, tiny_config(rounds=1), samples)
    updates = {"honest-a": _moved(payload["honest-a"], 0.01), "honest-b": _moved(payload["honest-b"], -0.03)}
    order = ["honest-a", "honest-b"]
    order.insert(poisoner_turn, "poisoner")
    for silo in order:
        if silo == "poisoner":
            with pytest.raises(Rejected) as info:
                federation.submit_update(_update(silo, payload[silo], _poison(payload[silo]), samples[silo]))
            assert info.value.reason == "update_norm"
        else:
            assert federation.status().phase == TRAINING  # nothing closed before the last honest update
            federation.submit_update(_update(silo, payload[silo], updates[silo], samples[silo]))
    assert federation.status().phase == "finishing"  # closed without waiting for the round deadline
    after = federation.global_values()
    for component, tensors in payload["honest-a"].values.items():
        for name, tensor in tensors.items():  # (10 x +0.01 + 30 x -0.03) / 40 = -0.02
            assert torch.allclose(after[component][name], tensor - 0.02, atol=1e-6)
    record = federation.report()["history"][-1]
    assert record["refused"] == {"poisoner": "update_norm"} and record["dropped"] == ["poisoner"]
    assert record["received"] == ["honest-a", "honest-b"]


def test_a_refused_silo_may_still_deliver_a_valid_update_before_the_round_closes(fingerprint):
    samples = {"honest": 10, "clumsy": 10}
    federation, payload = _both_on_one_task(fingerprint, tiny_config(rounds=1), samples)
    with pytest.raises(Rejected):
        federation.submit_update(_update("clumsy", payload["clumsy"], _poison(payload["clumsy"]), 10))
    federation.submit_update(_update("clumsy", payload["clumsy"], _moved(payload["clumsy"], 0.02), 10))
    assert federation.status().received == ("clumsy",) and federation.status().phase == TRAINING
    federation.submit_update(_update("honest", payload["honest"], payload["honest"].values, 10))
    record = federation.report()["history"][-1]
    assert record["received"] == ["clumsy", "honest"] and "refused" not in record


def test_with_too_few_valid_updates_the_round_waits_for_its_deadline_and_is_retried(fingerprint, clock):
    config = dataclasses.replace(tiny_config(rounds=1), min_clients=2)
    samples = {"honest": 10, "poisoner": 10}
    federation, payload = _both_on_one_task(fingerprint, config, samples, clock=clock)
    federation.submit_update(_update("honest", payload["honest"], payload["honest"].values, 10))
    with pytest.raises(Rejected):
        federation.submit_update(_update("poisoner", payload["poisoner"], _poison(payload["poisoner"]), 10))
    status = federation.status()
    assert status.phase == TRAINING and status.received == ("honest",)  # 1 < min_clients: not closed early
    clock.now += config.deadlines.round_s + 1
    status = federation.tick()
    assert status.phase == TRAINING and status.round == 1 and status.received == ()  # the round is tried again
    assert federation.report()["history"] == []


def test_a_revoked_silo_is_not_waited_for_in_a_round_nor_selected_again(fingerprint):
    samples = {"honest-a": 10, "honest-b": 30, "rogue": 10}
    federation, payload = _both_on_one_task(fingerprint, tiny_config(rounds=2), samples)
    for silo in ("honest-a", "honest-b"):
        federation.submit_update(_update(silo, payload[silo], payload[silo].values, samples[silo]))
    assert federation.status().round == 1  # waiting for the rogue's update
    federation.withdraw({"rogue"})
    status = federation.status()
    assert status.round == 2 and status.selected == ("honest-a", "honest-b")  # closed at once; not selected again
    assert federation.report()["history"][-1]["refused"] == {"rogue": "revoked"}
    federation.withdraw(set())  # provisioned again: selected from the next round on
    for silo in ("honest-a", "honest-b"):
        federation.submit_update(
            _update(silo, federation.payload(silo, 2), federation.payload(silo, 2).values, samples[silo])
        )
    assert federation.status().phase == "finishing"


def test_a_revoked_silo_is_not_waited_for_at_the_finish_nor_before_the_start(fingerprint):
    samples = {"honest": 10, "rogue": 10}
    federation, payload = _both_on_one_task(fingerprint, tiny_config(rounds=1), samples)
    for silo in samples:
        federation.submit_update(_update(silo, payload[silo], payload[silo].values, samples[silo]))
    federation.submit_result(SiloResult("honest", [TaskResult("honest", "reviews", "classification", {"a": 0.5}, 0.5)]))
    assert federation.status().phase == "finishing"
    federation.withdraw({"rogue"})
    assert federation.status().phase == "done"
    assert {"phase": "finish", "silos": ["rogue"]} in federation.report()["dropped"]

    waiting = Federation(tiny_config(), expected_silos=3)
    for silo in ("honest", "rogue"):
        waiting.register(declare(fingerprint, silo, TEXT, ["neg", "pos"]))
    waiting.withdraw({"rogue", "never-joined"})
    assert waiting.status().joined == ("honest",)


def test_results_are_bounded_and_match_the_plan(fingerprint):
    config = tiny_config(rounds=1)
    samples = {"a": 10, "b": 6}
    federation, payload = _both_on_one_task(fingerprint, config, samples)
    for silo in samples:
        federation.submit_update(_update(silo, payload[silo], payload[silo].values, samples[silo]))
    good = TaskResult("a", "reviews", "classification", {"accuracy": 0.5}, 0.5)
    for result, reason, words in (
        (SiloResult("a", [dataclasses.replace(good, kind="k" * 1000)]), "bad_result", "the plan says classification"),
        (
            SiloResult("a", [dataclasses.replace(good, metrics={f"m{i}": 0.5 for i in range(33)})]),
            "bad_result",
            "33 metrics for one task",
        ),
        (SiloResult("a", [dataclasses.replace(good, metrics={"m" * 200: 0.5})]), "bad_result", "names are 1 to 128"),
        (
            SiloResult("a", [good], stage1_metrics={"reviews": {f"m{i}": 0.5 for i in range(40)}}),
            "bad_result",
            "40 metrics",
        ),
    ):
        with pytest.raises(Rejected, match=words) as info:
            federation.submit_result(result)
        assert info.value.reason == reason
    federation.submit_result(SiloResult("a", [good]))
    assert federation.status().results == ("a",)
