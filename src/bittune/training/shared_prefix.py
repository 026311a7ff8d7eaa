"""Rows that begin alike, computed once: a micro-batch's common prompt prefix runs through the model one time.

Chat data repeats the same system prompt and instruction at the start of every row (the demo's TREC rows share
41 of their ~60 tokens). With causal attention the prefix's hidden states, keys and values are the same in every
row, so the body runs the prefix once as a batch of one, keeps its keys and values (a ``DynamicCache``), expands
them to the batch (a view) and runs each row's remaining tokens against them. Backward sums the rows' gradients
through the expansion, so loss and gradients are the plain forward's. One difference, by design: with LoRA dropout
the prefix's tokens draw one dropout mask for all rows instead of one per row (each row's gradient is still an
unbiased draw; ``train.shared_prefix: false`` restores per-row masks).

Only the prefix in which no position's logits are needed is shared (the loss is computed over the rest), so the
head-at-targets loss (:func:`bittune.training.loss.causal_lm_target_loss_sum`) applies unchanged to the suffix.
"""

from __future__ import annotations

from typing import Any

import torch

# Share a prefix only when it saves at least this fraction of the micro-batch's padded tokens: the second forward
# call has a fixed cost (on a GPU, more kernel launches). A floor, not a measured break-even: bench/shared_prefix.py
# measured 1.3-1.7x at ~50% saved in float32, but 0.94x under CPU bf16 at batch 4 (its fixed costs weigh more there).
MIN_SAVED = 0.1


def shared_prefix_length(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *, min_saved: float = MIN_SAVED
) -> int:
    """How many leading tokens every row shares and no target needs (0: do not share).

    Position ``t``'s logits predict ``labels[:, t + 1]``; the shared prefix ends before the first position any row
    needs logits at, and before the first padding, and leaves every row at least one token of its own.
    """
    batch, width = input_ids.shape
    if batch < 2 or width < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    common = width if bool(same.all()) else int((~same).int().argmax())
    needed = (labels[:, 1:] != -100).any(0)  # needed[t]: some row has a target at t + 1
    first_needed = int(needed.int().argmax()) if bool(needed.any()) else width - 1
    prefix = min(common, first_needed, width - 1)
    saved = (batch - 1) * prefix / (batch * width)
    return prefix if prefix > 0 and saved >= min_saved else 0


def _expandable(cache: Any) -> bool:
    """A cache of plain full-attention layers (sliding-window or linear-attention layers are not shared)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def expand_cache(cache: Any, batch: int) -> bool:
    """Make ``cache``, one row's keys and values, serve ``batch`` rows: a view per layer (under autograd, backward
    sums the rows' gradients into it). False, the cache untouched, where it cannot be shared (sliding-window or
    linear-attention layers)."""
    if not _expandable(cache):
        return False
    for layer in cache.layers:
        layer.keys = layer.keys.expand(batch, -1, -1, -1)
        layer.values = layer.values.expand(batch, -1, -1, -1)
    return True


def shared_prefix_hidden(
    body: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor, prefix: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The body's last hidden states of every row's tokens after ``prefix``, and the labels they go with.

    Returns None when the model gave back no cache it can share (the caller then runs the plain forward).
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, width = ids.shape
    cache = body(input_ids=ids[:1, :prefix], attention_mask=mask[:1, :prefix], use_cache=True).past_key_values
    if not expand_cache(cache, batch):
        return None
    positions = torch.arange(prefix, width, device=ids.device).unsqueeze(0).expand(batch, -1)
    out = body(
        input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
    )
    return out.last_hidden_state, labels[:, prefix:]
