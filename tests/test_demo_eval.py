"""Demo evaluation: answer normalisation, scoring, batched left-padded generation, and the report."""

from __future__ import annotations

from pathlib import Path

import pytest

import bittune.demo.evaluate as ev
from bittune.demo.report import markdown, pick_examples


@pytest.mark.parametrize(
    ("raw", "word"),
    [
        ("Number", "number"),
        ("  location.", "location"),
        ("Human: a person", "human"),
        ('"entity"', "entity"),
        ("description\nmore", "description"),
        ("The answer is", "the"),
        ("", ""),
        ("?!", ""),
    ],
)
def test_normalize_answer(raw: str, word: str) -> None:
    assert ev.normalize_answer(raw) == word


def test_evaluate_scores_per_class(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {"question": "q1", "label": "human"},
        {"question": "q2", "label": "human"},
        {"question": "q3", "label": "number"},
        {"question": "q4", "label": "location"},
    ]
    replies = ["Human.", "number", "Number", "The answer is"]
    seen: list[list[dict[str, str]]] = []

    def fake_generate(model, tokenizer, conversations, **kwargs):
        seen.extend(conversations)
        return replies

    monkeypatch.setattr(ev, "generate_answers", fake_generate)
    result = ev.evaluate_questions(None, None, rows)
    assert result.accuracy == 0.5
    assert result.per_class == {"human": 0.5, "location": 0.0, "number": 1.0}
    assert result.counts == {"human": 2, "location": 1, "number": 1}
    assert result.answers == ["human", "number", "number", "the"]
    assert result.extra == {"n": 4, "off_label": 0.25}
    assert seen[0][-1]["role"] == "user" and seen[0][-1]["content"].endswith("Question: q1")
    assert set(result.to_dict()) >= {"accuracy", "per_class", "counts", "seconds", "n", "off_label"}


def test_batched_left_padded_generation_matches_one_by_one(tiny_llama_dir: Path) -> None:
    from bittune.artifacts import load

    model, tok, _ = load(tiny_llama_dir, as_="merged")
    convs = [
        [{"role": "user", "content": text}]
        for text in ["What color is the apple?", "sky", "What color is the banana? The banana is", "grass is"]
    ]
    batched = ev.generate_answers(model, tok, convs, batch_size=4, max_new_tokens=3)
    single = [ev.generate_answers(model, tok, [c], batch_size=1, max_new_tokens=3)[0] for c in convs]
    assert batched == single
    assert tok.padding_side == "right"  # restored


def test_pick_examples_one_per_class_and_markdown() -> None:
    rows = [
        {"question": "Who?", "label": "human"},
        {"question": "What is NASA?", "label": "abbreviation"},
        {"question": "Who else?", "label": "human"},
    ]
    ex = pick_examples(rows, ["a", "b", "c"], ["human", "abbreviation", "x"], n=5)
    assert [e["question"] for e in ex] == ["What is NASA?", "Who?"]
    report = {
        "base": {"n": 3, "accuracy": 0.0, "per_class": {"human": 0.0}, "counts": {"human": 2}, "off_label": 1.0},
        "tuned": {"n": 3, "accuracy": 1.0, "per_class": {"human": 1.0}, "counts": {"human": 2}, "off_label": 0.0},
        "train": {"steps": 2, "seconds_per_step": 1.0},
        "data": {"n_train_seen": 16},
        "examples": [{**e, "tuned_word": e["tuned"]} for e in ex],
        "timings_s": {"assets": 1, "data": 0.1, "base_eval": 1, "train": 2, "tuned_eval": 1, "total": 5},
        "run_dir": "r",
        "adapter": "r/adapter",
    }
    md = markdown(report)
    assert "| overall | 3 | 0.0% | 100.0% |" in md and "| human | 2 | 0.0% | 100.0% |" in md
    assert "What is NASA?" in md
