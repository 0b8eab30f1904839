"""From raw examples to model batches: tokenise, index labels, sample deterministically."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from tap_core.config import ModelSpec, TaskSpec
from tap_core.data.types import Examples, TaskData
from tap_core.errors import ConfigError, DataError
from tap_core.model.tap_model import PAD_ID, Batch
from tap_core.seeding import generator


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | None):
    """A BERT WordPiece tokenizer from a local directory (default: the one shipped with MiniLM)."""
    from transformers import BertTokenizerFast

    if path is None:
        from tap_core.model.backbone import minilm_path

        path = str(minilm_path())
    directory = Path(path)
    if not (directory / "vocab.txt").is_file():
        raise ConfigError(
            "model.tokenizer", f"{directory} has no vocab.txt", "point it at a local BERT tokenizer directory"
        )
    return BertTokenizerFast.from_pretrained(str(directory), local_files_only=True)


@dataclass
class SplitTensors:
    """One split of one task as tensors (images stay uint8 until batched)."""

    images: torch.Tensor | None  # uint8 (N, 3, S, S)
    input_ids: torch.Tensor | None  # long (N, T)
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None  # long (N,)
    target_ids: torch.Tensor | None  # long (N, T_out)

    def __len__(self) -> int:
        for t in (self.images, self.input_ids, self.labels, self.target_ids):
            if t is not None:
                return t.shape[0]
        return 0

    def batch(self, index: torch.Tensor, trim: bool = True) -> Batch:
        """The examples at ``index``; ``trim=False`` keeps texts at max_text_len (static shapes for compiled steps)."""

        def take(t):
            return None if t is None else t[index]

        images = take(self.images)
        input_ids, mask = take(self.input_ids), take(self.attention_mask)
        if mask is not None and trim:
            # pad to the longest text in this batch, not to max_text_len: padding is masked everywhere,
            # and short questions then cost a fraction of the compute
            length = max(int(mask.sum(1).max()), 1)
            input_ids, mask = input_ids[:, :length], mask[:, :length]
        return Batch(
            images=None if images is None else images.float().div_(255.0),
            input_ids=input_ids,
            attention_mask=mask,
            labels=take(self.labels),
            target_ids=take(self.target_ids),
        )


@dataclass
class TaskTensors:
    task: TaskSpec
    train: SplitTensors
    val: SplitTensors
    test: SplitTensors


def encode_targets(tokenizer, targets: list[str], max_len: int) -> torch.Tensor:
    """Target token ids followed by [SEP] as the end marker, padded with 0, truncated to ``max_len``."""
    out = torch.full((len(targets), max_len), PAD_ID, dtype=torch.long)
    encoded = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    for row, ids in enumerate(encoded):
        ids = ids[: max_len - 1] + [tokenizer.sep_token_id]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def input_tensors(task: TaskSpec, examples: Examples, tokenizer, spec: ModelSpec, where: str) -> SplitTensors:
    """The model inputs of ``examples`` (images, tokenised text of the task's modalities); no labels or targets.

    Training, evaluation and prediction all tokenise here, so a prediction sees exactly what evaluation saw.
    """
    images = input_ids = mask = None
    if "image" in task.modalities:
        if examples.images is None:
            raise DataError(where, "has no images but the task reads the image modality")
        images = torch.from_numpy(np.ascontiguousarray(examples.images))
    if "text" in task.modalities:
        if examples.texts is None:
            raise DataError(where, "has no text but the task reads the text modality")
        encoded = tokenizer(
            list(examples.texts),
            padding="max_length",
            truncation=True,
            max_length=spec.max_text_len,
            return_tensors="pt",
        )
        input_ids, mask = encoded["input_ids"], encoded["attention_mask"]
    return SplitTensors(images, input_ids, mask, None, None)


def _split_tensors(task: TaskSpec, examples: Examples, tokenizer, spec: ModelSpec, where: str) -> SplitTensors:
    split = input_tensors(task, examples, tokenizer, spec, where)
    if task.kind == "classification":
        index = {label: i for i, label in enumerate(task.labels or ())}
        unknown = sorted({label for label in examples.labels or [] if label not in index})
        if examples.labels is None or unknown:
            raise DataError(
                where,
                f"label {unknown[0]!r} is not in the task's label list" if unknown else "has no labels",
                "declare every label in the task's labels: list",
            )
        split.labels = torch.tensor([index[label] for label in examples.labels], dtype=torch.long)
    elif task.kind == "text_generation":
        if examples.targets is None:
            raise DataError(where, "has no target texts for a text_generation task")
        split.target_ids = encode_targets(tokenizer, examples.targets, spec.max_target_len)
    return split


def to_tensors(task: TaskSpec, data: TaskData, spec: ModelSpec, where: str = "") -> TaskTensors:
    """Tokenise and index one task's data. ``task.labels`` must hold the federation's label list."""
    tokenizer = load_tokenizer(spec.tokenizer)
    return TaskTensors(
        task=task,
        train=_split_tensors(task, data.train, tokenizer, spec, f"{where} train"),
        val=_split_tensors(task, data.val, tokenizer, spec, f"{where} val"),
        test=_split_tensors(task, data.test, tokenizer, spec, f"{where} test"),
    )


def sample_indices(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled example indices: epochs of a seeded permutation, the last partial batch dropped."""
    if n == 0:
        raise DataError("", "cannot train on an empty split")
    size = min(batch_size, n)
    g = generator(seed)
    while True:
        order = torch.randperm(n, generator=g)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


def sample_batches(split: SplitTensors, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless shuffled batches (see :func:`sample_indices`)."""
    for index in sample_indices(len(split), batch_size, seed):
        yield split.batch(index)


def ordered_batches(
    split: SplitTensors, batch_size: int, limit: int | None = None, trim: bool = True
) -> Iterator[Batch]:
    """The split in order (evaluation), at most ``limit`` examples."""
    n = len(split) if limit is None else min(limit, len(split))
    for start in range(0, n, batch_size):
        yield split.batch(torch.arange(start, min(start + batch_size, n)), trim)
