"""Accuracy by generation: ask the model each held-out question and compare its first word with the gold label."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bittune.demo.trec import LABELS, chat_messages

Progress = Callable[[int, int], None]


def normalize_answer(text: str) -> str:
    """Lowercase, replace punctuation by spaces and keep the first word (:func:`bittune.evaluation.metrics`)."""
    from bittune.evaluation.metrics import normalize_answer as normalize

    return normalize(text)


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
    """Greedy-generate a short reply to each conversation, batched with left padding, in input order.

    The shared :func:`bittune.evaluation.generation.generate_replies`: prompts rendered as the training recipe
    renders them, stopping at the model's eos.

    Args:
        max_new_tokens: Reply length cap; a one-word label needs at most 3-4 tokens.
        template: Chat template name as in ``data.template`` (``auto``: the tokenizer's own).
        progress: Called as ``progress(done, total)`` after each batch.
    """
    from bittune.evaluation.generation import Decoding, generate_replies

    decoding = Decoding(max_new_tokens=max_new_tokens, template=template)
    return generate_replies(model, tokenizer, conversations, decoding, batch_size=batch_size, progress=progress)


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
