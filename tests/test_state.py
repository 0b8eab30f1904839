"""State on disk: atomic checkpoints, a server that resumes with identical weights, the agent's store."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import tiny_config
from tap_core.algorithms import get_algorithm
from tap_core.errors import ConfigError, TapError
from tap_core.silo import SiloState
from tap_core.store import CheckpointStore
from tap_client.store import ClientStore
from tap_server.federation import FINISHING, TRAINING, Federation
from tap_server.federation_state import FederationState


def train_round(federation, rts, algorithm, keep=None):
    status = federation.status()
    for sid in status.selected:
        update = algorithm.local_round(rts[sid], status.round, federation.payload(sid, status.round).values)
        if keep is not None:
            keep[sid] = update
        federation.submit_update(update)


def finish(federation, rts, algorithm):
    for sid in sorted(rts):
        result, _ = algorithm.finish(rts[sid], federation.payload(sid, federation.status().round).values)
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


def test_the_state_record_round_trips_through_json(tmp_path, joined):
    """Every persisted field is written and read back by the one record (no field forgotten on either side)."""
    config = tiny_config("tap", rounds=2)
    federation, rts = joined(config, state_dir=tmp_path)
    train_round(federation, rts, get_algorithm(config))
    store = CheckpointStore(tmp_path, "state")
    state = FederationState.load(store, config, rts["a"].backbone.fingerprint)
    assert FederationState.from_json(state.to_json()).to_json() == state.to_json()
    data = state.to_json()
    assert state.phase == TRAINING and state.round == 2 and state.log.history[0]["round"] == 1
    assert set(data) == {f.name for f in dataclasses.fields(FederationState)} - {"global_values"}
    assert set(state.global_values) == set(state.layout) == set(state.plan.components)
    assert data["log"]["wire"]["bytes_up"] > 0 and data["log"]["counted"]


def test_server_restart_between_rounds_resumes_with_identical_weights(tmp_path, joined):
    config = tiny_config("tap", rounds=3)
    algorithm = get_algorithm(config)
    reference, reference_rts = joined(config, state_dir=tmp_path / "a")
    while reference.status().phase == TRAINING:
        train_round(reference, reference_rts, algorithm)
    expected = finish(reference, reference_rts, algorithm)

    first, rts = joined(config, state_dir=tmp_path / "b")
    train_round(first, rts, algorithm)
    saved = first.global_values()
    del first  # the server dies after round 1 was aggregated and persisted

    resumed = Federation(config, state_dir=tmp_path / "b", expected_silos=3)
    status = resumed.status()
    assert status.phase == TRAINING and status.round == 2
    values = resumed.global_values()
    for component, tensors in saved.items():
        for name, tensor in tensors.items():
            assert torch.equal(values[component][name], tensor)
    while resumed.status().phase == TRAINING:
        train_round(resumed, rts, algorithm)
    assert finish(resumed, rts, algorithm) == expected


def test_server_restart_mid_round_asks_again_and_accepts_the_saved_updates(tmp_path, joined):
    config = tiny_config("fedavg", rounds=2)
    algorithm = get_algorithm(config)
    federation, rts = joined(config, state_dir=tmp_path)
    first_update = algorithm.local_round(rts["a"], 1, federation.payload("a", 1).values)
    federation.submit_update(first_update)
    assert federation.status().received == ("a",)
    del federation  # dies before the round closes: the in-memory partial aggregate is lost

    resumed = Federation(config, state_dir=tmp_path, expected_silos=3)
    status = resumed.status()
    assert status.phase == TRAINING and status.round == 1 and status.received == ()
    assert resumed.assignment("a").action == "train"
    resumed.submit_update(first_update)  # the agent re-sends its saved update
    for sid in ("b", "c"):
        resumed.submit_update(algorithm.local_round(rts[sid], 1, resumed.payload(sid, 1).values))
    assert resumed.status().round == 2


def test_resume_with_a_different_config_is_refused(tmp_path, joined):
    config = tiny_config("tap")
    joined(config, state_dir=tmp_path)
    with pytest.raises(ConfigError, match="different algorithm"):
        Federation(dataclasses.replace(config, algorithm="fedavg"), state_dir=tmp_path)


def test_finished_federation_writes_the_report_and_stays_done(tmp_path, joined):
    config = tiny_config("fedavg", rounds=1)
    algorithm = get_algorithm(config)
    federation, rts = joined(config, state_dir=tmp_path)
    train_round(federation, rts, algorithm)
    assert federation.status().phase == FINISHING
    report = finish(federation, rts, algorithm)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["mean_primary"] == pytest.approx(report["mean_primary"])
    again = Federation(config, state_dir=tmp_path)
    assert again.status().phase == "done" and again.assignment("a").action == "done"


def test_client_store_round_trip(tmp_path, joined):
    config = tiny_config("tap")
    federation, rts = joined(config)
    update = get_algorithm(config).local_round(rts["a"], 1, federation.payload("a", 1).values)
    rts["a"].state.rounds_done.append(1)  # what the agent records once an update is made
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
