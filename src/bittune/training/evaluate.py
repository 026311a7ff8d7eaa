"""Evaluation: token-weighted loss and perplexity for causal LMs; loss, accuracy and macro-F1 for classifiers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from bittune.data.collate import count_targets
from bittune.training.loss import loss_sum

__all__ = ["count_targets", "evaluate", "macro_f1", "model_inputs"]


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The forward's keyword arguments from a collated batch, on ``device`` (labels go to bittune's own loss)."""
    from bittune.data import model_inputs as forward_kwargs

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in forward_kwargs(batch).items()}


def macro_f1(preds: list[int], golds: list[int], num_classes: int) -> float:
    """Unweighted mean of per-class F1 over classes that occur in gold or predictions."""
    from bittune.evaluation.metrics import macro_f1 as f1

    return f1(preds, golds, range(num_classes))


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    task: str,
    device: torch.device,
    autocast: Callable[[], Any] | None = None,
    predictions: list[tuple[int, int]] | None = None,
) -> dict[str, float]:
    """Run ``model`` over ``batches`` and return metrics (prefixed ``eval_``).

    Args:
        predictions: A classifier's ``(predicted, gold)`` class ids are appended here, row by row (for a confusion
            matrix).
    """
    from bittune.training.loss import causal_lm_target_loss_sum, supports_target_loss

    was_training = model.training
    model.eval()
    # A causal LM's loss needs the logits of label positions only: the head runs there (on chat data most positions
    # are prompt), and on CPU the rows' common prompt prefix runs once (as in training; same loss within rounding).
    targets_only = task != "classification" and supports_target_loss(model)
    share_prefix = targets_only and device.type == "cpu"
    context = autocast or contextlib.nullcontext
    total_loss, total_targets = 0.0, 0
    preds: list[int] = []
    golds: list[int] = []
    num_classes = 0
    for batch in batches:
        labels = batch["labels"].to(device)
        inputs = model_inputs(batch, device)
        if targets_only:
            with context():
                loss = causal_lm_target_loss_sum(model, inputs, labels, share_prefix=share_prefix)
        else:
            with context():
                logits = model(**inputs).logits
            loss = loss_sum(task, logits, labels)
        total_loss += float(loss)
        total_targets += count_targets(task, labels)
        if task == "classification":
            num_classes = logits.size(-1)
            preds.extend(logits.argmax(-1).tolist())
            golds.extend(labels.tolist())
    model.train(was_training)
    if predictions is not None:
        predictions.extend(zip(preds, golds))
    if total_targets == 0:
        return {}
    loss = total_loss / total_targets
    out = {"eval_loss": loss}
    if task == "classification":
        out["eval_accuracy"] = sum(p == g for p, g in zip(preds, golds)) / len(golds)
        out["eval_f1_macro"] = macro_f1(preds, golds, num_classes)
    else:
        out["eval_perplexity"] = math.exp(min(loss, 50.0))
    return out
