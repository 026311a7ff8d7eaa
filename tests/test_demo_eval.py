"""Demo evaluation: answer normalisation, scoring, batched left-padded generation, and the report."""

from __future__ import annotations

from pathlib import Path

import pytest

import bittune.demo.evaluate as ev


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


def test_summary_rows_and_table() -> None:
    from rich.console import Console

    from bittune.demo.report import summary_rows, summary_table

    models = [
        {
            "name": "base",
            "path": "/m",
            "size_mb": 538.0,
            "metrics": {
                "eval_perplexity": 9.5,
                "eval_s": 2.0,
                "tokens": 1000,
                "ranking": {"accuracy": 0.25},
                "generation": {"accuracy": 0.0, "seconds": 3.0},
            },
        },
        {"name": "smollm2-trec.gguf", "path": "/g.gguf", "size_mb": 80.0, "metrics": {}},
    ]
    rows = summary_rows(models)
    assert rows[0] == {
        "name": "base SmolLM2-135M",
        "path": "/m",
        "ranking_accuracy": 0.25,
        "generation_accuracy": 0.0,
        "perplexity": 9.5,
        "size_mb": 538.0,
        "tokens_per_s": 500.0,
        "answer_s": 3.0,
    }
    assert rows[1]["name"] == "GGUF" and rows[1]["ranking_accuracy"] is None and rows[1]["tokens_per_s"] is None
    console = Console(width=120, record=True)
    console.print(summary_table(rows, 200))
    text = console.export_text()
    assert "25.0%" in text and "9.500" in text and "GGUF" in text and "200 held-out" in text
