"""Losses normalised by the real number of targets in an optimizer step.

With gradient accumulation, averaging each micro-batch's mean loss weights a short sequence as much as a long
one, so ``accumulate 4 x batch 1`` is not ``batch 4``. Here every micro-batch returns its *sum* of token losses
divided by the number of target tokens in the whole step, so the accumulated gradient equals the big batch's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
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


# --- logits only where there are targets ---------------------------------------------------------------------------
#
# On chat data most positions are prompt tokens, and the output head (hidden x vocab, e.g. 576 x 49,152) is a large
# share of a small model's FLOPs. The full-logits path also materialises float32 [tokens x vocab] logits, their
# log-softmax and their gradient at once (hundreds of MB). Here the body runs alone, the hidden states at label
# positions are gathered, and the head plus cross-entropy run over them in chunks; each chunk's gradient with
# respect to its hidden states (and the head's weight, when it trains) is computed right away, so no chunk's
# logits outlive it. Same loss and gradients as ``causal_lm_loss_sum(model(**inputs).logits, labels)``.

HEAD_CHUNK = 512  # target tokens per head matmul: 512 x 49,152 x 4 B = 100 MB of float32 logits at most
# Config fields of models whose forward transforms the head's output (softcapping, scaling): not split here.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def _split_model(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(body, head) of a plain or PEFT-wrapped causal LM whose logits are exactly ``head(body(...)[0])``."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) or type(model).__name__.startswith("FSDP"):
        return None  # a wrapper's own forward must run (gradient sync): keep the plain path there
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the model LoRA is in
    config = getattr(base, "config", None)
    get_head = getattr(base, "get_output_embeddings", None)
    body = getattr(base, getattr(base, "base_model_prefix", "") or "", None)
    if config is None or get_head is None or not isinstance(body, torch.nn.Module) or body is base:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text_config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING):
        return None
    head = get_head()
    return (body, head) if isinstance(head, torch.nn.Module) else None


def supports_target_loss(model: torch.nn.Module) -> bool:
    """Whether :func:`causal_lm_target_loss_sum` can split ``model`` into body and head (else use the logits)."""
    return _split_model(model) is not None


def causal_lm_target_loss_sum(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    labels: torch.Tensor,
    *,
    chunk: int = HEAD_CHUNK,
    share_prefix: bool = False,
) -> torch.Tensor:
    """Summed next-token cross-entropy, with the output head applied only at positions that have a target.

    Equals ``causal_lm_loss_sum(model(**inputs).logits, labels)`` (loss and gradients, within float rounding) for
    causal LMs whose logits are ``head(body(...))``, plain or PEFT-wrapped, tied or untied head; check
    :func:`supports_target_loss` first (distributed wrappers and models with logit softcapping/scaling are not).

    Args:
        model: The causal LM (``transformers`` ``*ForCausalLM`` or a PEFT model around one).
        inputs: The forward's keyword arguments (``input_ids``, ``attention_mask`` or ``position_ids``, ...).
        labels: ``[batch, seq]`` token ids, -100 where there is no target (unshifted, as for the full path).
        chunk: Target tokens per head matmul; bounds the float32 logits alive at once.
        share_prefix: Run the rows' common prompt prefix once (:mod:`bittune.training.shared_prefix`) where it
            saves enough; padded batches only (not packed rows).
    """
    split = _split_model(model)
    if split is None:
        raise ValueError(f"{type(model).__name__} cannot be split into body and head; use causal_lm_loss_sum")
    body, head = split
    hidden, labels = _body_hidden(body, inputs, labels, share_prefix)
    mask = labels[:, 1:] != -100
    picked = hidden[:, :-1][mask]  # [targets, hidden]
    targets = labels[:, 1:][mask].to(hidden.device)
    if picked.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph (and every process's collectives) as with no targets
    if type(head) is torch.nn.Linear and torch.is_grad_enabled():
        return _HeadCrossEntropy.apply(picked, head.weight, head.bias, targets, chunk)
    # Any other head (a LoRA-wrapped or modules_to_save head), or no grad: per chunk, recomputed in backward.
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    grad = torch.is_grad_enabled()
    total = picked.new_zeros((), dtype=torch.float32)
    for lo in range(0, picked.shape[0], chunk):
        h, t = picked[lo : lo + chunk], targets[lo : lo + chunk]
        total = total + (checkpoint(chunk_loss, h, t, use_reentrant=False) if grad else chunk_loss(h, t))
    return total


def _body_hidden(
    body: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor, share_prefix: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The body's last hidden states and the labels they go with (the rows after a shared prefix, if one is run)."""
    if share_prefix and set(inputs) == {"input_ids", "attention_mask"}:
        from bittune.training.shared_prefix import shared_prefix_hidden, shared_prefix_length

        prefix = shared_prefix_length(inputs["input_ids"], inputs["attention_mask"], labels)
        shared = shared_prefix_hidden(body, inputs, labels, prefix) if prefix else None
        if shared is not None:
            return shared
    out = body(**inputs)
    return (out[0] if isinstance(out, tuple) else out.last_hidden_state), labels


