"""The federation state machine's refusals and recoveries (no network)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest

from conftest import TASKS, tiny_config
from tap_core.algorithms import get_algorithm
from tap_core.errors import ConfigError, Rejected
from tap_core.messages import SiloDeclaration, SiloResult, TaskResult
from tap_core.model import build_backbone
from tap_cli.simulate import run_federation
from tap_server.federation import FINISHING, TRAINING, WAITING, Federation


def run_round(federation, runtimes, algorithm):
    status = federation.status()
    for silo in status.selected:
        federation.submit_update(
            algorithm.local_round(runtimes[silo], status.round, federation.payload(silo, status.round).values)
        )


@pytest.mark.parametrize(
    "change, reason",
    [
        (
            dict(tasks=(dataclasses.replace(TASKS["colour"], name="x/y"),), train_samples={"x/y": 5}),
            "must be non-empty",
        ),
        (dict(train_samples={"colour": 0}), "training samples"),
        (dict(train_samples={"other": 5}), "train_samples must name exactly"),
        (dict(labels_seen={"colour": [str(i) for i in range(20_000)]}), "at most 10000 labels"),
        (dict(tasks=(dataclasses.replace(TASKS["colour"], family="shared"),)), "not 'shared'"),
    ],
)
def test_invalid_declarations_are_refused(change, reason, make_runtimes):
    config = tiny_config()
    federation = Federation(config, expected_silos=3)
    with pytest.raises(Rejected, match=reason) as info:
        federation.register(dataclasses.replace(make_runtimes(config)["b"].declaration(), **change))
    assert info.value.reason == "bad_declaration" and info.value.status == "FAILED_PRECONDITION"
    assert federation.status().joined == ()


def test_after_the_start_a_rejoin_must_declare_the_same_and_newcomers_are_refused(joined):
    federation, rts = joined(tiny_config())
    registration = federation.register(rts["b"].declaration())  # an agent restart: same declaration, fine
    assert registration.registered == 3 and registration.started
    changed = dataclasses.replace(rts["b"].declaration(), train_samples={"colour": 1000})
    with pytest.raises(Rejected, match="other tasks, sample counts or labels") as info:
        federation.register(changed)
    assert info.value.reason == "declaration_changed"
    with pytest.raises(Rejected, match="after the federation started") as info:
        federation.register(dataclasses.replace(rts["b"].declaration(), silo="newcomer"))
    assert info.value.reason == "federation_started"


def test_completeness_is_checked_at_the_start_not_at_each_join():
    config = tiny_config()
    federation = Federation(config, expected_silos=2)
    fingerprint = build_backbone(config.model).fingerprint
    one_label = SiloDeclaration("x", (TASKS["colour"],), {"colour": 5}, {"colour": ["red"]}, fingerprint)
    assert not federation.register(one_label).started  # alone, a single label is fine: others may bring more
    same = dataclasses.replace(one_label, silo="y")
    with pytest.raises(Rejected, match="at least 2 labels") as info:
        federation.register(same)  # the start would need a 1-label head: refused, the federation keeps waiting
    assert info.value.reason == "tasks_conflict"
    status = federation.status()
    assert status.phase == WAITING and status.joined == ("x",)


def test_joins_survive_a_server_restart_before_the_first_round(tmp_path, make_runtimes):
    config = tiny_config()
    rts = make_runtimes(config)
    first = Federation(config, state_dir=tmp_path, expected_silos=3)
    first.register(rts["a"].declaration())
    del first
    resumed = Federation(config, state_dir=tmp_path, expected_silos=3)
    status = resumed.status()
    assert status.phase == WAITING and status.joined == ("a",)
    assert resumed.assignment("b").message == "not joined"  # an agent that gets this joins again


def test_resume_reads_the_plan_from_the_state_not_from_declarations(tmp_path, joined):
    config = tiny_config()
    federation, rts = joined(config, state_dir=tmp_path)
    assignments = {s: federation.assignment(s) for s in rts}
    state = json.loads((tmp_path / "state.json").read_text())
    state["declarations"]["b"]["labels_seen"]["colour"].append("eel")  # a tampered or stale declaration
    (tmp_path / "state.json").write_text(json.dumps(state))
    resumed = Federation(config, state_dir=tmp_path)
    for silo, before in assignments.items():
        after = resumed.assignment(silo)
        assert after.plan == before.plan and after.layout == before.layout and after.plan == resumed.silo_plan(silo)
    assert "eel" not in resumed.silo_plan("b").task("colour").labels


def test_state_written_by_an_older_server_is_refused_with_a_fix(tmp_path, joined):
    config = tiny_config()
    joined(config, state_dir=tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    state["version"] = 1
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="another version of tap-server.*new --state directory"):
        Federation(config, state_dir=tmp_path)


def test_results_with_non_finite_numbers_or_foreign_tasks_are_refused_and_nothing_is_stored(joined):
    config = tiny_config("fedavg", rounds=1)
    federation, rts = joined(config)
    run_round(federation, rts, get_algorithm(config))
    assert federation.status().phase == FINISHING
    good = TaskResult("b", "colour", "classification", {"accuracy": 0.5}, 0.5)
    bad = [
        (SiloResult("b", [good], stage1_metrics={"colour": {"accuracy": math.nan}}), "non_finite"),
        (SiloResult("b", [good], kd_losses={"someone-else": 0.1}), "bad_result"),
        (SiloResult("b", [good, good]), "bad_result"),
        (SiloResult("b", [good], seconds=math.inf), "non_finite"),
    ]
    for result, reason in bad:
        with pytest.raises(Rejected) as info:
            federation.submit_result(result)
        assert info.value.reason == reason
    assert federation.status().results == ()
    federation.submit_result(SiloResult("b", [good]))
    assert federation.status().results == ("b",)


def test_a_finish_deadline_without_results_still_writes_a_report(tmp_path, joined, clock):
    config = tiny_config("fedavg", rounds=1)
    federation, rts = joined(config, state_dir=tmp_path, clock=clock)
    run_round(federation, rts, get_algorithm(config))
    clock.now += config.deadlines.finish_s + 1
    assert federation.tick().phase == "done"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mean_primary"] is None and report["dropped"][0]["silos"] == ["a", "b", "c"]


def test_a_retried_round_counts_replacements_once(joined, clock):
    config = dataclasses.replace(tiny_config("tap", rounds=1), min_clients=3)
    federation, rts = joined(config, clock=clock)
    algorithm = get_algorithm(config)
    saved = algorithm.local_round(rts["a"], 1, federation.payload("a", 1).values)
    federation.submit_update(saved)
    clock.now += config.deadlines.round_s + 1
    status = federation.tick()  # only 1 of min_clients 3 updates: the round is retried
    assert status.phase == TRAINING and status.round == 1 and status.received == ()
    federation.submit_update(saved)  # the agent re-sends its saved update
    for sid in ("b", "c"):
        federation.submit_update(algorithm.local_round(rts[sid], 1, federation.payload(sid, 1).values))
    assert federation.report()["replacements"]["a"] == {"colour": 1, "vqa": 1}


def test_an_upload_is_admitted_only_in_its_round_once_from_a_selected_silo(joined):
    """The check before a stream is read is the one ``submit_update`` applies."""
    config = dataclasses.replace(tiny_config("fedavg", rounds=2), clients_per_round=2)
    federation, rts = joined(config)
    status = federation.status()
    (left_out,) = set(status.joined) - set(status.selected)
    first = status.selected[0]
    slot = federation.admit_upload(first, 1)
    assert slot.round == 1 and list(slot.layout) == rts[first].plan.components
    assert set(slot.layout) <= slot.known and len(slot.known) > len(slot.layout)
    update = get_algorithm(config).local_round(rts[first], 1, federation.payload(first, 1).values)
    for silo, round_index, reason in (
        (first, 0, "stale_round"),
        (first, 2, "future_round"),
        (left_out, 1, "not_selected"),
    ):
        for attempt in (
            functools.partial(federation.admit_upload, silo, round_index),
            functools.partial(federation.submit_update, dataclasses.replace(update, silo=silo, round=round_index)),
        ):
            with pytest.raises(Rejected) as info:
                attempt()
            assert info.value.reason == reason
    federation.submit_update(update)
    with pytest.raises(Rejected) as info:
        federation.admit_upload(first, 1)
    assert info.value.reason == "duplicate" and federation.status().received == (first,)


def test_a_silo_never_selected_starts_stage_two_from_the_final_global_model(make_runtimes):
    """An unselected silo's personal model starts stage 2 as the final global model: before stage 2 it scores
    exactly like fedavg's final model, and stage 2 is all the training it gets."""
    reports = {}
    for name in ("tap-nokd", "fedavg"):
        config = dataclasses.replace(tiny_config(name, rounds=1), clients_per_round=1)
        reports[name] = run_federation(make_runtimes(config), config)
    selected = reports["fedavg"]["history"][0]["selected"]
    assert selected == reports["tap-nokd"]["history"][0]["selected"] and len(selected) == 1
    unselected = [t for t in reports["tap-nokd"]["tasks"] if t["silo"] not in selected]
    assert unselected
    fedavg = {(t["silo"], t["task"]): t["metrics"] for t in reports["fedavg"]["tasks"]}
    before_stage2 = reports["tap-nokd"]["stage1_metrics"]
    for task in unselected:
        assert before_stage2[task["silo"]][task["task"]] == fedavg[(task["silo"], task["task"])]
        assert task["steps"] == config.train.kd_steps
