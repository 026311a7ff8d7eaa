"""Metrics on fixed predictions: accuracy, macro-F1, per-class accuracy, confusion matrix, perplexity, and an exact
paired test of two models scored on the same rows.

Pure Python (no torch), so every command that scores predictions (``eval``, ``compare``, ``report``, the demo)
computes the same numbers from the same lists.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Any

# A prediction that is none of the labels (a generated answer off the label set) is counted in this column.
OTHER = "(other)"
# Every punctuation character becomes a space, so "Number." and "number:" both normalise to "number".
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token-level cross-entropy (capped at exp(50) so a diverged model stays finite)."""
    return math.exp(min(loss, 50.0))


def accuracy(preds: Sequence[Any], golds: Sequence[Any]) -> float:
    """Share of positions where ``preds`` equals ``golds`` (0.0 for no rows)."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold labels")
    return sum(p == g for p, g in zip(preds, golds)) / len(golds) if golds else 0.0


def macro_f1(preds: Sequence[Any], golds: Sequence[Any], labels: Sequence[Any] | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in ``golds`` or ``preds``.

    Args:
        labels: The class set; a prediction outside it still counts as a false negative of its gold class. Default:
            every value seen in ``golds`` or ``preds``.
    """
    classes = list(labels) if labels is not None else sorted(set(golds) | set(preds), key=str)
    scores = []
    for c in classes:
        tp = sum(1 for p, g in zip(preds, golds) if p == c and g == c)
        fp = sum(1 for p, g in zip(preds, golds) if p == c and g != c)
        fn = sum(1 for p, g in zip(preds, golds) if p != c and g == c)
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def confusion_matrix(preds: Sequence[Any], golds: Sequence[Any], labels: Sequence[Any]) -> list[list[int]]:
    """Counts ``[gold][predicted]`` in ``labels`` order, plus a last column for predictions outside ``labels``."""
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for p, g in zip(preds, golds):
        if g in index:
            matrix[index[g]][index.get(p, len(labels))] += 1
    return matrix


def per_class_accuracy(preds: Sequence[Any], golds: Sequence[Any], labels: Sequence[Any]) -> dict[str, float]:
    """Accuracy on the rows of each gold class (its recall), for classes present in ``golds``."""
    out: dict[str, float] = {}
    for lab in labels:
        rows = [p == g for p, g in zip(preds, golds) if g == lab]
        if rows:
            out[str(lab)] = sum(rows) / len(rows)
    return out


def paired_exact_test(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test of two models scored right/wrong on the same rows.

    Only the rows where exactly one model is right carry evidence; under "equally accurate" each of those is a fair
    coin, so the two-sided p-value is the binomial tail of the smaller count. Returns ``{"a_only", "b_only",
    "p_value"}``: e.g. 27 vs 7 discordant rows gives p = 0.0008, 9 vs 8 gives p = 1.0.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"{len(a_correct)} rows scored for model a, {len(b_correct)} for model b")
    a_only = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    b_only = sum(1 for a, b in zip(a_correct, b_correct) if b and not a)
    n, k = a_only + b_only, min(a_only, b_only)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def label_metrics(preds: Sequence[Any], golds: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    """Everything a label task reports: accuracy, macro-F1, per-class accuracy, confusion matrix, off-label share.

    Returns:
        ``{"accuracy", "f1_macro", "per_class", "confusion": {"labels", "matrix"}, "off_label", "n"}``; the
        matrix's last column counts predictions that are none of ``labels``.
    """
    n = len(golds)
    known = set(labels)
    return {
        "accuracy": accuracy(preds, golds),
        "f1_macro": macro_f1(preds, golds, labels),
        "per_class": per_class_accuracy(preds, golds, labels),
        "confusion": {"labels": [str(x) for x in labels] + [OTHER], "matrix": confusion_matrix(preds, golds, labels)},
        "off_label": sum(p not in known for p in preds) / n if n else 0.0,
        "n": n,
    }


def normalize_answer(text: str) -> str:
    """Lowercase, replace punctuation by spaces and keep the first word ("" when nothing is left)."""
    words = text.lower().translate(_PUNCT).split()
    return words[0] if words else ""


def match_label(text: str, labels: Sequence[str]) -> str:
    """The label a generated answer names: exact match after normalisation, else its first word if that is a label.

    Returns the normalised answer itself when it names no label (an off-label answer).
    """
    norm = " ".join(text.lower().translate(_PUNCT).split())
    by_norm = {" ".join(lab.lower().translate(_PUNCT).split()): lab for lab in labels}
    if norm in by_norm:
        return by_norm[norm]
    first = normalize_answer(text)
    return by_norm.get(first, first)