class _HeadCrossEntropy(torch.autograd.Function):
    """sum CE(h @ W^T + b, targets) over chunks of rows; gradients are computed per chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk):
            h, t = hidden[lo : lo + chunk], targets[lo : lo + chunk]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # d CE / d logits
            g = probs.to(h.dtype if h.dtype == weight.dtype else torch.promote_types(h.dtype, weight.dtype))
            if need_h:
                grad_h[lo : lo + chunk] = (g @ weight.to(g.dtype)).to(grad_h.dtype)
            if need_w:
                grad_w += g.float().T @ h.float()
            if need_b:
                grad_b += probs.sum(0)
        # The parameters' gradients in their own dtype (accumulated in float32 above).
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None)


class TaskLoss:
    """The loss of plain training: the task's own loss summed over a batch's targets (see :func:`loss_sum`).

    A loss function of the training step is called as ``loss_fn(logits, labels, inputs)`` and returns
    ``(loss_sum, task_part)``: the sum to divide by the step's target count, and the task-loss part of it when the
    loss has other parts (distillation, :class:`bittune.training.distill.DistillLoss`), else None.
    """

    def __init__(self, task: str, *, head_at_targets: bool = False, share_prefix: bool = False) -> None:
        self.task = task
        # Causal LM: the step may compute this loss with the output head applied only at label positions
        # (:func:`causal_lm_target_loss_sum`, same loss and gradients) instead of from the full logits, and with
        # the rows' common prompt prefix run once (:mod:`bittune.training.shared_prefix`).
        self.head_at_targets = head_at_targets and task != "classification"
        self.share_prefix = share_prefix and self.head_at_targets

    def targets(self, labels: torch.Tensor) -> int:
        """How many loss terms ``labels`` holds (the normaliser of the step's loss)."""
        return count_targets(self.task, labels)

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return loss_sum(self.task, logits, labels), None


def targets_only(loss_fn: Any, model: torch.nn.Module) -> bool:
    """Whether the step computes ``loss_fn``'s loss with the head only at label positions for ``model``."""
    return bool(getattr(loss_fn, "head_at_targets", False)) and supports_target_loss(model)


def micro_batch_loss(
    model: torch.nn.Module,
    loss_fn: Any,
    inputs: dict[str, Any],
    labels: torch.Tensor,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One training micro-batch's ``(summed loss, task part or None)``, as ``loss_fn`` defines it.

    The one place where the training step runs the model and its loss, whichever path it takes (so a test that
    injects a bad loss patches this): with :func:`targets_only`, the causal LM's head only at label positions
    (:func:`causal_lm_target_loss_sum`); else ``loss_fn`` of the full logits (classification, a model that cannot
    be split, and :class:`bittune.training.distill.DistillLoss`, whose KL term needs the student's logits).

    Args:
        autocast: The forward's autocast context (``Processes.autocast``); the loss itself is computed in float32.
    """
    if targets_only(loss_fn, model):
        with autocast():
            return causal_lm_target_loss_sum(model, inputs, labels, share_prefix=loss_fn.share_prefix), None
    with autocast():
        logits = model(**inputs).logits
    return loss_fn(logits, labels, inputs)
