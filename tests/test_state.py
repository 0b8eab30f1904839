"""State on disk: atomic checkpoints, a server that resumes with identical weights, the agent's store."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import synthetic_data, synthetic_silos, tiny_config
from tap_core.algorithms import get_algorithm
from tap_core.errors import ConfigError
from tap_core.silo import SiloRuntime, SiloState
from tap_core.store import CheckpointStore
from tap_client.store import ClientStore
from tap_server.federation import FINISHING, TRAINING, Federation

DEVICE = torch.device("cpu")


def make_runtimes(config):
    silos = synthetic_silos()
    data = synthetic_data(silos)
    return {s.id: SiloRuntime(s, data[s.id], config, DEVICE) for s in silos}


def join(federation, rts):
    for rt in rts.values():
        federation.register(rt.declaration())
    for sid, rt in rts.items():
        rt.set_plan(federation.silo_plan(sid))


def started(config, state_dir):
    """Runtimes and a federation they all joined (with a state directory)."""
    rts = make_runtimes(config)
    federation = Federation(config, state_dir=state_dir, expected_silos=3)
    join(federation, rts)
    return federation, rts


def train_round(federation, rts, algorithm, keep=None):
    r = federation.round
    for sid in list(federation.selected):
        update = algorithm.local_round(rts[sid], r, federation.payload(sid, r))
        if keep is not None:
            keep[sid] = update
        federation.submit_update(update)


def finish(federation, rts, algorithm):
    for sid in sorted(rts):
        result, _ = algorithm.finish(rts[sid], federation.payload(sid, federation.round))
        federation.submit_result(result)
    return {k: v for k, v in federation.report().items() if k != "timing"}


def test_checkpoint_store_replaces_atomically(tmp_path):
    store = CheckpointStore(tmp_path, "state")
    store.save({"round": 1}, {"c": {"w": torch.ones(3)}}, tag="r1")
    store.save({"round": 2}, {"c": {"w": torch.full((3,), 2.0)}}, tag="r2")
    state, values = store.load()
    assert state["round"] == 2 and torch.equal(values["c"]["w"], torch.full((3,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-r2.safetensors", "state.json"]
    store.save({"round": 3}, None, tag="r3")  # JSON only: keeps pointing at the last tensors
    state, values = store.load()
    assert state["round"] == 3 and torch.equal(values["c"]["w"], torch.full((3,), 2.0))
    (tmp_path / ".state.json.123.tmp").write_text("{half")  # a crash mid-write leaves only a temp file
    assert store.load()[0]["round"] == 3


def test_server_restart_between_rounds_resumes_with_identical_weights(tmp_path):
    config = tiny_config("tap", rounds=3)
    algorithm = get_algorithm(config)
    reference_rts = make_runtimes(config)
    reference = Federation(config, state_dir=tmp_path / "a", expected_silos=3)
    join(reference, reference_rts)
    while reference.phase == TRAINING:
        train_round(reference, reference_rts, algorithm)
    expected = finish(reference, reference_rts, algorithm)

    rts = make_runtimes(config)
    first = Federation(config, state_dir=tmp_path / "b", expected_silos=3)
    join(first, rts)
    train_round(first, rts, algorithm)
    saved = {c: {n: t.clone() for n, t in ts.items()} for c, ts in first.global_values.items()}
    del first  # the server dies after round 1 was aggregated and persisted

    resumed = Federation(config, state_dir=tmp_path / "b", expected_silos=3)
    assert resumed.phase == TRAINING and resumed.round == 2
    for component, tensors in saved.items():
        for name, tensor in tensors.items():
            assert torch.equal(resumed.global_values[component][name], tensor)
    while resumed.phase == TRAINING:
        train_round(resumed, rts, algorithm)
    assert finish(resumed, rts, algorithm) == expected


def test_server_restart_mid_round_asks_again_and_accepts_the_saved_updates(tmp_path):
    config = tiny_config("fedavg", rounds=2)
    algorithm = get_algorithm(config)
    federation, rts = started(config, tmp_path)
    first_update = algorithm.local_round(rts["a"], 1, federation.payload("a", 1))
    federation.submit_update(first_update)
    assert "a" in federation.received
    del federation  # dies before the round closes: the in-memory partial aggregate is lost

    resumed = Federation(config, state_dir=tmp_path, expected_silos=3)
    assert resumed.phase == TRAINING and resumed.round == 1 and resumed.received == {}
    assert resumed.assignment("a").action == "train"
    resumed.submit_update(first_update)  # the agent re-sends its saved update
    for sid in ("b", "c"):
        resumed.submit_update(algorithm.local_round(rts[sid], 1, resumed.payload(sid, 1)))
    assert resumed.round == 2


def test_resume_with_a_different_config_is_refused(tmp_path):
    config = tiny_config("tap")
    federation = Federation(config, state_dir=tmp_path, expected_silos=3)
    join(federation, make_runtimes(config))
    with pytest.raises(ConfigError, match="different algorithm"):
        Federation(dataclasses.replace(config, algorithm="fedavg"), state_dir=tmp_path)


def test_finished_federation_writes_the_report_and_stays_done(tmp_path):
    config = tiny_config("fedavg", rounds=1)
    algorithm = get_algorithm(config)
    federation, rts = started(config, tmp_path)
    train_round(federation, rts, algorithm)
    assert federation.phase == FINISHING
    report = finish(federation, rts, algorithm)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["mean_primary"] == pytest.approx(report["mean_primary"])
    again = Federation(config, state_dir=tmp_path)
    assert again.phase == "done" and again.assignment("a").action == "done"


def test_client_store_round_trip(tmp_path):
    config = tiny_config("tap")
    rts = make_runtimes(config)
    federation = Federation(config, expected_silos=3)
    join(federation, rts)
    update = get_algorithm(config).local_round(rts["a"], 1, federation.payload("a", 1))
    store = ClientStore(tmp_path)
    store.save_update(update)
    store.save_silo("a", rts["a"].state, rts["a"].personal.values(), 1)
    loaded = store.load_update("a", 1)
    assert loaded.weights == update.weights and loaded.stats.task_losses == update.stats.task_losses
    assert all(torch.equal(loaded.values[c][n], t) for c, ts in update.values.items() for n, t in ts.items())
    assert store.load_update("a", 2) is None and store.load_update("b", 1) is None
    silo_id, state, personal = store.load_silo()
    assert silo_id == "a" and state.rounds_done == [1] and state.replacements == rts["a"].state.replacements
    assert isinstance(state, SiloState) and set(personal) == set(rts["a"].plan.components)
