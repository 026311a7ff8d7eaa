"""lm-evaluation-harness through bittune: offline task files, in-process on a loaded model, results in the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "bittune-cache"))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_tasks_are_written_from_installed_packages():
    from bittune.demo.run import FULL
    from bittune.demo.trec import INSTRUCTION, LABELS, load_trec, split_stratified
    from bittune.evaluation.tasks import OFFLINE_TASKS, prepare_tasks

    folder = prepare_tasks(list(OFFLINE_TASKS))
    for name in OFFLINE_TASKS:
        assert (folder / f"{name}.yaml").is_file()
        assert len(jsonl(folder / f"{name}.test.jsonl")) >= 200
    docs = jsonl(folder / "trec_mc.test.jsonl")
    held = split_stratified(load_trec(), heldout=FULL["n_heldout"], seed=0, min_per_class=FULL["min_per_class"])[1]
    assert [d["prompt"] for d in docs] == [INSTRUCTION.format(question=q.text) for q in held]  # the demo's held out
    assert all(d["choices"] == list(LABELS) and LABELS[d["answer"]] == q.label for d, q in zip(docs, held))
    vader = jsonl(folder / "vader_sentiment.test.jsonl")
    assert abs(sum(d["answer"] for d in vader) / len(vader) - 0.5) < 0.1  # balanced


def test_lm_eval_task_runs_offline_on_a_tiny_model_through_the_cli(tiny_llama_dir: Path, tmp_path: Path, capsys):
    from bittune.cli import main

    out = tmp_path / "ev"
    main(["eval", str(tiny_llama_dir), "--tasks", "trec_mc,chatterbot_trivia", "--limit", "4", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "lm_eval.json").read_text())
    assert saved["summary"]["tasks"] == printed["tasks"]
    trec, trivia = printed["tasks"]["trec_mc"], printed["tasks"]["chatterbot_trivia"]
    assert trec["n"] == 4 and 0.0 <= trec["metrics"]["acc"] <= 1.0 and trec["output_type"] == "multiple_choice"
    assert trivia["output_type"] == "generate_until" and "exact_match" in trivia["metrics"]
    assert printed["settings"]["chat_template"] is True  # the tiny tokenizer has one
    assert saved["raw"]["results"]["trec_mc"]["acc,none"] == trec["metrics"]["acc"]


def test_unknown_task_fails_before_the_model_loads(tiny_llama_dir: Path, monkeypatch, capsys):
    from bittune.cli import main
    from bittune.evaluation import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded weights for an unknown task"))
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tiny_llama_dir), "--tasks", "trec_mcc", "--limit", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "trec_mcc: not one of bittune's offline tasks (did you mean trec_mc?)" in err


def test_hub_task_offline_is_refused_with_the_offline_list(monkeypatch):
    from bittune.errors import ConfigError
    from bittune.evaluation.harness import task_manager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"(?s)arc_easy: not one of .*offline tasks: trec_mc"):
        task_manager(["arc_easy"])
