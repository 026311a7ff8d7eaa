"""The command line: clean errors (one message, exit 2, no traceback, nothing written) and the happy paths."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import color_chat_rows, write_jsonl

REPO = Path(__file__).parent.parent


def bittune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bittune", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def write_config(path: Path, model: str, data: str, out: str, extra: str = "") -> Path:
    path.write_text(
        f"model:\n  path: {model}\nmethod: lora\ndata:\n  train: {data}\n  format: chat\n  max_length: 64\n"
        f"train:\n  max_steps: 3\n  batch_size: 4\n{extra}output_dir: {out}\n"
    )
    return path


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_import_bittune_is_light():
    code = "import sys, bittune, bittune.errors, bittune.config; print(sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate', 'datasets', 'bitsandbytes', 'gguf') if m in sys.modules))"  # noqa: E501
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bad_config_lists_all_problems_and_writes_nothing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  path: m\ndata:\n  train: t.jsonl\ntrain:\n  lr: 0\n  bogus: 1\noutput_dir: out\n")
    proc = bittune("train", str(cfg), cwd=tmp_path)
    assert_clean_error(proc, "2 problems", "train.lr", "train.bogus: unknown key")
    assert not (tmp_path / "out").exists()


def test_missing_model_path_is_a_clean_error(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", color_chat_rows(4))
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "no-such-model"), str(data), str(tmp_path / "out"))
    proc = bittune("train", str(cfg))
    assert_clean_error(proc, "model.path", "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", color_chat_rows(4))
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "empty"), str(data), str(tmp_path / "out"))
    assert_clean_error(bittune("train", str(cfg)), "no config.json")


def test_malformed_data_line_is_a_clean_error(tmp_path, tiny_llama_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": []}\n{not json\n')
    cfg = write_config(tmp_path / "c.yaml", str(tiny_llama_dir), str(data), str(tmp_path / "out"))
    proc = bittune("train", str(cfg))
    assert_clean_error(proc, f"{data}:2")
    assert not (tmp_path / "out").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: m}\n")
    proc = bittune("--debug", "train", str(cfg))
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def stock_greedy_reply(base: Path, adapter: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy reply of base + adapter loaded with stock transformers and PEFT (no bittune code)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.e2e
def test_validate_train_eval_generate(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", color_chat_rows(24))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", str(tiny_llama_dir), str(data), str(out))

    proc = bittune("validate", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stderr and "24" in proc.stderr

    proc = bittune("train", str(cfg), "--set", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["final_dir"] == str(out / "adapter")

    proc = bittune("eval", str(out), "--data", str(data))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"eval_loss", "eval_perplexity", "rows", "data", "tokens"} <= set(result) and result["data"] == str(data)
    assert "eval_accuracy" not in result  # plain-text rows: loss only, no task metric invented
    assert result["rows"] == 24 and result["eval_perplexity"] > 1
    assert result["eval_perplexity"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-6)

    proc = bittune("generate", str(out), "--prompt", "What color is the sky?", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    # What it prints is the reply stock transformers + PEFT give greedily for the chat-rendered prompt.
    assert proc.stdout.strip() == stock_greedy_reply(tiny_llama_dir, out / "adapter", "What color is the sky?", 5)
    assert proc.stdout.strip()

    proc = bittune("eval", str(out))  # the run had no eval file: say what to pass
    assert_clean_error(proc, "--data")


def test_hub_id_resolves_from_the_local_hub_cache_offline(tmp_path, tiny_llama_dir):
    """A hub id goes through the same loader as a folder: lay a model out as the hub cache does, offline."""
    import shutil

    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_llama_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    code = (
        "from bittune.model import load_model, load_tokenizer; import torch;"
        "t = load_tokenizer('acme/tiny-llama');"
        "m = load_model('acme/tiny-llama', task='causal-lm', dtype=torch.float32);"
        "print(type(m).__name__, len(t))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "LlamaForCausalLM"
    # And an id that is not in the cache is one clean error, not a traceback from the hub client.
    cfg = write_config(tmp_path / "c.yaml", "acme/not-cached", str(tmp_path / "d.jsonl"), str(tmp_path / "o"))
    write_jsonl(tmp_path / "d.jsonl", color_chat_rows(4))
    proc = subprocess.run(
        [sys.executable, "-m", "bittune", "train", str(cfg)], capture_output=True, text=True, env=env, timeout=120
    )
    assert_clean_error(proc, "acme/not-cached", "HF_HUB_OFFLINE")
