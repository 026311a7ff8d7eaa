"""Losses normalised by the real number of targets in an optimizer step.

With gradient accumulation, averaging each micro-batch's mean loss weights a short sequence as much as a long
one, so ``accumulate 4 x batch 1`` is not ``batch 4``. Here every micro-batch returns its *sum* of token losses
divided by the number of target tokens in the whole step, so the accumulated gradient equals the big batch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
