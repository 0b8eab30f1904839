"""The federation state machine's refusals and recoveries (no network)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from conftest import TASKS, synthetic_data, synthetic_silos, tiny_config
from tap_core.algorithms import get_algorithm
from tap_core.errors import TapError
from tap_core.messages import SiloDeclaration, SiloResult, TaskResult
from tap_core.silo import SiloRuntime
from tap_client.store import ClientStore
from tap_cli.simulate import run_federation
from tap_server.federation import FINISHING, TRAINING, WAITING, Federation, JoinRefused
from tap_server.validation import UpdateRejected

DEVICE = torch.device("cpu")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def runtimes(config):
    silos = synthetic_silos()
    data = synthetic_data(silos)
    return {s.id: SiloRuntime(s, data[s.id], config, DEVICE) for s in silos}


def joined(config, state_dir=None, clock=None):
    rts = runtimes(config)
    federation = Federation(config, state_dir=state_dir, expected_silos=len(rts), clock=clock or Clock())
    for rt in rts.values():
        federation.register(rt.declaration())
    for sid, rt in rts.items():
        rt.set_plan(federation.silo_plan(sid))
    return federation, rts


def declaration(config, **changes):
    decl = runtimes(config)["b"].declaration()
    return dataclasses.replace(decl, **changes)


@pytest.mark.parametrize("change, reason", [
    (dict(tasks=(dataclasses.replace(TASKS["colour"], name="x/y"),), train_samples={"x/y": 5}), "must be non-empty"),
    (dict(train_samples={"colour": 0}), "training samples"),
    (dict(train_samples={"other": 5}), "train_samples must name exactly"),
    (dict(labels_seen={"colour": [str(i) for i in range(20_000)]}), "at most 10000 labels"),
    (dict(tasks=(dataclasses.replace(TASKS["colour"], family="shared"),)), "not 'shared'"),
])
def test_invalid_declarations_are_refused(change, reason):
    config = tiny_config()
    federation = Federation(config, expected_silos=3)
    with pytest.raises(JoinRefused, match=reason) as info:
        federation.register(declaration(config, **change))
    assert info.value.reason == "bad_declaration" and federation.declarations == {}


def test_after_the_start_a_rejoin_must_declare_the_same_and_newcomers_are_refused():
    config = tiny_config()
    federation, rts = joined(config)
    federation.register(rts["b"].declaration())  # an agent restart: same declaration, fine
    changed = dataclasses.replace(rts["b"].declaration(), train_samples={"colour": 1000})
    with pytest.raises(JoinRefused, match="other tasks, sample counts or labels") as info:
        federation.register(changed)
    assert info.value.reason == "declaration_changed"
    with pytest.raises(JoinRefused, match="after the federation started"):
        federation.register(dataclasses.replace(rts["b"].declaration(), silo="newcomer"))


def test_completeness_is_checked_at_the_start_not_at_each_join():
    config = tiny_config()
    federation = Federation(config, expected_silos=2)
    one_label = SiloDeclaration("x", (TASKS["colour"],), {"colour": 5}, {"colour": ["red"]}, federation.fingerprint)
    federation.register(one_label)  # alone, a single label is fine: others may bring more
    same = dataclasses.replace(one_label, silo="y")
    with pytest.raises(JoinRefused, match="at least 2 labels"):
        federation.register(same)  # the start would need a 1-label head: refused, the federation keeps waiting
    assert federation.phase == WAITING and set(federation.declarations) == {"x"}


def test_joins_survive_a_server_restart_before_the_first_round(tmp_path):
    config = tiny_config()
    rts = runtimes(config)
    first = Federation(config, state_dir=tmp_path, expected_silos=3)
    first.register(rts["a"].declaration())
    del first
    resumed = Federation(config, state_dir=tmp_path, expected_silos=3)
    assert resumed.phase == WAITING and set(resumed.declarations) == {"a"}
    assert resumed.assignment("b").message == "not joined"  # an agent that gets this joins again


def test_resume_reads_the_plan_from_the_state_not_from_declarations(tmp_path):
    config = tiny_config()
    federation, _ = joined(config, state_dir=tmp_path)
    plans = {s: p for s, p in federation.silo_plans.items()}
    state = json.loads((tmp_path / "state.json").read_text())
    state["declarations"]["b"]["labels_seen"]["colour"].append("eel")  # a tampered or stale declaration
    (tmp_path / "state.json").write_text(json.dumps(state))
    resumed = Federation(config, state_dir=tmp_path)
    assert resumed.silo_plans == plans and resumed.manifest == federation.manifest


def test_results_with_non_finite_numbers_or_foreign_tasks_are_refused_and_nothing_is_stored():
    config = tiny_config("fedavg", rounds=1)
    federation, rts = joined(config)
    algorithm = get_algorithm(config)
    for sid in list(federation.selected):
        federation.submit_update(algorithm.local_round(rts[sid], 1, federation.payload(sid, 1)))
    assert federation.phase == FINISHING
    good = TaskResult("b", "colour", "classification", {"accuracy": 0.5}, 0.5)
    bad = [
        SiloResult("b", [good], stage1_metrics={"colour": {"accuracy": math.nan}}),
        SiloResult("b", [good], kd_losses={"someone-else": 0.1}),
        SiloResult("b", [good, good]),
        SiloResult("b", [good], seconds=math.inf),
    ]
    for result in bad:
        with pytest.raises(UpdateRejected):
            federation.submit_result(result)
    assert federation.results == {}
    federation.submit_result(SiloResult("b", [good]))
    assert set(federation.results) == {"b"}


def test_a_finish_deadline_without_results_still_writes_a_report(tmp_path):
    clock = Clock()
    config = tiny_config("fedavg", rounds=1)
    federation, rts = joined(config, state_dir=tmp_path, clock=clock)
    algorithm = get_algorithm(config)
    for sid in list(federation.selected):
        federation.submit_update(algorithm.local_round(rts[sid], 1, federation.payload(sid, 1)))
    clock.now += config.deadlines.finish_s + 1
    federation.tick()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mean_primary"] is None and report["dropped"][0]["silos"] == ["a", "b", "c"]


def test_a_retried_round_counts_replacements_once():
    clock = Clock()
    config = dataclasses.replace(tiny_config("tap", rounds=1), min_clients=3)
    federation, rts = joined(config, clock=clock)
    algorithm = get_algorithm(config)
    saved = algorithm.local_round(rts["a"], 1, federation.payload("a", 1))
    federation.submit_update(saved)
    clock.now += config.deadlines.round_s + 1
    federation.tick()  # only 1 of min_clients 3 updates: the round is retried
    assert federation.phase == TRAINING and federation.round == 1 and federation.received == {}
    federation.submit_update(saved)  # the agent re-sends its saved update
    for sid in ("b", "c"):
        federation.submit_update(algorithm.local_round(rts[sid], 1, federation.payload(sid, 1)))
    assert federation.replacements["a"] == {"colour": 1, "vqa": 1}


def test_a_silo_never_selected_starts_stage_two_from_the_final_global_model():
    """An unselected silo's personal model starts stage 2 as the final global model: before stage 2 it scores
    exactly like fedavg's final model, and stage 2 is all the training it gets."""
    reports = {}
    for name in ("tap-nokd", "fedavg"):
        config = dataclasses.replace(tiny_config(name, rounds=1), clients_per_round=1)
        reports[name] = run_federation(runtimes(config), config)
    selected = reports["fedavg"]["history"][0]["selected"]
    assert selected == reports["tap-nokd"]["history"][0]["selected"] and len(selected) == 1
    unselected = [t for t in reports["tap-nokd"]["tasks"] if t["silo"] not in selected]
    assert unselected
    fedavg = {(t["silo"], t["task"]): t["metrics"] for t in reports["fedavg"]["tasks"]}
    before_stage2 = reports["tap-nokd"]["stage1_metrics"]
    for task in unselected:
        assert before_stage2[task["silo"]][task["task"]] == fedavg[(task["silo"], task["task"])]
        assert task["steps"] == config.train.kd_steps


def test_an_agent_state_directory_belongs_to_one_federation_and_silo(tmp_path):
    store = ClientStore(tmp_path / "state")
    store.claim("f" * 32, "a")
    store.claim("f" * 32, "a")  # the same federation again: fine
    with pytest.raises(TapError, match="belongs to silo a of federation"):
        ClientStore(tmp_path / "state").claim("e" * 32, "a")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TapError, match="not empty"):
        ClientStore(tmp_path / "other").claim("f" * 32, "a")


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    from tap_cli.demo import DemoLayout, prepare_workdir
    from tap_cli.options import config_from_options
    from test_demo import OPTIONS

    (tmp_path / "precious.txt").write_text("do not delete")
    scenario, config = config_from_options(OPTIONS)
    with pytest.raises(TapError, match="not made by tap demo"):
        prepare_workdir(DemoLayout(tmp_path), scenario, config, None)
    assert (tmp_path / "precious.txt").exists()
