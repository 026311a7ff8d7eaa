"""End to end on the real assets: convert SmolLM2 from its GGUF, reload it, generate; then a quick demo run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bittune-cache")


@pytest.fixture(scope="module")
def smollm2_dir(cache: Path) -> Path:
    from bittune.demo.assets import prepare_smollm2

    return prepare_smollm2(cache)


def test_converted_smollm2_reloads_and_generates(smollm2_dir: Path) -> None:
    from bittune.artifacts import load
    from bittune.demo.assets import prepare_smollm2
    from bittune.demo.evaluate import generate_answers

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    model, tok, _ = load(smollm2_dir, as_="merged")
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    replies = generate_answers(
        model, tok, [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=8
    )
    assert "Paris" in replies[0]
    assert prepare_smollm2(smollm2_dir.parent.parent) == smollm2_dir  # cached


def test_quick_demo(smollm2_dir: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from bittune.demo.run import SIZES, run_demo, whole_story

    monkeypatch.setenv("BITTUNE_CACHE", str(cache))
    out = tmp_path / "demo"
    results = tmp_path / "results" / "demo.json"
    console = Console(width=120, record=True)
    # Every phase at the quick sizes: `make demo-quick` leaves GPTQ, the GGUF's measurement and the classifier out.
    quick = whole_story(SIZES["quick"])
    record = run_demo(out, quick=True, console=console, results_file=results, sizes=quick)
    base, tuned = record["heldout_eval"]["base"], record["heldout_eval"]["tuned"]
    assert base["ranking"]["n"] == tuned["ranking"]["n"] == quick.n_eval
    # Tuning must beat the base on held-out questions by label ranking (the fair before/after: the base is not
    # penalised for answering in other words). Six steps move it by several questions; the margin of 2 leaves
    # room for another CPU's rounding, not for a step that does nothing.
    assert tuned["ranking"]["accuracy"] >= base["ranking"]["accuracy"] + 2 / quick.n_eval, record["heldout_eval"]
    assert tuned["generation"]["accuracy"] > base["generation"]["accuracy"]
    # Every phase ran and was timed; every model of the story was measured in the report.
    assert set(record["phases"]) == {
        "assets", "data", "base_eval", "train", "tuned_eval", "merge", "quantize_4bit", "quantize_3bit",
        "export_gguf", "report", "classifier_train", "classifier_quantize",
    }  # fmt: skip
    names = [m["name"] for m in record["models"]]
    assert names == ["base SmolLM2-135M", "QLoRA-tuned (= merged fp32)", "merged, 4-bit int (RTN)",
                     "merged, 3-bit GPTQ", "GGUF"]  # fmt: skip
    assert all(m["ranking_accuracy"] is not None and m["size_mb"] for m in record["models"])
    # The report's base and tuned are the ones measured in their own phases (one measurement, the same numbers).
    assert [m["ranking_accuracy"] for m in record["models"][:2]] == [base["ranking"]["accuracy"],
                                                                      tuned["ranking"]["accuracy"]]  # fmt: skip
    # The classifier: trained beats untrained (a fresh head: about chance) on the held-out snippets, its quantized
    # versions were measured on the same ones, and its confusion matrix counts every one of them once.
    cls = record["classifier"]
    rows = {m["name"]: m for m in cls["models"]}
    assert list(rows) == ["MiniLM, untrained head", "LoRA-tuned", "merged, 8-bit int (RTN)", "merged, 4-bit int (RTN)"]
    assert all(m["n"] == quick.cls_n_eval == cls["n_eval"] and m["accuracy"] is not None for m in rows.values())
    assert rows["LoRA-tuned"]["accuracy"] > rows["MiniLM, untrained head"]["accuracy"], cls["models"]
    assert rows["LoRA-tuned"]["f1_macro"] > rows["MiniLM, untrained head"]["f1_macro"], cls["models"]
    assert cls["confusion"]["labels"] == ["negative", "positive"]
    assert sum(map(sum, cls["confusion"]["matrix"])) == quick.cls_n_eval
    assert sum(cls["confusion"]["matrix"][i][i] for i in range(2)) == round(
        rows["LoRA-tuned"]["accuracy"] * quick.cls_n_eval
    )
    assert Path(cls["report"]).is_file() and "Confusion matrix" in Path(cls["report"]).read_text()
    assert (out / "sentiment" / "int4" / "quant_report.json").is_file()
    assert (out / "run" / "report" / "report.html").is_file() and (out / "smollm2-trec.gguf").is_file()
    assert json.loads(results.read_text()) == json.loads((out / "demo.json").read_text())
    assert record["compute"]["resolved"] in ("no", "bf16") and record["machine"]["cpu"]
    assert record["sizes"]["steps"] == quick.steps and record["git_commit"]
    text = console.export_text()
    assert "report.html" in text and "confusion matrix" in text
    # `make demo-quick` (the smoke) into the same folder: it replaces the demo's own earlier outputs, runs the main
    # path only, and its tuned model is the same one (same data, steps and seed).
    smoke = run_demo(out, quick=True, console=Console(width=120))
    assert set(smoke["phases"]) == set(record["phases"]) - {"quantize_3bit", "classifier_train", "classifier_quantize"}
    for name in ("base", "tuned"):
        for how in ("ranking", "generation"):
            assert smoke["heldout_eval"][name][how]["accuracy"] == record["heldout_eval"][name][how]["accuracy"]
    assert [m["name"] for m in smoke["models"]] == names[:3] and smoke["classifier"] is None
    assert (
        not (out / "gptq-3bit").exists() and not (out / "sentiment").exists() and (out / "smollm2-trec.gguf").is_file()
    )
