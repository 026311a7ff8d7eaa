"""``bittune plan`` from the rows: the replayed epoch counts exactly what the training step computes."""

from __future__ import annotations

import pytest
import torch

from bittune.data import make_collator
from bittune.data.collate import count_tokens, step_passes
from bittune.plan.workload import replay_epoch
from bittune.training.loss import causal_lm_target_loss_sum
from bittune.training.schedule import epoch_steps
from test_perf_equivalence import VOCAB, lora, tiny_llama


def chat_like_rows(n: int, prefix: int = 9, seed: int = 0) -> list[dict[str, list[int]]]:
    """Rows that begin with the same ``prefix`` tokens (a system prompt), then a question and a short answer of
    their own lengths; labels on the answer only, as tokenized chat rows are."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(1, VOCAB, (prefix,), generator=g).tolist()
    rows = []
    for i in range(n):
        question = torch.randint(1, VOCAB, (3 + (7 * i) % 11,), generator=g).tolist()
        answer = torch.randint(1, VOCAB, (1 + i % 3,), generator=g).tolist()
        ids = [*head, 1 + i % (VOCAB - 1), *question, *answer]
        rows.append({"input_ids": ids, "labels": [-100] * (len(ids) - len(answer)) + answer})
    return rows


def measured_steps(model, rows, *, batch: int, accum: int, budget: int | None, share: bool) -> list[dict[str, int]]:
    """What the step really runs, step by step: tokens through the body (counted at the embedding), its forward
    calls, and the most tokens of any one pass."""
    embed = model.get_base_model().model.embed_tokens
    seen: list[int] = []
    hook = embed.register_forward_hook(lambda mod, args, out: seen.append(args[0].numel()))
    collate = make_collator("causal-lm", 0, False)
    out = []
    try:
        for step in epoch_steps(len(rows), batch, accum, seed=0, epoch=0):
            batches = [collate([rows[i] for i in micro]) for micro in step]
            calls, largest = len(seen), 0
            for p in step_passes(batches, budget):
                before = len(seen)
                with torch.no_grad():
                    causal_lm_target_loss_sum(model, {k: p[k] for k in ("input_ids", "attention_mask")}, p["labels"],
                                              share_prefix=share)  # fmt: skip
                largest = max(largest, sum(seen[before:]))
            out.append({"computed": sum(seen[calls:]), "forwards": len(seen) - calls, "largest": largest,
                        "real": sum(count_tokens(b) for b in batches)})  # fmt: skip
    finally:
        hook.remove()
    return out


@pytest.mark.parametrize(("share", "budget"), [(True, 640), (True, None), (False, 640)])
def test_replayed_epoch_counts_what_the_step_computes(share: bool, budget: int | None):
    model = lora(tiny_llama())
    rows = chat_like_rows(22)
    steps = measured_steps(model, rows, batch=4, accum=2, budget=budget, share=share)
    work = replay_epoch(
        rows, make_collator("causal-lm", 0, False), batch_size=4, grad_accum=2, seed=0,
        max_tokens_per_pass=budget, share_prefix=share, hidden=32, inner=64,
    )  # fmt: skip
    n = len(steps)
    assert work.steps == n == 3  # 22 rows in micro-batches of 4, two per step: 3 steps, the last one short
    assert work.real_tokens == pytest.approx(sum(s["real"] for s in steps) / n)
    assert work.computed_tokens == pytest.approx(sum(s["computed"] for s in steps) / n)
    assert work.forwards == pytest.approx(sum(s["forwards"] for s in steps) / n)
    assert work.max_pass_tokens == max(s["largest"] for s in steps)
    if share:  # the prefix once and the rows' own tokens without padding: well under the real tokens
        assert work.computed_tokens < 0.8 * work.real_tokens
    else:  # every row padded to its pass's longest
        assert work.computed_tokens > work.real_tokens


def test_max_steps_stops_the_replay():
    rows = chat_like_rows(40)
    collate = make_collator("causal-lm", 0, False)
    work = replay_epoch(rows, collate, batch_size=4, grad_accum=1, seed=0, max_tokens_per_pass=None,
                        share_prefix=True, hidden=32, max_steps=2)  # fmt: skip
    assert work.steps == 2
