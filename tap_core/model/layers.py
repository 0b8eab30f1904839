"""Building blocks of the TAP model. Each class here is (the module of) one component kind.

Frozen backbone tensors are shared, never copied: :func:`share_frozen` deep-copies
a module's structure while keeping its parameters the very same objects. LoRA
comes from ``peft`` (``inject_adapter_in_model``) on the copied attention and
feed-forward projections.
"""

from __future__ import annotations

import copy
import re
import types

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from tap_core.model.backbone import FusionSource


def share_frozen(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters are the original Parameter objects."""
    memo = {id(p): p for p in module.parameters()}
    return copy.deepcopy(module, memo)


def trainable_copy(module: nn.Module) -> nn.Module:
    """An independent, trainable copy (for norms initialised from the backbone)."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(True)
    return clone


LEAN_LORA = True  # tests switch it off to compare with peft's own forward


def lean_lora_forward(self: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + s * B(A(x))`` with the scaled add folded into one addmm.

    The same numbers as peft's forward bit for bit (tests check it), without its extra multiply,
    add and per-call Python; for one adapter named ``default`` without dropout, as :func:`add_lora` makes.
    """
    base = self.base_layer
    y = F.linear(x, base.weight, base.bias)
    z = F.linear(x, self.lora_A["default"].weight)
    out = torch.addmm(
        y.reshape(-1, y.shape[-1]),
        z.reshape(-1, z.shape[-1]),
        self.lora_B["default"].weight.t(),
        alpha=self.scaling["default"],
    )
    return out.view(y.shape)


def add_lora(module: nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> nn.Module:
    """Inject LoRA adapters (peft) into the Linear/Conv layers of ``module`` named ``targets``."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")
    module = inject_adapter_in_model(config, module)
    if LEAN_LORA:
        for layer in module.modules():
            if (
                isinstance(layer, LoraLinear)
                and list(layer.lora_A) == ["default"]
                and not layer.use_dora["default"]
                and isinstance(layer.lora_dropout["default"], nn.Identity)
                and not layer.fan_in_fan_out
            ):
                layer.forward = types.MethodType(lean_lora_forward, layer)
    return module


class SelfAttention(nn.Module):
    """Multi-head self-attention over frozen backbone projections (LoRA on query and value)."""

    def __init__(self, src: FusionSource, rank: int, alpha: float):
        super().__init__()
        self.query = share_frozen(src.query)
        self.key = share_frozen(src.key)
        self.value = share_frozen(src.value)
        self.out = share_frozen(src.out)
        self.num_heads = src.num_heads
        add_lora(self, ("query", "value"), rank, alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, heads, width // heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, N): True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class FusionBlock(nn.Module):
    """A ``mote.*`` / ``mome.*`` component: pre-LN self-attention, one per fusion layer."""

    def __init__(self, sources: list[FusionSource], rank: int, alpha: float):
        super().__init__()
        self.norms = nn.ModuleList(trainable_copy(src.norm_before) for src in sources)
        self.attention = nn.ModuleList(SelfAttention(src, rank, alpha) for src in sources)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
        return h + self.attention[layer](self.norms[layer](h), mask)


class FeedForward(nn.Module):
    def __init__(self, src: FusionSource, rank: int, alpha: float):
        super().__init__()
        self.fc1 = share_frozen(src.fc1)
        self.fc2 = share_frozen(src.fc2)
        add_lora(self, ("fc1", "fc2"), rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Expert(nn.Module):
    """An ``expert.*`` component: the backbone's feed-forward layer (frozen + LoRA), pre-LN residual."""

    def __init__(self, src: FusionSource, rank: int, alpha: float):
        super().__init__()
        self.norm = trainable_copy(src.norm_after)
        self.ffn = FeedForward(src, rank, alpha)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.ffn(self.norm(h))


class DomainAdapter(nn.Module):
    """An ``adapter.*`` component: a bottleneck residual adapter for one domain.

    The up-projection starts at zero, so a new adapter leaves the block unchanged.
    """

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


def top_layer_targets(tower: nn.Module, targets: tuple[str, ...], layers: int | None) -> tuple[str, ...]:
    """``targets`` restricted to the tower's top ``layers`` transformer layers (None: every layer).

    Returned as module paths, which peft matches exactly. Gradients then stop below the lowest
    adapted layer: the frozen layers underneath run forward only.
    """
    if layers is None:
        return targets
    found = [
        (int(match.group(1)), name)
        for name, _ in tower.named_modules()
        if name.rsplit(".", 1)[-1] in targets and (match := re.search(r"\.layer\.(\d+)\.", name))
    ]
    depth = 1 + max((index for index, _ in found), default=-1)
    return tuple(name for index, name in found if index >= depth - layers)


class ModalityEncoder(nn.Module):
    """An ``encoder.<modality>`` component: frozen tower + LoRA, trainable projection and norm."""

    def __init__(
        self,
        tower: nn.Module,
        tower_dim: int,
        width: int,
        lora_targets: tuple[str, ...],
        rank: int,
        alpha: float,
        lora_layers: int | None = None,
    ):
        super().__init__()
        self.tower = share_frozen(tower)
        lora_targets = top_layer_targets(self.tower, lora_targets, lora_layers)
        if lora_targets:  # ViLT's text embeddings have nothing LoRA can target
            add_lora(self.tower, lora_targets, rank, alpha)
        self.proj = nn.Linear(tower_dim, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.tower(*inputs)))


class SharedProjection(nn.Module):
    """``proj.shared``: maps every modality's tokens into the one shared space."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.linear(h))
