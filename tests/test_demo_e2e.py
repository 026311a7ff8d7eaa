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

    from bittune.demo.run import run_demo

    monkeypatch.setenv("BITTUNE_CACHE", str(cache))
    report = run_demo(tmp_path / "demo", quick=True, console=Console(width=120, record=True))
    assert report["train"]["steps"] == 6
    assert report["base"]["n"] == report["tuned"]["n"] > 30
    # Even 6 steps teach the answer format: measured 0/49 -> 14/49 on the quick held-out rows. A margin of 5
    # questions leaves room for another CPU's rounding, not for a tuning step that does nothing.
    assert report["tuned"]["accuracy"] >= report["base"]["accuracy"] + 5 / report["tuned"]["n"], report
    assert (tmp_path / "demo" / "demo_report.md").is_file()
    assert json.loads((tmp_path / "demo" / "demo_report.json").read_text())["quick"] is True
    assert (Path(report["adapter"]) / "adapter_config.json").is_file()
    # A second demo into the same folder replaces the demo's own earlier run.
    again = run_demo(tmp_path / "demo", quick=True, console=Console(width=120))
    assert again["tuned"]["accuracy"] == report["tuned"]["accuracy"]
