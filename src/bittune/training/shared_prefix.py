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

After the prefix, the rows' own tokens run as one packed row without their padding, each kept to the prefix and
its own row by a boolean mask, wherever that costs fewer FLOPs than the padded rows (short-answer chat rows of
different lengths: a third fewer tokens through every linear layer on the demo's data).

Under gradient checkpointing (QLoRA's default) the prefix still runs once: its pass of one row keeps its
activations, and the rows' checkpointed layers read its keys and values from a cache that stores nothing, so the
recompute in backward sees exactly what the forward saw.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

# Share a prefix only when it saves at least this fraction of the micro-batch's padded tokens: the second forward
# call has a fixed cost (on a GPU, more kernel launches). A floor, not a measured break-even: bench/shared_prefix.py
# measured 1.3-1.7x at ~50% saved in float32, but 0.94x under CPU bf16 at batch 4 (its fixed costs weigh more there).
MIN_SAVED = 0.1


def prefix_sharing(setting: bool | str, device_type: str) -> bool:
    """``train.shared_prefix`` resolved: ``auto`` shares on CPU, where it was measured to pay."""
    if setting is False:
        return False
    return setting is True or device_type == "cpu"


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

    The rows' own tokens run packed into one row where that costs less (:func:`_packed_rows`; the labels returned
    then line up with the packed row), else padded as given. Under activation checkpointing the prefix pass (one
    row) runs whole, and the rows' checkpointed layers read the prefix's keys and values from a cache they never
    write (:func:`read_only_prefix`), so their recompute in backward sees what their forward saw.

    Returns None when the model gave back no cache it can share (the caller then runs the plain forward).
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, width = ids.shape
    layers, models = _checkpointing(body)
    if layers and not _layers_can_keep_the_cache():
        return None
    with _set_on(layers + models, "gradient_checkpointing", False):
        cache = body(input_ids=ids[:1, :prefix], attention_mask=mask[:1, :prefix], use_cache=True).past_key_values
    packed = _packed_rows(body, ids, mask, labels, prefix)
    shared = read_only_prefix(cache, 1 if packed is not None else batch)
    if shared is None:
        return None
    if packed is not None:
        rows = {"input_ids": packed.ids, "attention_mask": packed.mask, "position_ids": packed.positions}
    else:
        positions = torch.arange(prefix, width, device=ids.device).unsqueeze(0).expand(batch, -1)
        rows = {"input_ids": ids[:, prefix:], "attention_mask": mask, "position_ids": positions}
    # The layers stay checkpointed, with transformers' opt-in for layers that only read the cache
    # (GradientCheckpointingLayer); a model whose own forward drops the cache when checkpointing (GPT-2) has its
    # flag off for this pass: it only decides whether the layers get the cache.
    with _set_on(layers, "_can_checkpoint_with_cache", True), _set_on(models, "gradient_checkpointing", False):
        out = body(**rows, past_key_values=shared)
    if not all(layer.read for layer in shared.layers):  # a model that dropped the cache: not the rows' states
        return None
    return out.last_hidden_state, (packed.labels if packed is not None else labels[:, prefix:])


class _Packed(NamedTuple):
    ids: torch.Tensor  # [1, n]: every row's own tokens, one row after another
    positions: torch.Tensor  # [1, n]: each token's position in its own row
    mask: torch.Tensor  # [1, 1, n, prefix + n]: the prefix, then causal within the token's own row
    labels: torch.Tensor  # [1, n]: labels[0, t + 1] is hidden t's target (-100 at each row's last token)


def packing_pays(own: list[int], width: int, prefix: int, hidden: int, inner: int | None = None) -> bool:
    """Whether rows of ``own`` tokens each after a ``prefix`` (padded to ``width``) cost fewer FLOPs packed into one
    row than padded: per token the layer's matmuls (``inner``: the MLP width, default ``4 * hidden``), per attended
    pair ``4 * hidden`` (a packed row attends over all its tokens, masked)."""
    inner = inner or 4 * hidden
    batch, n = len(own), sum(own)
    token_flops, pair_flops = 2 * (4 * hidden * hidden + 3 * hidden * inner), 4 * hidden
    padded_cost = batch * width * token_flops + batch * width * (prefix + width) * pair_flops
    packed_cost = n * token_flops + n * (prefix + n) * pair_flops
    return packed_cost < padded_cost


def _packed_rows(
    body: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, prefix: int
) -> _Packed | None:
    """The rows' own tokens (after the shared prefix) packed into one row without their padding, with the mask that
    keeps each row to the prefix and its own tokens; None where the padded layout costs less (or cannot be packed).

    On short-answer chat data a third of the padded rows' tokens can be padding (rows of 5 to 25 own tokens padded
    to the longest); packed, no linear layer runs on them. Attention then spans all packed tokens (masked), so
    packing is chosen by arithmetic: per token the layer's matmuls, per attended pair ``4 * hidden`` FLOPs.
    Needs an attention that takes a boolean 4-D mask (sdpa) and right-padded rows.
    """
    from bittune.training.precision import FP32_SDPA

    config = getattr(body, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", FP32_SDPA):
        return None
    own = mask[:, prefix:].bool()
    batch, width = own.shape
    counts = own.sum(1)
    steps = torch.arange(width, device=own.device)
    if not bool((own == (steps < counts[:, None])).all()):  # not right-padded
        return None
    n = int(counts.sum())
    hidden = config.hidden_size
    if not packing_pays(counts.tolist(), width, prefix, hidden, getattr(config, "intermediate_size", None)):
        return None
    row = torch.arange(batch, device=own.device)[:, None].expand(batch, width)[own]
    pos = (steps + prefix)[None].expand(batch, width)[own]
    attend = (row[:, None] == row[None, :]) & (pos[:, None] >= pos[None, :])
    full = torch.cat([attend.new_ones(n, prefix), attend], dim=1)
    # hidden t predicts its own row's next label; a row's last token predicts nothing (its next is padding)
    nxt = torch.full_like(labels[:, prefix:], -100)
    nxt[:, :-1] = labels[:, prefix + 1 :].masked_fill(~own[:, 1:], -100)
    targets = nxt[own]
    shifted = torch.cat([targets.new_full((1,), -100), targets[:-1]])
    return _Packed(ids[:, prefix:][own][None], pos[None], full[None, None], shifted[None])


def read_only_prefix(cache: Any, batch: int) -> Any:
    """A cache serving ``cache``'s one row of keys and values to ``batch`` rows (a view) that returns each layer's
    prefix with the rows' own keys and values appended and stores nothing; None where ``cache`` cannot be shared."""
    if not expand_cache(cache, batch):
        return None
    from transformers.cache_utils import DynamicCache

    shared = DynamicCache()
    prefix_layer = _prefix_layer_class()
    shared.layers = [prefix_layer(layer.keys, layer.values) for layer in cache.layers]
    return shared


@functools.cache
def _prefix_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        """One layer's shared prefix: ``update`` returns it with the new states appended and keeps nothing."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values = keys, values
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self.read = False

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.read = True
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return PrefixLayer


def _checkpointing(body: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """The body's modules under activation checkpointing in this (training) pass: its layers, and the others with
    the flag (the model itself)."""
    if not (body.training and torch.is_grad_enabled()):
        return [], []
    from transformers.modeling_layers import GradientCheckpointingLayer

    flagged = [m for m in body.modules() if getattr(m, "gradient_checkpointing", False) is True]
    layers = [m for m in flagged if isinstance(m, GradientCheckpointingLayer)]
    return layers, [m for m in flagged if not isinstance(m, GradientCheckpointingLayer)]


def _layers_can_keep_the_cache() -> bool:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


@contextlib.contextmanager
def _set_on(modules: list[torch.nn.Module], name: str, value: Any) -> Iterator[None]:
    """``module.name = value`` on each of ``modules`` inside the block, their own values (or none) restored after."""
    missing = object()
    before = [m.__dict__.get(name, missing) for m in modules]
    for m in modules:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, old in zip(modules, before, strict=True):
            if old is missing:
                delattr(m, name)
            else:
                setattr(m, name, old)
