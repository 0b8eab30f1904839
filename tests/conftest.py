"""Shared fixtures: tiny configs, synthetic silos and data that learn in a few steps."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tap_core.config import FederationConfig, ModelSpec, SiloSpec, TaskSpec, TrainConfig
from tap_core.data.types import Examples, TaskData
from tap_core.runtime import configure_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
configure_threads(1)

COLOURS = ["red", "green", "blue"]


def synthetic_examples(n: int, kind: str, seed: int, image_size: int = 32) -> Examples:
    """Images whose colour is the class; text naming it; VQA-style target = the colour word."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 3, n)
    images = rng.integers(0, 40, (n, 3, image_size, image_size), dtype=np.uint8)
    for i, c in enumerate(classes):
        images[i, c] += 200
    texts = [f"what colour is the square number {i % 7}" for i in range(n)]
    labels = [COLOURS[c] for c in classes]
    return Examples(
        images=images,
        texts=texts,
        labels=labels if kind == "classification" else None,
        targets=labels if kind == "text_generation" else None,
    )


def synthetic_task_data(kind: str, seed: int, n_train: int = 48, n_val: int = 16, n_test: int = 24) -> TaskData:
    return TaskData(synthetic_examples(n_train, kind, seed), synthetic_examples(n_val, kind, seed + 1),
                    synthetic_examples(n_test, kind, seed + 2))


TASKS = {
    "colour": TaskSpec("colour", "classification", ("image",), domain="squares"),
    "caption": TaskSpec("caption", "classification", ("text",), domain="words"),
    "vqa": TaskSpec("vqa", "text_generation", ("image", "text"), domain="squares"),
    "recon": TaskSpec("recon", "image_generation", ("image",), domain="squares"),
}


def tiny_config(algorithm: str = "tap", rounds: int = 2, **train) -> FederationConfig:
    defaults = dict(local_steps=3, batch_size=8, ft_steps=2, kd_steps=2, max_val_examples=16, eval_batch_size=32)
    defaults.update(train)
    return FederationConfig(name="synthetic", algorithm=algorithm, rounds=rounds, model=ModelSpec(size="tiny"),
                            train=TrainConfig(**defaults))


def synthetic_silos() -> list[SiloSpec]:
    return [
        SiloSpec("a", (TASKS["colour"], TASKS["vqa"])),
        SiloSpec("b", (TASKS["colour"],)),
        SiloSpec("c", (TASKS["recon"], TASKS["caption"])),
    ]


def synthetic_data(silos: list[SiloSpec]) -> dict[str, dict[str, TaskData]]:
    return {s.id: {t.name: synthetic_task_data(t.kind, seed=10 * i + j) for j, t in enumerate(s.tasks)}
            for i, s in enumerate(silos)}


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return ModelSpec(size="tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
