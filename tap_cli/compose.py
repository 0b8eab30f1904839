"""Compose a FederationConfig from a scenario and command-line overrides."""

from __future__ import annotations

from typing import Any

from tap_core.config import FederationConfig, ModelSpec, Scenario, from_mapping, merge, to_mapping, validate_federation
from tap_core.errors import ConfigError

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "text_encoder": None},  # random, for tests
    "small": {"size": "small", "text_encoder": None},  # DESIGN.md's measured config, random
    "minilm": {"size": "small", "text_encoder": "minilm"},  # small + pretrained MiniLM text tower (demo, benchmarks)
    "base": {"size": "base", "text_encoder": None},  # the real FLAVA dimensions, random (GPU benchmarks)
}


def model_from_preset(base: ModelSpec, preset: str | None) -> ModelSpec:
    if preset is None:
        return base
    if preset not in MODEL_PRESETS:
        raise ConfigError("--model", f"unknown model preset {preset!r}", f"use one of {', '.join(MODEL_PRESETS)}")
    return from_mapping(ModelSpec, {**to_mapping(base), **MODEL_PRESETS[preset]}, "model")


def compose_config(
    scenario: Scenario,
    *,
    algorithm: str,
    rounds: int,
    seed: int,
    model: str | None = None,
    train: dict[str, Any] | None = None,
    federation: dict[str, Any] | None = None,
) -> FederationConfig:
    """The scenario's model and train settings, with CLI overrides (None = keep) applied and validated."""
    train_cfg = merge(scenario.train, train or {})
    data = {
        "name": scenario.name,
        "algorithm": algorithm,
        "rounds": rounds,
        "seed": seed,
        "model": to_mapping(model_from_preset(scenario.model, model)),
        "train": to_mapping(train_cfg),
    }
    for key, value in (federation or {}).items():
        if value is not None:
            data[key] = value
    config = from_mapping(FederationConfig, data, "federation")
    validate_federation(config)
    return config
