"""The TAP model: a set of named components and the four-path forward pass.

A model is built from a :class:`ModelPlan` (the tasks it serves, with their
federation-wide label spaces). The server builds the union of every silo's
tasks; a silo builds only its own. A component's initial values depend only on
the run seed and its name, so the same component has the same initial values in
every party's model whatever else that model holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from tap_core.config import ModelSpec, TaskSpec
from tap_core.errors import ModelMismatchError
from tap_core.layout import Layout
from tap_core.model import components as C
from tap_core.model.backbone import Backbone
from tap_core.model.heads import ClassificationHead, ImageDecoderHead, TextDecoderHead
from tap_core.model.layers import DomainAdapter, Expert, FusionBlock, ModalityEncoder, SharedProjection
from tap_core.seeding import derive_seed, torch_seed

PAD_ID = 0  # [PAD] in BERT vocabularies: padding of text inputs and generation targets

ComponentValues = dict[str, dict[str, torch.Tensor]]  # component -> local parameter name -> tensor


@dataclass(frozen=True)
class ModelPlan:
    """The tasks a model serves. Classification tasks carry their full (federation) label list."""

    tasks: tuple[TaskSpec, ...]
    fusion_layers: int = 1

    def task(self, name: str) -> TaskSpec:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"this model has no task {name!r}; it serves {', '.join(t.name for t in self.tasks)}")

    @property
    def components(self) -> list[str]:
        return C.components_for_tasks(self.tasks, self.fusion_layers)

    def task_components(self, name: str) -> list[str]:
        return C.task_components(self.task(name), self.fusion_layers)


def module_key(component: str) -> str:
    return component.replace(".", "__")


@dataclass
class Batch:
    """Model inputs and targets of one task; absent fields are None."""

    images: torch.Tensor | None = None  # float (B, 3, S, S) in [0, 1]
    input_ids: torch.Tensor | None = None  # long (B, T)
    attention_mask: torch.Tensor | None = None  # long (B, T)
    labels: torch.Tensor | None = None  # long (B,)
    target_ids: torch.Tensor | None = None  # long (B, T_out); pad = 0

    def to(self, device: torch.device) -> "Batch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            move(self.images), move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.target_ids)
        )

    def __len__(self) -> int:
        for t in (self.images, self.input_ids, self.labels, self.target_ids):
            if t is not None:
                return t.shape[0]
        return 0


class TapModel(nn.Module):
    def __init__(self, plan: ModelPlan, backbone: Backbone, seed: int):
        super().__init__()
        self.plan = plan
        self.spec: ModelSpec = backbone.spec
        self.width = backbone.shared_dim
        self.parts = nn.ModuleDict()
        for name in plan.components:
            with torch_seed(derive_seed(seed, "init", name)):
                module = self._build(name, backbone)
            # trainable tensors are fp32 masters even when the shared frozen weights are bf16 (CUDA + autocast):
            # peft and the norm copies would otherwise inherit bf16 and barely train
            for param in module.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()
            self.parts[module_key(name)] = module
        self.to(backbone.output_embeddings.device)

    # -- construction -------------------------------------------------------

    def _build(self, name: str, backbone: Backbone) -> nn.Module:
        spec = backbone.spec
        rank, alpha, layers = spec.lora_rank, spec.lora_alpha, spec.fusion_layers
        kind, _, rest = name.partition(".")
        n_fusion = len(backbone.fusion)
        if kind == "encoder":
            tower, dim = (
                (backbone.image_tower, backbone.image_dim)
                if rest == "image"
                else (backbone.text_tower, backbone.text_dim)
            )
            targets = backbone.tower_lora_targets if rest == "image" else ("query", "value")
            if rest == "text" and backbone.text_tower.kind == "vilt":
                targets = ()
            return ModalityEncoder(tower, dim, self.width, targets, rank, alpha, spec.tower_lora_layers)
        if kind == "proj":
            return SharedProjection(self.width)
        if kind in ("mote", "mome"):
            # mote blocks start from the backbone's first fusion layers, mome blocks from the next ones.
            offset = 0 if kind == "mote" else layers
            return FusionBlock([backbone.fusion[(offset + l) % n_fusion] for l in range(layers)], rank, alpha)
        if kind == "expert":
            stage, _, _, layer = rest.split(".")
            offset = 0 if stage == "mote" else layers
            return Expert(backbone.fusion[(offset + int(layer)) % n_fusion], rank, alpha)
        if kind == "adapter":
            return DomainAdapter(self.width, spec.adapter_dim)
        if kind == "head":
            task = self.plan.task(rest)
            if task.kind == "classification":
                if not task.labels:
                    raise ValueError(f"classification task {task.name!r} has no label list in the plan")
                return ClassificationHead(self.width, len(task.labels))
            if task.kind == "image_generation":
                return ImageDecoderHead(self.width, backbone.image_size)
            return TextDecoderHead(
                self.width, spec.max_target_len, backbone.output_embeddings, backbone.fusion[0].num_heads
            )
        raise ValueError(f"unknown component {name!r}")

    def part(self, component: str) -> nn.Module:
        return self.parts[module_key(component)]

    # -- forward ------------------------------------------------------------

    def encode(self, task: TaskSpec, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Tokens (B, N, D) and masks (B, N) per modality, in the shared space."""
        project = self.part(C.PROJ_SHARED)
        tokens = {}
        if "image" in task.modalities:
            h = project(self.part(C.encoder("image"))(batch.images))
            tokens["image"] = (h, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device))
        if "text" in task.modalities:
            h = project(self.part(C.encoder("text"))(batch.input_ids, batch.attention_mask))
            tokens["text"] = (h, batch.attention_mask.bool())
        return tokens

    def mote_entry(self, h: torch.Tensor, mask: torch.Tensor, modality_side: str, domain: str) -> torch.Tensor:
        """The first mote block and its domain adapter: both routes leaving a modality side start with it."""
        block, adapter = self.part(C.mote(modality_side)), self.part(C.mote_adapter(modality_side, domain))
        return adapter(block(h, mask, 0))

    def route(
        self,
        h: torch.Tensor,
        mask: torch.Tensor,
        modality_side: str,
        family_side: str,
        domain: str,
        entered: bool = False,
    ) -> torch.Tensor:
        """One path: the mote stage, then the mome stage; returns mean-pooled features (B, D).

        ``entered``: ``h`` has already passed :meth:`mote_entry` (computed once for the routes that share it).
        """
        layers = self.spec.fusion_layers
        block, adapter = self.part(C.mote(modality_side)), self.part(C.mote_adapter(modality_side, domain))
        for layer in range(layers):
            if not (entered and layer == 0):
                h = adapter(block(h, mask, layer))
            h = self.part(C.mote_expert(modality_side, family_side, layer))(h)
        block, adapter = self.part(C.mome(family_side)), self.part(C.mome_adapter(family_side, domain))
        for layer in range(layers):
            h = adapter(block(h, mask, layer))
            h = self.part(C.mome_expert(family_side, modality_side, layer))(h)
        weights = mask.unsqueeze(-1).to(h.dtype)
        return (h * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def features(self, task_name: str, batch: Batch) -> torch.Tensor:
        task = self.plan.task(task_name)
        tokens = self.encode(task, batch)
        entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # modality side -> (mote entry, mask)
        pooled = []
        for modality_side, family_side, reads in C.routing_paths(task):
            if modality_side not in entries:  # the two routes of a modality side read the same tokens
                h = torch.cat([tokens[m][0] for m in reads], dim=1) if len(reads) > 1 else tokens[reads[0]][0]
                mask = torch.cat([tokens[m][1] for m in reads], dim=1) if len(reads) > 1 else tokens[reads[0]][1]
                entries[modality_side] = (self.mote_entry(h, mask, modality_side, task.domain), mask)
            h, mask = entries[modality_side]
            pooled.append(self.route(h, mask, modality_side, family_side, task.domain, entered=True))
        return torch.stack(pooled).mean(0)

    def forward(self, task_name: str, batch: Batch, targets_only: bool = False) -> torch.Tensor:
        """The task's output. ``targets_only``: text generation returns logits at target positions only (N, V)."""
        head = self.part(C.head(task_name))
        z = self.features(task_name, batch)
        if targets_only and isinstance(head, TextDecoderHead):
            return head(z, batch.target_ids != PAD_ID)
        return head(z)

    # -- component values ---------------------------------------------------

    @property
    def components(self) -> list[str]:
        return self.plan.components

    def trainable(self, component: str) -> dict[str, nn.Parameter]:
        """Trainable parameters of one component, by local name (what travels on the wire)."""
        return {n: p for n, p in self.part(component).named_parameters() if p.requires_grad}

    def layout(self, components: Iterable[str] | None = None) -> Layout:
        """Ordered (name, shape) of every trainable tensor per component: the layout both sides agree on."""
        names = self.components if components is None else components
        return {c: [(n, tuple(p.shape)) for n, p in sorted(self.trainable(c).items())] for c in names}

    def values(self, components: Iterable[str] | None = None) -> ComponentValues:
        """Detached fp32 CPU copies of trainable values."""
        names = self.components if components is None else components
        return {
            c: {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in sorted(self.trainable(c).items())}
            for c in names
        }

    @torch.no_grad()
    def load_values(self, values: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Copy component values in; every tensor must exist here with the same shape."""
        for component, tensors in values.items():
            if module_key(component) not in self.parts:
                raise ModelMismatchError(f"this model has no component {component!r}")
            params = self.trainable(component)
            missing = set(params) - set(tensors)
            if missing:
                raise ModelMismatchError(f"component {component}: values for {sorted(missing)[0]} missing")
            for name, value in tensors.items():
                if name not in params:
                    raise ModelMismatchError(f"component {component} has no trainable tensor {name!r}")
                if tuple(value.shape) != tuple(params[name].shape):
                    raise ModelMismatchError(
                        f"component {component} tensor {name}: shape {tuple(value.shape)} != {tuple(params[name].shape)}"
                    )
                params[name].copy_(value)

    @torch.no_grad()
    def copy_from(self, other: "TapModel", components: Iterable[str]) -> None:
        """Copy the trainable values of ``components`` from another model, tensor to tensor on the device."""
        for component in components:
            mine, theirs = self.trainable(component), other.trainable(component)
            if mine.keys() != theirs.keys():
                raise ModelMismatchError(f"component {component}: the two models' tensors differ")
            for name, param in mine.items():
                param.copy_(theirs[name])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
