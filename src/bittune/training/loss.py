"""Losses normalised by the real number of targets in an optimizer step.

With gradient accumulation, averaging each micro-batch's mean loss weights a short sequence as much as a long
one, so ``accumulate 4 x batch 1`` is not ``batch 4``. Here every micro-batch returns its *sum* of token losses
divided by the number of target tokens in the whole step, so the accumulated gradient equals the big batch's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bittune.data.collate import count_targets  # the one count of loss terms


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not -100 (computed in float32)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def loss_sum(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed loss for ``task``; divide by the step's target count before backward."""
    if task == "classification":
        return classification_loss_sum(logits, labels)
    return causal_lm_loss_sum(logits, labels)


class TaskLoss:
    """The loss of plain training: the task's own loss summed over a batch's targets (see :func:`loss_sum`).

    A loss function of the training step is called as ``loss_fn(logits, labels, inputs)`` and returns
    ``(loss_sum, task_part)``: the sum to divide by the step's target count, and the task-loss part of it when the
    loss has other parts (distillation, :class:`bittune.training.distill.DistillLoss`), else None.
    """

    def __init__(self, task: str) -> None:
        self.task = task

    def targets(self, labels: torch.Tensor) -> int:
        """How many loss terms ``labels`` holds (the normaliser of the step's loss)."""
        return count_targets(self.task, labels)

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return loss_sum(self.task, logits, labels), None
