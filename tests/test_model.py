"""The model: components, the four routing paths, frozen sharing, heads, fingerprint, backbones."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tap_core.config import SHARED, ModelSpec, TaskSpec
from tap_core.errors import ConfigError, ModelMismatchError
from tap_core.model import build_backbone
from tap_core.model.backbone import backbone_on
from tap_core.model import components as C
from tap_core.model.heads import ImageDecoderHead
from tap_core.model.tap_model import Batch, ModelPlan, TapModel
from tap_core.training.trainer import select_device

VQA = TaskSpec("vqa", "text_generation", ("image", "text"), domain="shapes")
CLS = TaskSpec("cls", "classification", ("image",), labels=("a", "b", "c"), domain="shapes")
GEN = TaskSpec("gen", "image_generation", ("image",), domain="pics")
TXT = TaskSpec("txt", "classification", ("text",), labels=("pos", "neg"), domain="reviews")


def batch(b: int = 4, image: int = 32, text: int = 12) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(
        images=torch.rand(b, 3, image, image, generator=g),
        input_ids=torch.randint(1000, 2000, (b, text), generator=g),
        attention_mask=torch.ones(b, text, dtype=torch.long),
        labels=torch.tensor([0, 1, 2, 1][:b]),
        target_ids=torch.tensor([[2000, 102, 0, 0, 0, 0, 0, 0]] * b),
    )


def model(*tasks: TaskSpec, spec: ModelSpec | None = None, seed: int = 0) -> TapModel:
    return TapModel(ModelPlan(tasks), build_backbone(spec or ModelSpec(size="tiny")), seed)


def test_task_components_follow_the_spec_names():
    names = C.task_components(VQA, fusion_layers=1)
    assert {"encoder.image", "encoder.text", "proj.shared", "head.vqa"} <= set(names)
    # the four paths: (shared, shared), (shared, f), (m, f), (m, shared) for m in image, text
    for m in ("image", "text"):
        assert f"expert.mote.{m}.text_generation.0" in names
        assert f"expert.mote.{m}.shared.0" in names
        assert f"expert.mome.text_generation.{m}.0" in names
        assert f"expert.mome.shared.{m}.0" in names
    assert "expert.mote.shared.shared.0" in names and "expert.mote.shared.text_generation.0" in names
    assert {"mote.shared", "mote.image", "mote.text", "mome.shared", "mome.text_generation"} <= set(names)
    assert {"adapter.mote.image.shapes", "adapter.mome.text_generation.shapes"} <= set(names)
    assert not any("image_classification" in n for n in names)


@pytest.mark.parametrize("task", [VQA, CLS, GEN, TXT], ids=lambda t: t.name)
def test_every_routing_path_receives_gradient(task):
    """All four paths must run: a dead path would leave its experts without gradient."""
    m = model(task)
    m.train()
    out = m(task.name, batch())
    out.float().pow(2).mean().backward()
    for component in m.plan.task_components(task.name):
        grads = [p.grad for p in m.trainable(component).values()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{component} got no gradient"
    paths = C.routing_paths(task)
    assert len(paths) == 2 + 2 * len(task.modalities)
    assert (SHARED, SHARED, task.modalities) in paths


def test_each_path_changes_the_output():
    """Perturbing any one path's expert changes the prediction (no path is silently unused)."""
    m = model(VQA)
    m.eval()
    x = batch()
    with torch.no_grad():
        reference = m("vqa", x)
        for modality_side, family_side, _ in C.routing_paths(VQA):
            expert = m.part(C.mote_expert(modality_side, family_side, 0))
            saved = {n: p.clone() for n, p in expert.named_parameters() if p.requires_grad}
            for n, p in expert.named_parameters():
                if "lora_B" in n:
                    p.add_(0.5)
            assert not torch.allclose(m("vqa", x), reference), (modality_side, family_side)
            for n, p in expert.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def test_frozen_backbone_is_shared_not_copied_and_stays_frozen():
    backbone = build_backbone(ModelSpec(size="tiny"))
    a, b = model(CLS, VQA), model(CLS)
    frozen_a = {id(p) for p in a.parameters() if not p.requires_grad}
    frozen_b = {id(p) for p in b.parameters() if not p.requires_grad}
    backbone_ids = {id(p) for p in backbone.image_tower.parameters()}
    assert backbone_ids <= frozen_a and backbone_ids <= frozen_b
    assert not ({id(p) for p in a.trainable_parameters()} & {id(p) for p in b.trainable_parameters()})
    before = {n: p.clone() for n, p in backbone.image_tower.named_parameters()}
    optimizer = torch.optim.AdamW(a.trainable_parameters(), lr=1e-2)
    a.train()
    a("cls", batch()).sum().backward()
    optimizer.step()
    for n, p in backbone.image_tower.named_parameters():
        assert torch.equal(p, before[n]), n


