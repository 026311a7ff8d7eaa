"""``bittune quantize|merge|compare`` through the command line: the happy path once, and the bad-input catalogue.

Every bad input gives exit code 2, one ``error:`` line naming the problem, a ``fix:`` line, no traceback, and
nothing written (the --out folder is not created; an existing one is unchanged byte for byte).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tiny import color_chat_rows, run_cli, run_inproc, run_subprocess, snapshot, write_jsonl


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(8))


def test_quantize_cli_writes_folder_that_eval_reads(tiny_llama_dir: Path, chat_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_llama_dir), "--bits", "2", "--method", "int", "--group-size", "32"]
    code, err = run_inproc([*argv, "--out", str(out), "--eval", str(chat_file), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "| int2-g32 |" in err and "Traceback" not in err
    report = json.loads((out / "quant_report.json").read_text())
    assert report["spec"] == {"method": "int", "bits": 2, "group_size": 32, "symmetric": False}
    code, printed, err = run_cli(["eval", str(out), "--data", str(chat_file)], capsys)
    assert code == 0, err
    # eval reads the folder as quantized: the numbers the report measured for the reloaded int2 model.
    result, measured = json.loads(printed), report["models"][1]
    assert measured["name"] == "int2-g32" and result["rows"] == measured["rows"] == 8
    assert result["eval_loss"] == pytest.approx(measured["eval_loss"], rel=1e-6)
    assert result["eval_loss"] > report["models"][0]["eval_loss"]  # not the float reference


def _fake_full_run(tmp: Path, model_dir: Path) -> Path:
    run = tmp / "full-run"
    shutil.copytree(model_dir, run / "model")
    (run / "run_config.yaml").write_text(yaml.safe_dump({"method": "full"}))
    return run


def _quantized(tmp: Path, model_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from bittune.quant import quantize
    from bittune.quant.io import save_quantized
    from bittune.quant.spec import IntSpec

    out = tmp / "already"
    out.mkdir()
    spec = IntSpec(bits=4, group_size=32)
    save_quantized(quantize(AutoModelForCausalLM.from_pretrained(model_dir), spec), out, spec=spec, task="causal-lm")
    return out


# Each case: (argv builder from (tmp, tiny_llama_dir, chat_file), text the message must contain).
Case = tuple[Callable[[Path, Path, Path], list[str]], str]
CASES: dict[str, Case] = {
    "bits-not-supported-by-method": (
        lambda t, m, d: ["quantize", str(m), "--bits", "3", "--method", "nf4", "--out", str(t / "o")],
        "stores 4 bits",
    ),
    "unknown-method": (
        lambda t, m, d: ["quantize", str(m), "--bits", "4", "--method", "awq", "--out", str(t / "o")],
        "unknown --method 'awq'",
    ),
    "unsupported-bits": (lambda t, m, d: ["quantize", str(m), "--bits", "5", "--out", str(t / "o")], "--bits 5"),
    "group-size-not-dividing": (
        lambda t, m, d: [
            "quantize",
            str(m),
            "--bits",
            "4",
            "--method",
            "int",
            "--group-size",
            "48",
            "--out",
            str(t / "o"),
        ],
        "does not divide",
    ),
    "group-size-invalid": (
        lambda t, m, d: [
            "quantize",
            str(m),
            "--bits",
            "4",
            "--method",
            "hqq",
            "--group-size",
            "0",
            "--out",
            str(t / "o"),
        ],
        "not a number of columns",
    ),
    "group-size-for-bnb": (
        lambda t, m, d: [
            "quantize",
            str(m),
            "--bits",
            "4",
            "--method",
            "nf4",
            "--group-size",
            "32",
            "--out",
            str(t / "o"),
        ],
        "--group-size applies",
    ),
    "not-a-model": (
        lambda t, m, d: ["quantize", str(d.parent), "--bits", "4", "--out", str(t / "o")],
        "no config.json",
    ),
    "missing-path": (lambda t, m, d: ["quantize", str(t / "nope"), "--bits", "4", "--out", str(t / "o")], "not exist"),
    "already-quantized": (
        lambda t, m, d: ["quantize", str(_quantized(t, m)), "--bits", "2", "--out", str(t / "o")],
        "already quantized",
    ),
    "merge-full-finetune": (
        lambda t, m, d: ["merge", str(_fake_full_run(t, m)), "--out", str(t / "o")],
        "full fine-tuning run",
    ),
    "merge-plain-model": (lambda t, m, d: ["merge", str(m), "--out", str(t / "o")], "no LoRA adapter"),
    "compare-missing-model": (
        lambda t, m, d: ["compare", str(m), str(t / "nope"), "--data", str(d), "--out", str(t / "o")],
        "not exist",
    ),
    "compare-missing-data": (
        lambda t, m, d: ["compare", str(m), "--data", str(t / "none.jsonl"), "--out", str(t / "o")],
        "none.jsonl",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tiny_llama_dir: Path, chat_file: Path, tmp_path: Path, capsys) -> None:
    build, needle = CASES[name]
    argv = build(tmp_path, tiny_llama_dir, chat_file)
    code, err = run_inproc(argv, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert lines[0].startswith("error: "), err
    assert needle in err and "\n  fix: " in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_out_that_exists_and_is_not_empty_is_refused_untouched(tiny_llama_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, err = run_inproc(["quantize", str(tiny_llama_dir), "--bits", "4", "--out", str(out)], capsys)
    assert code == 2 and err.startswith("error: ") and "not empty" in err and "fix:" in err
    assert snapshot(tmp_path) == before


def test_real_exit_code_and_no_traceback(tiny_llama_dir: Path, tmp_path: Path) -> None:
    code, err = run_subprocess(
        ["quantize", str(tiny_llama_dir), "--bits", "2", "--method", "nf4", "--out", str(tmp_path / "o")]
    )
    assert code == 2 and err.startswith("error: --method nf4 stores 4 bits") and "Traceback" not in err
    assert not (tmp_path / "o").exists()
