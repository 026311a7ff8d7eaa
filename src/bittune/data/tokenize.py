"""Tokenize rendered examples into ``input_ids`` and ``labels``.

Labels come from the trainable character spans of each example, never from comparing ids with the pad id:
many tokenizers use eos as pad, and masking pads by id would also hide every eos the model must learn.

The whole text of an example is tokenized in one call with offsets, and a token is a target when its
characters overlap a trainable span. Tokenizing the joined text (rather than each piece alone) gives the same
tokens the model sees at generation time, and avoids SentencePiece adding a word-start marker to every piece.
Tokenizers without offsets fall back to tokenizing piece by piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bittune.data.templates import Segment

IGNORE = -100
_CHUNK = 512  # examples per tokenizer call: fast tokenizers batch in Rust, and memory stays bounded


@dataclass
class Piece:
    """One example ready to tokenize.

    Attributes:
        segments: ``(text, trainable)`` pieces.
        prefix: Token ids put in front (e.g. the tokenizer's BOS for plain text), not trained on.
        append_eos: Append the eos token, trained on, so the model learns to stop.
    """

    segments: list[Segment]
    prefix: list[int]
    append_eos: bool


def _spans(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for text, trainable in segments:
        if trainable and text:
            spans.append((pos, pos + len(text)))
        pos += len(text)
    return spans


def _labels_from_offsets(ids: list[int], offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    labels = []
    k = 0  # tokens and spans are both in text order, so one sweep finds every overlap
    for tok, (start, end) in zip(ids, offsets):
        end = max(end, start + 1)  # zero-width offsets (some special tokens) still sit at a position
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        labels.append(tok if k < len(spans) and spans[k][0] < end else IGNORE)
    return labels


def _supports_offsets(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "is_fast", False))


def encode_pieces(pieces: list[Piece], tokenizer: Any, *, train_all: bool) -> list[tuple[list[int], list[int]]]:
    """Tokenize examples into ``(input_ids, labels)`` pairs.

    Args:
        pieces: The examples.
        tokenizer: A Hugging Face tokenizer; fast ones give character offsets.
        train_all: Every token is a target (``train_on_prompt``), not only trainable spans.

    Returns:
        One ``(input_ids, labels)`` pair per piece, same length; the first label is always ignored, since no
        token predicts it (this also keeps packed examples from predicting across their boundary).
    """
    eos_id = getattr(tokenizer, "eos_token_id", None)
    out: list[tuple[list[int], list[int]]] = []
    if _supports_offsets(tokenizer):
        for lo in range(0, len(pieces), _CHUNK):
            chunk = pieces[lo : lo + _CHUNK]
            texts = ["".join(t for t, _ in p.segments) for p in chunk]
            enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            for p, text, ids, offsets in zip(chunk, texts, enc["input_ids"], enc["offset_mapping"]):
                spans = _spans(p.segments)
                # Whole text trainable (text format, train_on_prompt): skip the per-token sweep.
                whole = train_all or spans == [(0, len(text))]
                labels = list(ids) if whole else _labels_from_offsets(ids, offsets, spans)
                out.append(_finish(p, list(ids), labels, eos_id))
    else:
        for p in pieces:
            ids: list[int] = []
            labels: list[int] = []
            for text, trainable in p.segments:
                seg = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += seg
                labels += seg if (trainable or train_all) else [IGNORE] * len(seg)
            out.append(_finish(p, ids, labels, eos_id))
    return out


def _finish(p: Piece, ids: list[int], labels: list[int], eos_id: int | None) -> tuple[list[int], list[int]]:
    ids = list(p.prefix) + ids
    labels = [IGNORE] * len(p.prefix) + labels
    if p.append_eos and eos_id is not None:
        ids.append(eos_id)
        labels.append(eos_id)
    if labels:
        labels[0] = IGNORE
    return ids, labels


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut an example to ``max_length`` tokens from the right; returns whether it was cut."""
    if len(ids) <= max_length:
        return ids, labels, False
    return ids[:max_length], labels[:max_length], True


def n_targets(labels: Sequence[int]) -> int:
    """Tokens that contribute to the loss (the first position never does: nothing predicts it)."""
    return sum(1 for x in labels[1:] if x != IGNORE)


def encode_classification(
    texts: list[str], pairs: list[str | None], tokenizer: Any, max_length: int
) -> list[tuple[list[int], bool]]:
    """Tokenize classification inputs with the model's special tokens, cutting to ``max_length``.

    Returns:
        ``(input_ids, truncated)`` per text.
    """
    out: list[tuple[list[int], bool]] = []
    for lo in range(0, len(texts), _CHUNK):
        batch, batch_pairs = texts[lo : lo + _CHUNK], pairs[lo : lo + _CHUNK]
        has_pairs = any(p is not None for p in batch_pairs)
        args = (batch, [p or "" for p in batch_pairs]) if has_pairs else (batch,)
        full = tokenizer(*args)["input_ids"]
        long = [i for i, ids in enumerate(full) if len(ids) > max_length]
        cut: dict[int, list[int]] = {}
        if long:
            # Re-tokenize only the long ones with truncation, so the special tokens (e.g. [SEP]) are kept.
            sub = [[a[i] for i in long] for a in args]
            enc = tokenizer(*sub, truncation=True, max_length=max_length)["input_ids"]
            cut = dict(zip(long, enc))
        out += [(cut.get(i, ids), i in cut) for i, ids in enumerate(full)]
    return out