def test_component_values_depend_on_seed_and_name_only():
    small, large = model(CLS), model(CLS, VQA, GEN)
    for component, tensors in small.values().items():
        for name, value in tensors.items():
            assert torch.equal(value, large.values([component])[component][name]), (component, name)
    other_seed = model(CLS, seed=1).values()
    assert not torch.equal(other_seed["head.cls"]["out.weight"], small.values()["head.cls"]["out.weight"])


def test_layout_and_load_values_check_the_layout():
    m = model(CLS)
    layout = m.layout()
    values = m.values()
    assert list(layout) == m.components
    for component, tensors in layout.items():
        assert [n for n, _ in tensors] == list(values[component])
        assert all(tuple(values[component][n].shape) == s for n, s in tensors)
    wrong = {"head.cls": {**values["head.cls"], "out.weight": torch.zeros(5, 5)}}
    with pytest.raises(ModelMismatchError, match="shape"):
        m.load_values(wrong)
    with pytest.raises(ModelMismatchError, match="no component"):
        m.load_values({"head.other": {}})
    with pytest.raises(ModelMismatchError, match="missing"):
        m.load_values({"head.cls": {}})


def test_heads_produce_the_right_shapes():
    m = model(CLS, GEN, VQA)
    x = batch()
    assert m("cls", x).shape == (4, 3)
    image = m("gen", x)
    assert image.shape == (4, 3, 32, 32) and image.min() >= 0 and image.max() <= 1
    vocab = build_backbone(ModelSpec(size="tiny")).word_embeddings.shape[0]
    assert m("vqa", x).shape == (4, ModelSpec().max_target_len, vocab)


def test_image_decoder_grows_with_log_of_image_size():
    params = {s: sum(p.numel() for p in ImageDecoderHead(768, s).parameters()) for s in (32, 64, 224)}
    assert params[224] < 6_000_000
    assert ImageDecoderHead(768, 224)(torch.zeros(2, 768)).shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="divisible"):
        ImageDecoderHead(64, 36)


def test_fingerprint_is_stable_and_sensitive():
    a = build_backbone(ModelSpec(size="tiny")).fingerprint
    assert a == build_backbone(ModelSpec(size="tiny", lora_rank=4)).fingerprint  # LoRA rank is not the base
    assert a != build_backbone(ModelSpec(size="tiny", init_seed=1)).fingerprint
    assert len(a) == 64


def test_vilt_backbone_runs_every_task_kind():
    spec = ModelSpec(backbone="vilt", size="tiny")
    m = model(CLS, VQA, GEN, TXT, spec=spec)
    x = batch()
    loss = sum(m(t, x).float().pow(2).mean() for t in ("cls", "vqa", "gen", "txt"))
    loss.backward()
    assert any(p.grad is not None for p in m.part("encoder.image").parameters() if p.requires_grad)


def test_minilm_text_encoder_is_pretrained_bert():
    from transformers import BertModel

    spec = ModelSpec(size="tiny", text_encoder="minilm")
    backbone = build_backbone(spec)
    assert isinstance(backbone.text_tower.model, BertModel)
    assert backbone.text_dim == 384
    assert backbone.fingerprint != build_backbone(ModelSpec(size="tiny")).fingerprint
    m = model(TXT, spec=spec)
    assert m("txt", batch()).shape == (4, 2)


def test_unknown_local_weights_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        build_backbone(ModelSpec(size="tiny", path=str(tmp_path)))


def test_cuda_request_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"


def test_plan_with_two_domains_of_one_task_builds_both_adapters():
    plan = ModelPlan((CLS, dataclasses.replace(CLS, domain="other")))
    names = plan.components
    assert "adapter.mote.image.shapes" in names and "adapter.mote.image.other" in names
    assert names.count("head.cls") == 1


def test_trainable_tensors_stay_fp32_when_the_frozen_weights_are_bf16():
    """On CUDA with autocast the shared frozen weights are bf16; LoRA, norms and heads must still be fp32 masters."""
    spec = ModelSpec(size="tiny")
    placed = backbone_on(spec, torch.device("cpu"), torch.bfloat16)
    assert placed is not build_backbone(spec)  # the fp32 original (fingerprint, server init) is untouched
    assert build_backbone(spec).image_tower.model.embeddings.patch_embeddings.projection.weight.dtype == torch.float32
    m = TapModel(ModelPlan((CLS, VQA)), placed, seed=0)
    assert {p.dtype for p in m.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in m.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert placed.fingerprint == build_backbone(spec).fingerprint


def test_fingerprint_covers_the_tokenizer_vocabulary(tmp_path):
    from tap_core.model.backbone import minilm_path

    (tmp_path / "vocab.txt").write_text((minilm_path() / "vocab.txt").read_text().replace("[unused0]", "[unused-x]"))
    other = build_backbone(ModelSpec(size="tiny", tokenizer=str(tmp_path))).fingerprint
    assert other != build_backbone(ModelSpec(size="tiny")).fingerprint
