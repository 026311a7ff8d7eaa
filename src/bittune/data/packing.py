"""Pack several short causal-LM examples into fixed-length rows without letting them see each other.

Each row holds whole examples back to back (an example is never split) and is padded to exactly
``max_length``. ``position_ids`` restart at 0 for every example and for the padding block, which is how
transformers 5 models tell packed sequences apart: called with ``position_ids`` and no ``attention_mask``
(and no cache), they build a block-diagonal causal mask, so attention never crosses an example boundary.
"""

from __future__ import annotations

from bittune.data.tokenize import IGNORE


def pack_rows(rows: list[dict[str, list[int]]], max_length: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Greedily pack rows, in order, into rows of exactly ``max_length`` tokens.

    Args:
        rows: ``{"input_ids", "labels"}`` rows, each at most ``max_length`` long (already truncated).
        max_length: Length of every packed row.
        pad_id: Token used to fill the tail of a row (its labels are ignored).

    Returns:
        ``{"input_ids", "labels", "position_ids"}`` rows of length ``max_length``.
    """
    packed: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        n = len(row["input_ids"])
        if n > max_length:
            raise ValueError(f"row of {n} tokens is longer than max_length {max_length}; truncate first")
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_length:
            packed.append(_pad(cur, max_length, pad_id))
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += row["input_ids"]
        cur["labels"] += row["labels"]
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        packed.append(_pad(cur, max_length, pad_id))
    return packed


def _pad(cur: dict[str, list[int]], max_length: int, pad_id: int) -> dict[str, list[int]]:
    k = max_length - len(cur["input_ids"])
    # The pad block restarts its positions too, so it is a separate segment that real tokens never attend to.
    return {
        "input_ids": cur["input_ids"] + [pad_id] * k,
        "labels": cur["labels"] + [IGNORE] * k,
        "position_ids": cur["position_ids"] + list(range(k)),
    }
