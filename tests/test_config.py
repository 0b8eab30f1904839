"""Scenario, silo and federation configs: every error names the file, silo, task and field, and says how to fix it."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from tap_core.config import FederationConfig, TrainConfig, from_mapping, margin_for, kd_weight_for, validate_federation
from tap_core.errors import ConfigError
from tap_core.scenario import load_federation_config, load_scenario, load_silo_config
from tap_cli.compose import compose_config

GOOD = {
    "name": "t",
    "model": {"backbone": "flava", "size": "tiny"},
    "silos": [
        {
            "id": "a",
            "tasks": [
                {
                    "name": "notes",
                    "kind": "classification",
                    "modalities": ["text"],
                    "data": {"format": "csv", "path": "a.csv", "text_column": "text", "label_column": "label"},
                }
            ],
        },
        {
            "id": "b",
            "tasks": [
                {
                    "name": "scans",
                    "kind": "classification",
                    "modalities": ["image"],
                    "data": {"format": "npz", "path": "/abs/b.npz", "images_key": "x", "labels_key": "y"},
                }
            ],
        },
    ],
}


def write(tmp_path, data, name="s.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def broken(tmp_path, mutate):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    mutate(data)
    with pytest.raises(ConfigError) as info:
        load_scenario(str(write(tmp_path, data)))
    return str(info.value)


def test_a_good_scenario_parses_and_resolves_paths_against_its_folder(tmp_path):
    scenario = load_scenario(str(write(tmp_path, GOOD)))
    assert [s.id for s in scenario.silos] == ["a", "b"]
    notes = scenario.silos[0].tasks[0]
    assert notes.family == "text_classification" and notes.domain == "general"
    assert notes.data["path"] == str((tmp_path / "a.csv").resolve())
    assert scenario.silos[1].tasks[0].data["path"] == "/abs/b.npz"


def test_unknown_task_key_suggests_the_right_one(tmp_path):
    message = broken(tmp_path, lambda d: d["silos"][0]["tasks"][0].update(modalitys=["text"]))
    assert "silos[0] (id=a).tasks[0] (name=notes).modalitys" in message and "did you mean 'modalities'" in message


def test_bad_kind_and_modality_name_the_field(tmp_path):
    message = broken(tmp_path, lambda d: d["silos"][1]["tasks"][0].update(kind="clasification"))
    assert "tasks[0] (name=scans).kind" in message and "did you mean 'classification'" in message
    message = broken(tmp_path, lambda d: d["silos"][1]["tasks"][0].update(modalities=["audio"]))
    assert "modalities[0]" in message and "'audio' is not one of image, text" in message


def test_image_generation_needs_images(tmp_path):
    def mutate(d):
        d["silos"][0]["tasks"][0].update(kind="image_generation", modalities=["text"])

    assert "needs the image modality" in broken(tmp_path, mutate)


def test_missing_data_and_duplicate_ids_are_refused(tmp_path):
    assert "data: is missing" in broken(tmp_path, lambda d: d["silos"][0]["tasks"][0].pop("data"))
    assert "silo id 'a' appears twice" in broken(tmp_path, lambda d: d["silos"][1].update(id="a"))


def test_tasks_that_share_a_name_must_agree(tmp_path):
    def mutate(d):
        d["silos"][1]["tasks"][0]["name"] = "notes"

    message = broken(tmp_path, mutate)
    assert "silo b task notes.modalities" in message and "share one head" in message


def test_wrong_types_and_ranges(tmp_path):
    assert "expected an integer" in broken(tmp_path, lambda d: d.update(train={"local_steps": "ten"}))
    assert "train.peak_lr" in broken(tmp_path, lambda d: d.update(train={"peak_lr": 5.0}))
    assert "model.size" in broken(tmp_path, lambda d: d["model"].update(size="huge"))


def test_unreadable_or_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("silos: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_scenario(str(bad))
    with pytest.raises(ConfigError, match="file not found"):
        load_scenario(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="neither a built-in scenario nor a file"):
        load_scenario("tap-bench-maxi")


def test_a_study_budget_is_parsed_and_checked(tmp_path):
    from tap_core.config import StudyBudget

    assert load_scenario(str(write(tmp_path, GOOD))).study is None
    data = {**GOOD, "study": {"rounds": 5, "local_steps": 20, "batch_size": 8, "stage2_steps": 30}}
    assert load_scenario(str(write(tmp_path, data))).study == StudyBudget(5, 20, 8, 30)
    message = broken(tmp_path, lambda d: d.update(study={"rounds": 0}))
    assert "study.rounds" in message and ">= 1" in message
    message = broken(tmp_path, lambda d: d.update(study={"kd_steps": 3}))
    assert "study" in message and "kd_steps" in message


def test_builtin_scenarios_parse():
    mini = load_scenario("tap-bench-mini")
    kinds = {t.kind for s in mini.silos for t in s.tasks}
    modalities = {m for s in mini.silos for t in s.tasks for m in t.modalities}
    assert kinds == {"classification", "image_generation", "text_generation"} and modalities == {"image", "text"}
    assert len(mini.silos) <= 6
    # every algorithm gets the same steps only with ft_steps == kd_steps (the study runs the scenario's budget)
    assert mini.train.ft_steps == mini.train.kd_steps and mini.study is None
    bench = load_scenario("tap-bench")
    assert len(bench.silos) >= 30


def test_silo_config_has_tasks_and_agent_settings(tmp_path):
    path = tmp_path / "silo.yaml"
    path.write_text(
        textwrap.dedent("""
        state_dir: st
        device: cpu
        tasks:
          - {name: notes, kind: classification, modalities: [text],
             data: {format: csv, path: a.csv, text_column: text, label_column: label}}
    """)
    )
    silo, settings = load_silo_config(path)
    assert silo.tasks[0].name == "notes" and settings == {"state_dir": "st", "device": "cpu"}


def test_federation_config_validation(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text("algorithm: tap\nrounds: 0\n")
    with pytest.raises(ConfigError, match="rounds: must be >= 1"):
        load_federation_config(path)
    path.write_text("algorithm: tap\nwire: {dtype: fp8}\n")
    with pytest.raises(ConfigError, match="wire.dtype"):
        load_federation_config(path)
    path.write_text("algorithm: tap\nclients_per_round: 1\nmin_clients: 2\n")
    with pytest.raises(ConfigError, match="clients_per_round"):
        load_federation_config(path)
    config = from_mapping(FederationConfig, {"algorithm": "fedavg", "train": {"margins": {"default": 0.1}}})
    validate_federation(config)
    assert config.train.margins == {"default": 0.1}


def test_margins_and_kd_weights_resolve_by_family_then_default():
    from tap_core.config import TaskSpec

    cfg = TrainConfig()
    text = TaskSpec("t", "classification", ("text",))
    image = TaskSpec("i", "classification", ("image",))
    assert margin_for(text, cfg) == 0.005 and margin_for(image, cfg) == 0.01
    assert kd_weight_for(text, cfg) == 1.0 and kd_weight_for(image, cfg) == 2e-3
    assert margin_for(TaskSpec("x", "classification", ("image",), margin=0.3), cfg) == 0.3


def test_compose_applies_cli_overrides_and_presets():
    scenario = load_scenario("tap-bench-mini")
    config = compose_config(
        scenario,
        algorithm="fedavg",
        rounds=4,
        seed=3,
        model="tiny",
        train={"local_steps": 7, "batch_size": None},
        federation={"clients_per_round": 2},
    )
    assert config.model.size == "tiny" and config.model.text_encoder is None
    assert config.train.local_steps == 7 and config.train.batch_size == TrainConfig().batch_size
    assert (config.rounds, config.seed, config.clients_per_round) == (4, 3, 2)
    with pytest.raises(ConfigError, match="unknown model preset"):
        compose_config(scenario, algorithm="tap", rounds=1, seed=0, model="giant")
