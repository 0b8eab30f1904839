"""Stage 2's teacher outputs, computed once per training example instead of once per micro-step.

The teacher (the fine-tuned final global model) is frozen during distillation and
runs in eval mode (no dropout), so its output for an example is the same at every
step that draws the example. :class:`TeacherOutputs` runs it once over the union of
the examples that a window of upcoming micro-steps will draw — in large batches,
without autograd — and hands each micro-step its rows. A window holds at most
``budget_bytes`` of outputs (text generation keeps vocabulary logits per answer
token), so memory stays bounded however long the phase.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from tap_core.config import TaskSpec
from tap_core.model.tap_model import PAD_ID, TapModel
from tap_core.training.batches import SplitTensors

DEFAULT_BUDGET_BYTES = 256 * 2**20


def windows(draws: Sequence[torch.Tensor], example_bytes: torch.Tensor, budget_bytes: int) -> list[tuple[int, int]]:
    """Split micro-steps ``[0, len(draws))`` into consecutive windows whose distinct examples fit the budget.

    A window always takes at least one micro-step, even if that one alone exceeds the budget.
    """
    spans, start, seen, used = [], 0, set(), 0
    for k, index in enumerate(draws):
        new = {int(i) for i in index.tolist()} - seen
        extra = int(example_bytes[list(new)].sum()) if new else 0
        if k > start and used + extra > budget_bytes:
            spans.append((start, k))
            start, seen, used = k, set(), 0
            new = {int(i) for i in index.tolist()}
            extra = int(example_bytes[list(new)].sum())
        seen |= new
        used += extra
    if start < len(draws):
        spans.append((start, len(draws)))
    return spans


class TeacherOutputs:
    """The teacher's ``targets_only`` outputs for the examples of one task's training split, by example."""

    def __init__(
        self,
        teacher: TapModel,
        task: TaskSpec,
        split: SplitTensors,
        device: torch.device,
        batch_size: int,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ):
        self.teacher = teacher
        self.task = task
        self.split = split
        self.device = device
        self.batch_size = batch_size
        self.autocast = autocast
        # rows of output per example: text generation has one row per answer token, other kinds one "row"
        if task.kind == "text_generation":
            self.rows = (split.target_ids != PAD_ID).sum(1)
        else:
            self.rows = torch.ones(len(split), dtype=torch.long)
        self.values: torch.Tensor | None = None
        self.where: dict[int, int] = {}  # example -> its first row in ``values``

    @torch.no_grad()
    def _run(self, index: torch.Tensor) -> torch.Tensor:
        batch = self.split.batch(index).to(self.device)
        with self.autocast():
            return self.teacher(self.task.name, batch, targets_only=True)

    def example_bytes(self) -> torch.Tensor:
        """Bytes of output per example (from a one-example probe)."""
        probe = self._run(torch.zeros(1, dtype=torch.long))
        row_bytes = probe.element_size() * probe[0].numel()
        return self.rows * row_bytes

    def prepare(self, draws: Sequence[torch.Tensor]) -> None:
        """Compute (and keep only) the outputs of every example in ``draws``."""
        self.teacher.eval()
        examples = torch.unique(torch.cat(list(draws)))  # sorted
        outputs, self.where, row = [], {}, 0
        for start in range(0, len(examples), self.batch_size):
            index = examples[start : start + self.batch_size]
            outputs.append(self._run(index))
            for example in index.tolist():
                self.where[example] = row
                row += int(self.rows[example])
        self.values = torch.cat(outputs)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The outputs for a micro-batch, in the layout ``teacher(task, batch, targets_only=True)`` has."""
        assert self.values is not None, "prepare() first"
        counts = self.rows[index]
        starts = torch.tensor([self.where[int(i)] for i in index.tolist()], dtype=torch.long)
        # row r of example i sits at starts[i] + r: expand each example's start over its rows
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rows = torch.repeat_interleave(starts, counts) + offsets
        return self.values.index_select(0, rows.to(self.values.device))
