"""Sequence classification: label ids, label errors, special tokens, truncation and the collator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bittune.data import count_targets, make_collator
from bittune.errors import DataError
from tiny import data_tokenizer, prepare, write_rows

ROWS = [
    {"text": "a great movie", "label": "positive"},
    {"text": "a terrible film", "label": "negative"},
    {"text": "a film", "label": "neutral"},
    {"text": "great great film", "label": "positive"},
]


def _prep(tmp_path: Path, rows: list[dict], **kw: Any) -> Any:
    tok = kw.pop("tok", None) or data_tokenizer(bert=True)
    return prepare(tok, write_rows(tmp_path / "c.jsonl", rows), fmt="classification", task="classification", **kw)


def test_string_labels_map_to_sorted_ids(tmp_path: Path) -> None:
    data = _prep(tmp_path, ROWS)
    assert data.label_names == ["negative", "neutral", "positive"]
    assert [r["label"] for r in data.train] == [2, 0, 1, 2]
    st = data.stats["train"]
    assert (st.rows, st.kept, st.target_tokens) == (4, 4, 4)


def test_given_label_names_fix_the_ids(tmp_path: Path) -> None:
    data = _prep(tmp_path, ROWS, label_names=["positive", "negative", "neutral"])
    assert data.label_names == ["positive", "negative", "neutral"]
    assert [r["label"] for r in data.train] == [0, 1, 2, 0]


def test_numeric_names_sort_as_numbers(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": str(n)} for n in (10, 2, 1)]
    data = _prep(tmp_path, rows)
    assert data.label_names == ["1", "2", "10"] and [r["label"] for r in data.train] == [2, 1, 0]


def test_integer_labels_are_ids(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 2}, {"text": "b", "label": 0}]
    data = _prep(tmp_path, rows)
    assert data.label_names == ["0", "1", "2"] and [r["label"] for r in data.train] == [2, 0]
    named = _prep(tmp_path, rows, label_names=["neg", "neu", "pos"])
    assert [r["label"] for r in named.train] == [2, 0]


def test_unseen_eval_label_names_row_and_known_labels(tmp_path: Path) -> None:
    ev = write_rows(tmp_path / "eval.csv", [{"text": "fine", "label": "positive"}, {"text": "meh", "label": "mixed"}])
    with pytest.raises(DataError) as err:
        _prep(tmp_path, ROWS, eval=ev)
    assert err.value.message == (
        f"{ev}:3: field 'label' is 'mixed', which is not one of the training labels: negative, neutral, positive"
    )


def test_label_outside_given_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"c\.jsonl:3: field 'label' is 'neutral', which is not one of the model's"):
        _prep(tmp_path, ROWS, label_names=["negative", "positive"])
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'label' is class id 5, but there are only 2 classes"):
        _prep(tmp_path, [{"text": "a", "label": 5}], label_names=["negative", "positive"])


def test_one_class_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="every training row has label 'positive'"):
        _prep(tmp_path, [{"text": "a", "label": "positive"}, {"text": "b", "label": "positive"}])


def test_special_tokens_pairs_and_truncation(tmp_path: Path) -> None:
    tok = data_tokenizer(bert=True)
    cls, sep = tok.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    rows = [
        {"text": "a great movie", "text_pair": "a film", "label": "pos"},
        {"text": "great " * 40, "text_pair": "film", "label": "neg"},
    ]
    data = _prep(tmp_path, rows, tok=tok, max_length=16)
    short, long = data.train
    assert short["input_ids"][0] == cls and short["input_ids"].count(sep) == 2 and short["input_ids"][-1] == sep
    assert len(long["input_ids"]) == 16 and long["input_ids"][-1] == sep  # cut, special tokens kept
    st = data.stats["train"]
    assert (st.truncated, st.dropped, st.tokens) == (1, 0, len(short["input_ids"]) + 16)


def test_classification_collator(tmp_path: Path) -> None:
    tok = data_tokenizer(bert=True)
    data = _prep(tmp_path, ROWS, tok=tok)
    batch = make_collator("classification", tok.pad_token_id, packed=False)(data.train)
    longest = max(len(r["input_ids"]) for r in data.train)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, longest)
    assert batch["labels"].tolist() == [2, 0, 1, 2] and str(batch["labels"].dtype) == "torch.int64"
    assert batch["attention_mask"].sum().item() == sum(len(r["input_ids"]) for r in data.train)
    assert count_targets("classification", batch["labels"]) == 4


def test_format_and_task_must_agree(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.format 'text' does not fit task 'classification'"):
        prepare(data_tokenizer(), write_rows(tmp_path / "t.jsonl", ROWS), fmt="text", task="classification")
