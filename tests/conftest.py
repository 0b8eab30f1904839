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
    return TaskData(
        synthetic_examples(n_train, kind, seed),
        synthetic_examples(n_val, kind, seed + 1),
        synthetic_examples(n_test, kind, seed + 2),
    )


TASKS = {
    "colour": TaskSpec("colour", "classification", ("image",), domain="squares"),
    "caption": TaskSpec("caption", "classification", ("text",), domain="words"),
    "vqa": TaskSpec("vqa", "text_generation", ("image", "text"), domain="squares"),
    "recon": TaskSpec("recon", "image_generation", ("image",), domain="squares"),
}


# the command-line budget of the tap demo / tap simulate tests: the tiny model, 2 rounds, a few steps
FAST_OPTIONS = "--model tiny --rounds 2 --local-steps 2 --ft-steps 2 --kd-steps 2 --batch-size 8".split()


def tiny_config(algorithm: str = "tap", rounds: int = 2, **train) -> FederationConfig:
    defaults = dict(local_steps=3, batch_size=8, ft_steps=2, kd_steps=2, max_val_examples=16, eval_batch_size=32)
    defaults.update(train)
    return FederationConfig(
        name="synthetic",
        algorithm=algorithm,
        rounds=rounds,
        model=ModelSpec(size="tiny"),
        train=TrainConfig(**defaults),
    )


def synthetic_silos() -> list[SiloSpec]:
    return [
        SiloSpec("a", (TASKS["colour"], TASKS["vqa"])),
        SiloSpec("b", (TASKS["colour"],)),
        SiloSpec("c", (TASKS["recon"], TASKS["caption"])),
    ]


def synthetic_data(silos: list[SiloSpec]) -> dict[str, dict[str, TaskData]]:
    return {
        s.id: {t.name: synthetic_task_data(t.kind, seed=10 * i + j) for j, t in enumerate(s.tasks)}
        for i, s in enumerate(silos)
    }


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return ModelSpec(size="tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------ federations in process


class FakeClock:
    """A clock the test moves by hand (deadlines without waiting)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_runtimes():
    """``make_runtimes(config, silos=None, data=None)``: the synthetic silos (or ``silos`` with ``data``) as
    in-process runtimes."""
    from tap_core.silo import SiloRuntime

    def make(config: FederationConfig, silos: list[SiloSpec] | None = None, data: dict | None = None) -> dict:
        silos = silos or synthetic_silos()
        data = data or synthetic_data(silos)
        return {s.id: SiloRuntime(s, data[s.id], config, torch.device("cpu")) for s in silos}

    return make


@pytest.fixture
def joined(make_runtimes):
    """``joined(config, state_dir=None, clock=None, silos=None)``: a federation every runtime joined, and the runtimes
    (holding their plans)."""
    from tap_server.federation import Federation

    def make(config: FederationConfig, state_dir=None, clock=None, silos=None):
        runtimes = make_runtimes(config, silos)
        kwargs = {"clock": clock} if clock is not None else {}
        federation = Federation(config, state_dir=state_dir, expected_silos=len(runtimes), **kwargs)
        for runtime in runtimes.values():
            federation.register(runtime.declaration())
        for silo, runtime in runtimes.items():
            runtime.set_plan(federation.silo_plan(silo))
        return federation, runtimes

    return make


# ------------------------------------------------------------ the deployed system (gRPC, mTLS)


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    from tap_server.provision import provision

    root = tmp_path_factory.mktemp("kits")
    provision(root, ["alpha", "beta", "delta"], ["127.0.0.1"])
    return root


@pytest.fixture(scope="module")
def other_kits(tmp_path_factory):
    """A second, unrelated provisioning: another CA."""
    from tap_server.provision import provision

    root = tmp_path_factory.mktemp("other")
    provision(root, ["alpha"], ["127.0.0.1"])
    return root


@pytest.fixture(scope="module")
def server(kits, tmp_path_factory):
    from helpers import start_server

    daemon = start_server(kits / "server", tmp_path_factory.mktemp("state"))
    yield daemon
    daemon.stop(grace=1)


@pytest.fixture(scope="module")
def round1(server, kits):
    """alpha and beta joined ``server`` over mTLS and downloaded round 1 (their stubs stay open)."""
    from helpers import join_both

    silos = join_both(server, kits)
    yield silos
    for entry in silos.values():
        entry["channel"].close()


@pytest.fixture
def serve():
    """``serve(kit, state, config=GRPC_CONFIG, **options)``: a started server, stopped after the test."""
    from helpers import start_server

    started = []

    def make(*args, **kwargs):
        daemon = start_server(*args, **kwargs)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop(grace=1)
