"""Accuracy by generation: ask the model each held-out question and compare its first word with the gold label."""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bittune.demo.trec import LABELS, chat_messages

# Maps every punctuation character to a space, so "Number." and "number:" both normalise to "number".
_PUNCT = str.maketrans({c: " " for c in string.punctuation})

Progress = Callable[[int, int], None]


def normalize_answer(text: str) -> str:
    """Lowercase, replace punctuation by spaces and keep the first word ("" when nothing is left)."""
    words = text.lower().translate(_PUNCT).split()
    return words[0] if words else ""


@dataclass
class EvalResult:
    """Accuracy of one model on the held-out questions."""

    accuracy: float
    per_class: dict[str, float]
    counts: dict[str, int]
    answers: list[str]  # normalised answer per row, in the input order
    raw: list[str]  # decoded generation per row
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-row answers)."""
        return {
            "accuracy": self.accuracy,
            "per_class": self.per_class,
            "counts": self.counts,
            "seconds": round(self.seconds, 1),
            **self.extra,
        }


def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 4,
    template: str = "auto",
    progress: Progress | None = None,
) -> list[str]:
    """Greedy-generate a short reply to each conversation, batched with left padding.

    Conversations are processed shortest first so a batch pads little; replies come back in input order.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer, with a chat template.
        conversations: Chat messages ending with the user turn.
        batch_size: Rows per ``generate`` call.
        max_new_tokens: Reply length cap; a one-word label needs at most 3-4 tokens.
        template: Chat template name as in ``data.template`` (``auto``: the tokenizer's own).
        progress: Called as ``progress(done, total)`` after each batch.
    """
    import torch

    from bittune.data import render_prompt

    # The training recipe's own prompt rendering, so the model is asked exactly as it was trained.
    prompts = [render_prompt(list(c), tokenizer, template) for c in conversations]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    replies: list[str] = [""] * len(prompts)
    old_side = tokenizer.padding_side
    # Left padding keeps every prompt's last token at the end of the row, where generation continues from.
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tokenizer(
                    [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(model.device)
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, top_p=None, top_k=None
                )
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for i, text in zip(idx, texts, strict=True):
                    replies[i] = text.strip()
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
    finally:
        tokenizer.padding_side = old_side
    return replies


def evaluate_questions(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 4,
    progress: Progress | None = None,
) -> EvalResult:
    """Accuracy of ``model`` on held-out rows ``{"question", "label"}`` (label: a word from ``LABELS``).

    Answers that are not one of the six labels count as wrong; their share is reported as ``off_label``.
    """
    t0 = time.perf_counter()
    raw = generate_answers(
        model,
        tokenizer,
        [chat_messages(r["question"]) for r in rows],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    answers = [normalize_answer(t) for t in raw]
    gold = [r["label"] for r in rows]
    counts = {lab: gold.count(lab) for lab in LABELS if lab in gold}
    per_class = {
        lab: sum(a == g for a, g in zip(answers, gold, strict=True) if g == lab) / n for lab, n in counts.items()
    }
    n = len(rows)
    correct = sum(a == g for a, g in zip(answers, gold, strict=True))
    off = sum(a not in LABELS for a in answers)
    return EvalResult(
        accuracy=correct / n if n else 0.0,
        per_class=per_class,
        counts=counts,
        answers=answers,
        raw=raw,
        seconds=time.perf_counter() - t0,
        extra={"n": n, "off_label": off / n if n else 0.0},
    )
