"""Trivial predictors: the score a task's model must beat to have learned anything (TAP_SPEC §5).

Each is fitted on the silo's own training split and scored on its test split
with the same metric as the models:

- classification: the majority training label (among the silo's own labels);
- text generation: the most frequent training answer to the same input text
  (easy-VQA: the question-only answer), else the most frequent answer overall;
- image generation: the mean training image (R^2 near 0 by construction).
"""

from __future__ import annotations

from collections import Counter

import torch

from tap_core.model.tap_model import Batch
from tap_core.training.batches import SplitTensors, TaskTensors
from tap_core.training.metrics import PRIMARY, ImageGenerationMetrics, TextGenerationMetrics

_CHUNK = 256  # test examples per metric update (bounds the memory of the broadcast mean image)


def trivial_score(tensors: TaskTensors, end_id: int) -> float:
    """The primary score of the task's trivial predictor on its test split."""
    kind = tensors.task.kind
    train, test = tensors.train, tensors.test
    if len(test) == 0:
        return 0.0
    if kind == "classification":
        return _majority_accuracy(train.labels, test.labels)
    if kind == "text_generation":
        return _frequent_answer_exact_match(train, test, end_id)
    if kind == "image_generation":
        return _mean_image_r2(train.images, test.images)
    raise ValueError(f"unknown task kind {kind!r}")


def _majority_accuracy(train: torch.Tensor, test: torch.Tensor) -> float:
    counts = torch.bincount(train)
    majority = int(counts.argmax())  # ties: the lowest index, i.e. the first label in plan order
    return float((test == majority).float().mean())


def _input_key(split: SplitTensors, row: int) -> tuple[int, ...]:
    """The row's input text as token ids (padding removed); () without text."""
    if split.input_ids is None or split.attention_mask is None:
        return ()
    length = int(split.attention_mask[row].sum())
    return tuple(split.input_ids[row, :length].tolist())


def _frequent_answer_exact_match(train: SplitTensors, test: SplitTensors, end_id: int) -> float:
    by_input: dict[tuple[int, ...], Counter] = {}
    overall: Counter = Counter()
    for row in range(len(train)):
        answer = tuple(train.target_ids[row].tolist())
        by_input.setdefault(_input_key(train, row), Counter())[answer] += 1
        overall[answer] += 1

    def most_frequent(counter: Counter) -> tuple[int, ...]:
        return min(counter.items(), key=lambda item: (-item[1], item[0]))[0]  # deterministic on ties

    fallback = most_frequent(overall)
    predicted = torch.tensor(
        [
            list(most_frequent(by_input[key]) if key in by_input else fallback)
            for key in (_input_key(test, row) for row in range(len(test)))
        ],
        dtype=torch.long,
    )
    metric = TextGenerationMetrics(end_id)
    metric.update_ids(predicted, test.target_ids)
    return metric.result()[PRIMARY["text_generation"]]


def _mean_image_r2(train: torch.Tensor, test: torch.Tensor) -> float:
    mean_image = train.double().mean(0) / 255.0
    metric = ImageGenerationMetrics()
    for start in range(0, test.shape[0], _CHUNK):
        images = test[start : start + _CHUNK].double() / 255.0
        metric.update(mean_image.expand_as(images), Batch(images=images))
    return metric.result()[PRIMARY["image_generation"]]
