"""What a run's own rows cost per optimizer step: the tokens its forward passes really compute.

Without data, :func:`bittune.plan.estimate` sizes every row at ``data.max_length``. Chat rows are often much
shorter, and on CPU the step also runs each pass's common prompt prefix once and packs the rows' own tokens
(:mod:`bittune.training.shared_prefix`): on the demo's TREC questions a step computes under a fifth of
``batch x max_length`` tokens. :func:`replay_epoch` replays the first epoch's batching on the tokenized rows with the
training step's own functions (epoch order, collation, pooled passes, prefix length, the packing rule) and counts,
without a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Workload:
    """Tokens per optimizer step of a run's first epoch, from its own rows.

    Attributes:
        steps: Optimizer steps replayed (the first epoch, at most ``max_steps``).
        real_tokens: Mean non-padding input tokens per step (what tokens/s counts).
        computed_tokens: Mean tokens through the model's body per step: each pass's shared prefix once, then its
            rows' own tokens, packed or padded as the step runs them.
        target_tokens: Mean label positions per step (where the output head runs).
        keys_per_token: Mean keys each computed token's query meets in attention (prefix plus its pass's width).
        forwards: Mean forward calls of the body per step (one per pass, two where its prefix runs on its own).
        max_pass_tokens: Most tokens through the body in one pass: what is alive for backward at once.
        max_pass_targets: Most label positions in one pass.
    """

    steps: int
    real_tokens: float
    computed_tokens: float
    target_tokens: float
    keys_per_token: float
    forwards: float
    max_pass_tokens: int
    max_pass_targets: int


@dataclass(frozen=True)
class _Pass:
    computed: int
    keys: int  # sum over computed tokens of the keys each attends to
    targets: int
    forwards: int


def _pass_cost(batch: dict[str, Any], *, share: bool, hidden: int, inner: int | None) -> _Pass:
    """Tokens one collated pass computes, as :func:`bittune.training.loss.causal_lm_target_loss_sum` runs it."""
    from bittune.data.collate import count_targets
    from bittune.training.shared_prefix import packing_pays, shared_prefix_length

    ids, labels = batch["input_ids"], batch["labels"]
    rows, width = ids.shape
    targets = count_targets("classification" if labels.dim() == 1 else "causal-lm", labels)
    mask = batch.get("attention_mask")
    prefix = shared_prefix_length(ids, mask, labels) if share and mask is not None and labels.dim() == 2 else 0
    if not prefix:
        return _Pass(rows * width, rows * width * width, targets, 1)
    own = (mask[:, prefix:].sum(1)).tolist()
    rest = width - prefix
    if packing_pays(own, rest, prefix, hidden, inner):
        n = sum(own)
        return _Pass(prefix + n, prefix * prefix + n * (prefix + n), targets, 2)
    return _Pass(prefix + rows * rest, prefix * prefix + rows * rest * (prefix + rest), targets, 2)


def replay_epoch(
    rows: list[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    *,
    batch_size: int,
    grad_accum: int,
    seed: int,
    max_tokens_per_pass: int | None,
    share_prefix: bool,
    hidden: int,
    inner: int | None = None,
    max_steps: int | None = None,
) -> Workload:
    """Count the first epoch's steps of ``rows`` as one process trains them (see the module docstring).

    Args:
        rows: Tokenized training rows (``PreparedData.train``).
        collate: ``bittune.data.make_collator(...)`` for them.
        batch_size, grad_accum, seed: The run's.
        max_tokens_per_pass: The resolved pass budget (``bittune.data.collate.pass_budget``; None: one pass per
            micro-batch).
        share_prefix: Whether the step shares prompt prefixes (``training.shared_prefix.prefix_sharing``).
        hidden, inner: The model's hidden and MLP widths (the packing rule weighs them).
        max_steps: Stop after this many steps (the run's ``max_steps``).
    """
    from bittune.data.collate import count_tokens, step_passes
    from bittune.training.schedule import epoch_steps

    steps = epoch_steps(len(rows), batch_size, grad_accum, seed, epoch=0)[:max_steps]
    real = computed = keys = targets = forwards = 0
    max_tokens = max_targets = 0
    for step in steps:
        batches = [collate([rows[i] for i in micro]) for micro in step if micro]
        real += sum(count_tokens(b) for b in batches)
        for p in step_passes(batches, max_tokens_per_pass):
            cost = _pass_cost(p, share=share_prefix, hidden=hidden, inner=inner)
            computed, keys, targets = computed + cost.computed, keys + cost.keys, targets + cost.targets
            forwards += cost.forwards
            max_tokens, max_targets = max(max_tokens, cost.computed), max(max_targets, cost.targets)
    n = max(len(steps), 1)
    return Workload(
        steps=len(steps),
        real_tokens=real / n,
        computed_tokens=computed / n,
        target_tokens=targets / n,
        keys_per_token=keys / max(computed, 1),
        forwards=forwards / n,
        max_pass_tokens=max_tokens,
        max_pass_targets=max_targets,
    )
