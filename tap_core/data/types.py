"""What a data adapter hands to training: raw examples of one task, split three ways.

Adapters only read and normalise data (images resized to the model's square
size as uint8 RGB, text as str, labels as str). Tokenising and mapping labels to
head indices happens later (tap_core.training.batches), once the federation's
label spaces are known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Examples:
    """One split of one task. Every present field has the same length N."""

    images: np.ndarray | None = None  # uint8, shape (N, 3, S, S)
    texts: list[str] | None = None  # model input text: the sentence, question or prompt
    labels: list[str] | None = None  # classification: label strings
    targets: list[str] | None = None  # text generation: target strings

    def __len__(self) -> int:
        for value in (self.images, self.texts, self.labels, self.targets):
            if value is not None:
                return len(value)
        return 0

    def subset(self, index: np.ndarray) -> "Examples":
        def take(value):
            if value is None:
                return None
            if isinstance(value, np.ndarray):
                return value[index]
            return [value[int(i)] for i in index]

        return Examples(take(self.images), take(self.texts), take(self.labels), take(self.targets))


@dataclass
class TaskData:
    """Train / validation / test splits of one task on one silo."""

    train: Examples
    val: Examples
    test: Examples

    @property
    def label_set(self) -> list[str]:
        """Labels seen in any split, in first-seen order."""
        seen: dict[str, None] = {}
        for split in (self.train, self.val, self.test):
            for label in split.labels or []:
                seen.setdefault(label, None)
        return list(seen)
