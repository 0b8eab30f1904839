"""The trainer's fast paths compute what the plain ones do: shared route entries, cached teacher outputs,
mixed precision with a gradient scaler, a compiled forward pass."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TASKS, synthetic_task_data
from tap_core.config import ModelSpec, TrainConfig, from_mapping, validate_model, validate_train
from tap_core.errors import ConfigError
from tap_core.model import components as C
from tap_core.model.backbone import build_backbone
from tap_core.model.tap_model import ModelPlan, TapModel
from tap_core.training import trainer as trainer_module
from tap_core.training.batches import sample_indices, to_tensors
from tap_core.training.teacher import TeacherOutputs, windows
from tap_core.training.trainer import Distillation, Trainer, autocast_dtype, constant_schedule

CPU = torch.device("cpu")
LABELS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def setup():
    spec = ModelSpec(size="tiny")
    tasks = tuple(dataclasses.replace(t, labels=LABELS) if t.kind == "classification" else t for t in TASKS.values())
    plan = ModelPlan(tasks)
    tensors = {t.name: to_tensors(t, synthetic_task_data(t.kind, seed=i), spec) for i, t in enumerate(tasks)}
    return build_backbone(spec), plan, tensors


def test_routes_that_share_their_first_mote_block_compute_it_once_with_the_same_result(setup):
    backbone, plan, tensors = setup
    model = TapModel(plan, backbone, seed=0).eval()
    for name in ("vqa", "recon", "caption"):
        task, batch = plan.task(name), tensors[name].train.batch(torch.arange(6))
        with torch.no_grad():
            tokens = model.encode(task, batch)
            every_route = []
            for modality_side, family_side, reads in C.routing_paths(task):
                h = torch.cat([tokens[m][0] for m in reads], dim=1)
                mask = torch.cat([tokens[m][1] for m in reads], dim=1)
                every_route.append(model.route(h, mask, modality_side, family_side, task.domain))
            assert torch.equal(model.features(name, batch), torch.stack(every_route).mean(0))


def test_teacher_outputs_are_the_teachers_forward_on_each_micro_batch(setup):
    backbone, plan, tensors = setup
    teacher = TapModel(plan, backbone, seed=1).eval()
    for name, data in tensors.items():
        draws = [next(it) for it in [sample_indices(len(data.train), 8, seed=5)] for _ in range(4)]
        cache = TeacherOutputs(teacher, data.task, data.train, CPU, batch_size=32, autocast=torch.no_grad)
        cache.prepare(draws)
        assert len(cache.where) == len(torch.unique(torch.cat(draws)))  # each example once
        for index in draws:
            with torch.no_grad():
                expected = teacher(name, data.train.batch(index), targets_only=True)
            got = cache.take(index)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_teacher_windows_cover_every_micro_step_within_the_budget():
    draws = [
        torch.tensor([0, 1]),
        torch.tensor([2, 3]),
        torch.tensor([1, 4]),
        torch.tensor([5, 6]),
        torch.tensor([7, 8]),
    ]
    cost = torch.full((9,), 10)
    spans = windows(draws, cost, budget_bytes=40)
    assert spans == [(0, 2), (2, 4), (4, 5)]  # consecutive, complete
    for start, end in spans:
        assert len(torch.unique(torch.cat(draws[start:end]))) * 10 <= 40
    assert windows(draws, cost, budget_bytes=10**9) == [(0, 5)]
    assert windows(draws, cost, budget_bytes=1) == [(k, k + 1) for k in range(5)]  # one micro-step at least


def test_distillation_gives_the_same_losses_whatever_the_teacher_window(setup, monkeypatch):
    backbone, plan, tensors = setup
    cfg = TrainConfig(batch_size=8, eval_batch_size=16)

    def distil() -> dict[str, float]:
        student, teacher = TapModel(plan, backbone, seed=2), TapModel(plan, backbone, seed=3)
        distill = Distillation(teacher, {n: 1.0 for n in tensors}, temperature=2.0)
        return Trainer(cfg, CPU).train(student, tensors, 6, 7, constant_schedule(1e-3), distill).kd_losses

    whole = distil()
    monkeypatch.setattr(trainer_module, "DEFAULT_BUDGET_BYTES", 1)  # a new window at every micro-step
    stepwise = distil()
    assert whole.keys() == stepwise.keys() == tensors.keys()
    for name in whole:
        assert stepwise[name] == pytest.approx(whole[name], rel=1e-4)


def test_mixed_precision_dtype_follows_the_card():
    cuda = torch.device("cuda")
    assert autocast_dtype(CPU, amp=True) is None
    assert autocast_dtype(cuda, amp=False) is None
    assert autocast_dtype(cuda, True, "auto", bf16_supported=True) == torch.bfloat16
    assert autocast_dtype(cuda, True, "auto", bf16_supported=False) == torch.float16
    assert autocast_dtype(cuda, True, "fp16", bf16_supported=True) == torch.float16
    with pytest.raises(ConfigError, match="amp_dtype"):
        autocast_dtype(cuda, True, "bf16", bf16_supported=False)


def test_fp16_training_with_a_gradient_scaler_learns(setup):
    """The CUDA fallback path (fp16 autocast + GradScaler), run on the CPU."""
    backbone, plan, tensors = setup
    task = {"colour": tensors["colour"]}
    start = TapModel(plan, backbone, seed=4)
    results = {}
    for precision in (None, torch.float16):
        model = TapModel(plan, backbone, seed=4)
        trainer = Trainer(TrainConfig(batch_size=8), CPU, precision=precision)
        results[precision] = trainer.train(model, task, 8, 1, constant_schedule(3e-3)).losses["colour"]
        moved = (model.part("head.colour").out.weight - start.part("head.colour").out.weight).detach()
        assert float(moved.abs().max()) > 1e-4  # the scaler did not skip every step
    assert results[torch.float16] == pytest.approx(results[None], rel=0.05)


def test_compiled_forward_trains_like_the_eager_one(setup):
    backbone, plan, tensors = setup
    task = {"colour": tensors["colour"]}  # images only: no text padding, so the very same numbers
    losses = {}
    for mode in ("off", "default"):
        model = TapModel(plan, backbone, seed=5)
        trainer = Trainer(TrainConfig(batch_size=8, compile=mode), CPU, compile_backend="eager")
        losses[mode] = trainer.train(model, task, 2, 1, constant_schedule(1e-3)).losses
    assert losses["default"] == losses["off"]


@pytest.mark.parametrize("key, value", [("amp_dtype", "fp8"), ("compile", "fast")])
def test_bad_precision_or_compile_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        validate_train(from_mapping(TrainConfig, {key: value}, "train"), "train")


def test_negative_tower_lora_layers_is_refused():
    with pytest.raises(ConfigError, match="tower_lora_layers"):
        validate_model(ModelSpec(tower_lora_layers=-1), "model")


def test_lean_lora_forward_trains_bit_for_bit_like_peft(setup, monkeypatch):
    from tap_core.model import layers

    backbone, plan, tensors = setup
    trained = {}
    for lean in (True, False):
        monkeypatch.setattr(layers, "LEAN_LORA", lean)
        model = TapModel(plan, backbone, seed=6)
        patched = sum(1 for module in model.modules() if "forward" in vars(module))
        assert (patched > 0) == lean
        Trainer(TrainConfig(batch_size=8), CPU).train(model, tensors, 2, 1, constant_schedule(1e-3))
        trained[lean] = model.values()
    for component, tensors_ in trained[True].items():
        for name, value in tensors_.items():
            assert torch.equal(value, trained[False][component][name]), (component, name)


def test_tower_lora_layers_keeps_lora_in_the_top_layers_only():
    from tap_core.model.layers import ModalityEncoder

    tower = build_backbone(ModelSpec(size="small")).image_tower  # 4 layers

    def adapted(layers):
        encoder = ModalityEncoder(tower, 128, 128, ("query", "value"), 8, 16.0, layers)
        return sorted(
            {
                int(n.split(".layer.")[1].split(".")[0])
                for n, p in encoder.named_parameters()
                if "lora_" in n and p.requires_grad
            }
        )

    assert adapted(None) == [0, 1, 2, 3]
    assert adapted(2) == [2, 3]
    assert adapted(0) == []
    assert adapted(9) == [0, 1, 2, 3]
