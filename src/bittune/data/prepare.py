"""The data pipeline entry point: files in, tokenized train/eval rows and statistics out."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Any, cast

from bittune.data.formats import (
    ChatExample,
    ClassificationExample,
    CompletionExample,
    Example,
    FieldReader,
    TextExample,
    parse_example,
)
from bittune.data.labels import build_label_names, label_ids
from bittune.data.packing import pack_rows
from bittune.data.records import Record, read_records
from bittune.data.templates import check_template, render_conversation, special_prefix
from bittune.data.tokenize import Piece, encode_classification, encode_pieces, n_targets, truncate
from bittune.errors import DataError

CAUSAL_TASKS = ("causal-lm",)
CLASSIFICATION_TASK = "classification"


@dataclass
class SplitStats:
    """What happened to one split on its way to token rows.

    Attributes:
        rows: Examples read.
        kept: Examples tokenized and kept.
        tokens: Total tokens of the kept examples, after truncation.
        target_tokens: Tokens with a label (causal LM), or rows (classification).
        truncated: Examples cut to ``max_length``.
        dropped: Examples dropped because nothing trainable remained after truncation.
        packed_rows: Rows after packing, when packing.
    """

    rows: int = 0
    kept: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    packed_rows: int | None = None

    def summary(self) -> str:
        """One line for logs, e.g. ``100 rows, 98 kept, 2 truncated, 2 dropped, 5,120 tokens (2,001 targets)``."""
        parts = [f"{self.rows:,} rows", f"{self.kept:,} kept"]
        if self.truncated:
            parts.append(f"{self.truncated:,} truncated")
        if self.dropped:
            parts.append(f"{self.dropped:,} dropped (nothing left to train on after truncation)")
        parts.append(f"{self.tokens:,} tokens ({self.target_tokens:,} targets)")
        if self.packed_rows is not None:
            parts.append(f"packed into {self.packed_rows:,} rows")
        return ", ".join(parts)


@dataclass
class PreparedData:
    """Tokenized splits ready for :func:`bittune.data.make_collator`.

    Attributes:
        train: Rows: causal ``{"input_ids", "labels"}`` (+ ``"position_ids"`` when packed), or classification
            ``{"input_ids", "label"}``.
        eval: Same layout; empty when there is no eval split.
        label_names: Classification class names, index = class id; ``None`` for causal LM.
        stats: ``"train"`` and ``"eval"`` statistics.
        packed: Rows are packed (pass to ``make_collator``).
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str] | None
    stats: dict[str, SplitStats] = field(default_factory=dict)
    packed: bool = False


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded ``fraction`` of ``records`` (at least one row when fraction > 0 and there are 2+).

    Both parts keep file order, so the split depends only on the seed and the number of rows.
    """
    n = len(records)
    if fraction <= 0 or n < 2:
        return records, []
    k = min(n - 1, max(1, round(n * fraction)))
    held = set(random.Random(seed).sample(range(n), k))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def prepare_data(
    *,
    train: str,
    eval: str | None,
    eval_fraction: float,
    fmt: str,
    template: str,
    max_length: int,
    packing: bool,
    train_on_prompt: bool,
    system_prompt: str | None,
    columns: dict[str, str],
    split: str,
    max_rows: int | None,
    tokenizer: Any,
    task: str,
    seed: int,
    label_names: list[str] | None = None,
) -> PreparedData:
    """Read, validate, render, tokenize, truncate and (optionally) pack the train and eval data.

    Args:
        train: Training data: a ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a ``save_to_disk`` directory,
            or a hub dataset id ``owner/name`` (``owner/name:split`` picks a split).
        eval: Eval data, same kinds; a hub id without ``:split`` loads split ``validation``.
        eval_fraction: Held out from ``train`` when ``eval`` is not given (seeded).
        fmt: ``text``, ``completion``, ``alpaca``, ``chat`` or ``classification``.
        template: ``auto`` (tokenizer's chat template), ``chatml``, ``llama2`` or ``alpaca``; used by chat and
            alpaca.
        max_length: Tokens per example (and per packed row).
        packing: Pack causal examples into rows of exactly ``max_length``.
        train_on_prompt: Train on every token, not only assistant replies / completions.
        system_prompt: System message for conversations without one.
        columns: Canonical field -> the user's column name.
        split: Split of a hub dataset for ``train``.
        max_rows: Use only the first ``max_rows`` training rows.
        tokenizer: The model's tokenizer (needs a pad token for batching).
        task: ``causal-lm`` or ``classification``.
        seed: Seed for the eval split.
        label_names: Classification classes in id order (e.g. from a checkpoint); default: from the data.

    Returns:
        The tokenized splits, label names and per-split statistics.

    Raises:
        DataError: Anything wrong with the data, naming the file, line and field.
    """
    classification = task == CLASSIFICATION_TASK
    if not classification and task not in CAUSAL_TASKS:
        raise DataError(f"unknown task '{task}'", hint="use 'causal-lm' or 'classification'")
    if classification != (fmt == "classification"):
        raise DataError(
            f"data.format '{fmt}' does not fit task '{task}'",
            hint="use data.format: classification exactly when model.task is classification",
        )
    reader = FieldReader(fmt, columns)
    if fmt in ("chat", "alpaca"):
        check_template(template, tokenizer)

    train_records = read_records(train, split, max_rows)
    if eval:
        eval_records = read_records(eval, "validation")
    else:
        train_records, eval_records = split_eval(train_records, eval_fraction, seed)
    problems: list[DataError] = []  # every bad row of both files, reported together
    train_ex = _parse_rows(train_records, reader, problems)
    eval_ex = _parse_rows(eval_records, reader, problems)
    if problems:
        raise _together(problems)

    if classification:
        train_cls = cast("list[ClassificationExample]", train_ex)
        eval_cls = cast("list[ClassificationExample]", eval_ex)
        names = build_label_names(train_cls, label_names)
        col = reader.column("label")
        train_rows, train_stats = _classification_rows(train_cls, names, tokenizer, max_length, "train", col)
        eval_rows, eval_stats = _classification_rows(eval_cls, names, tokenizer, max_length, "eval", col)
        return PreparedData(train_rows, eval_rows, names, {"train": train_stats, "eval": eval_stats}, False)

    causal_rows = functools.partial(
        _causal_rows,
        tokenizer=tokenizer,
        template=template,
        system_prompt=system_prompt,
        train_on_prompt=train_on_prompt,
        max_length=max_length,
    )
    train_rows, train_stats = causal_rows(train_ex)
    eval_rows, eval_stats = causal_rows(eval_ex)
    if train_records and not train_rows:
        raise DataError(
            f"{train}: no training example has anything left to train on after truncating to "
            f"max_length {max_length} ({train_stats.dropped} dropped)",
            hint="raise data.max_length, or shorten the prompts",
        )
    if packing:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise DataError(
                "packing needs a pad or eos token, and the tokenizer has neither", hint="set tokenizer.pad_token"
            )
        train_rows = pack_rows(train_rows, max_length, pad_id)
        eval_rows = pack_rows(eval_rows, max_length, pad_id)
        train_stats.packed_rows, eval_stats.packed_rows = len(train_rows), len(eval_rows)
    return PreparedData(train_rows, eval_rows, None, {"train": train_stats, "eval": eval_stats}, packing)


MAX_PROBLEMS = 10  # bad rows listed at most: enough to see a pattern, short enough to read


def _parse_rows(records: list[Record], reader: FieldReader, problems: list[DataError]) -> list[Example]:
    """Each record as an example; a bad one is added to ``problems`` and the rest still checked (up to
    :data:`MAX_PROBLEMS`), so one run of ``validate`` shows every row to fix, not only the first."""
    out = []
    for rec in records:
        try:
            out.append(parse_example(rec, reader))
        except DataError as exc:
            problems.append(exc)
            if len(problems) >= MAX_PROBLEMS:
                raise _together(problems) from None
    return out


def _together(problems: list[DataError]) -> DataError:
    """One error for the data's problems: the problem itself when there is one, else a list of them."""
    if len(problems) == 1:
        return problems[0]
    more = f" (the first {MAX_PROBLEMS}; there may be more)" if len(problems) >= MAX_PROBLEMS else ""
    lines = "\n".join(f"  - {p.message}" for p in problems)
    hints = list(dict.fromkeys(p.hint for p in problems if p.hint))
    return DataError(f"{len(problems)} problems in the data{more}:\n{lines}", hint="; ".join(hints[:3]) or None)


def _piece(ex: Example, tokenizer: Any, template: str, system_prompt: str | None) -> Piece:
    if isinstance(ex, TextExample):
        return Piece([(ex.text, True)], special_prefix(tokenizer), True)
    if isinstance(ex, CompletionExample):
        return Piece([(ex.prompt, False), (ex.completion, True)], special_prefix(tokenizer), True)
    assert isinstance(ex, ChatExample)
    rendered = render_conversation(ex.messages, tokenizer, template, system_prompt=system_prompt, where=ex.where)
    return Piece(rendered.segments, [], rendered.append_eos)


def _causal_rows(
    examples: list[Example],
    *,
    tokenizer: Any,
    template: str,
    system_prompt: str | None,
    train_on_prompt: bool,
    max_length: int,
) -> tuple[list[dict[str, list[int]]], SplitStats]:
    stats = SplitStats(rows=len(examples))
    pieces = [_piece(ex, tokenizer, template, system_prompt) for ex in examples]
    rows = []
    for ids, labels in encode_pieces(pieces, tokenizer, train_all=train_on_prompt):
        ids, labels, cut = truncate(ids, labels, max_length)
        stats.truncated += cut
        targets = n_targets(labels)
        if targets == 0:
            stats.dropped += 1
            continue
        stats.kept += 1
        stats.tokens += len(ids)
        stats.target_tokens += targets
        rows.append({"input_ids": ids, "labels": labels})
    return rows, stats


def _classification_rows(
    examples: list[ClassificationExample], names: list[str], tokenizer: Any, max_length: int, split: str, column: str
) -> tuple[list[dict[str, Any]], SplitStats]:
    stats = SplitStats(rows=len(examples))
    ids_of = label_ids(examples, names, split, column)
    encoded = encode_classification([e.text for e in examples], [e.text_pair for e in examples], tokenizer, max_length)
    rows = []
    for (ids, cut), label in zip(encoded, ids_of):
        stats.truncated += cut
        stats.kept += 1
        stats.tokens += len(ids)
        stats.target_tokens += 1
        rows.append({"input_ids": ids, "label": label})
    return rows, stats
