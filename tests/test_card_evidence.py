"""The model card carries the evidence: measured numbers, Hub model-index results and Hub front matter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


def write_gguf(path: Path, **meta: str) -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in meta.items():
        w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def fake_run(tmp: Path, model_path: str) -> Path:
    run = tmp / "run"
    (run / "report").mkdir(parents=True)
    cfg = {"model": {"path": model_path}, "method": "qlora", "data": {"train": "owner/trec-chat", "eval": "e.jsonl"}}
    (run / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "summary.json").write_text(json.dumps({"steps": 10}))
    models = [
        {"name": "base", "metrics": {"generation": {"accuracy": 0.02}, "eval_perplexity": 9.0}},
        {"name": "tuned", "metrics": {"generation": {"accuracy": 0.9}, "eval_perplexity": 1.5}},
        {"name": "int4", "metrics": {"generation": {"accuracy": 0.85}, "eval_perplexity": 1.7}},
    ]
    (run / "report" / "report.json").write_text(
        json.dumps({"data": "/x/e.jsonl", "task": "causal-lm", "models": models})
    )
    return run


def test_card_has_hub_metadata_and_the_reports_numbers(tmp_path: Path):
    from bittune.export.card import model_card

    gguf = write_gguf(
        tmp_path / "base.gguf",
        **{"general.name": "Tiny 1M", "general.organization": "Org", "general.license": "apache-2.0",
           "general.base_model.0.repo_url": "https://huggingface.co/Org/Tiny-1M-Instruct"},
    )  # fmt: skip
    card = model_card(
        name="me/tuned", base=str(tmp_path / "cache"), task="causal-lm", run_dir=fake_run(tmp_path, str(gguf))
    )
    front = front_matter(card)
    assert front["base_model"] == "Org/Tiny-1M-Instruct"  # the model the .gguf names
    assert front["license"] == "apache-2.0" and front["datasets"] == ["owner/trec-chat"]
    assert {"bittune", "qlora", "gguf-base"} <= set(front["tags"])
    result = front["model-index"][0]["results"][0]
    assert result["task"]["type"] == "text-generation" and result["dataset"]["name"] == "e.jsonl"
    metrics = {m["name"]: m["value"] for m in result["metrics"]}
    assert metrics == {"accuracy, greedy generation": 0.9, "token-level perplexity": 1.5}
    assert "## Evaluation" in card and "| metric | base | tuned | int4 |" in card
    assert "| accuracy, greedy generation | 0.02 (-0.88 vs tuned) | 0.9 | 0.85 (-0.05 vs tuned) |" in card
    assert "names its model 'Tiny 1M by Org'" in card


def test_card_without_a_hub_id_leaves_base_model_out_unless_given(tmp_path: Path):
    from bittune.export.card import model_card

    gguf = write_gguf(tmp_path / "base.gguf", **{"general.name": "Tiny 1M"})
    run = fake_run(tmp_path, str(gguf))
    assert "base_model" not in front_matter(model_card(name="x", base="/cache/f", task="causal-lm", run_dir=run))
    given = model_card(name="x", base="/cache/f", task="causal-lm", run_dir=run, base_model="Org/Tiny")
    assert front_matter(given)["base_model"] == "Org/Tiny"
