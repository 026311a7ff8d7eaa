"""End-to-end recipe runs on tiny random models: loss falls, files appear, resume is exact, adapters load in PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bittune.config import config_from_dict
from bittune.recipes.finetune import stop_after, train
from bittune.training.metrics import read_metrics
from tiny import color_chat_rows, first_last, losses, run_config, sentiment_rows, write_jsonl

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(64))


@pytest.fixture(scope="module")
def sentiment_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sentiment.jsonl", sentiment_rows(96))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_causal_lm_loss_falls_and_outputs_appear(tiny_llama_dir, chat_file, tmp_path, method):
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", method=method, data={"eval_fraction": 0.1})
    if method == "full":
        raw["train"]["lr"] = 3e-3
    result = train(config_from_dict(raw), progress=False)
    start, end = first_last(losses(result.run_dir))
    assert end < 0.6 * start, (start, end)
    run = result.run_dir
    assert (run / "run_config.yaml").is_file() and (run / "summary.json").is_file()
    final = run / ("adapter" if method == "lora" else "model")
    assert result.final_dir == final
    if method == "lora":
        assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    else:
        assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert (final / "tokenizer_config.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and "eval_perplexity" in summary
    records = read_metrics(run / "metrics.jsonl")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert any("eval_loss" in r for r in records)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_classification_loss_falls_and_accuracy_is_reported(tiny_bert_dir, sentiment_file, tmp_path, method):
    raw = run_config(
        tiny_bert_dir,
        sentiment_file,
        tmp_path / "run",
        method=method,
        model={"task": "classification"},
        data={"format": "classification", "eval_fraction": 0.2},
        train={"lr": 3e-3 if method == "lora" else 1e-3, "max_steps": 40},
    )
    result = train(config_from_dict(raw), progress=False)
    start, end = first_last(losses(result.run_dir))
    assert end < 0.5 * start, (start, end)
    assert result.final_metrics["eval_accuracy"] >= 0.9
    assert json.loads((result.final_dir / "labels.json").read_text()) == ["neg", "pos"]


def test_adapter_loads_in_stock_peft_with_same_logits(tiny_llama_dir, chat_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bittune.artifacts import load

    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 5})
    result = train(config_from_dict(raw), progress=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    stock = PeftModel.from_pretrained(base, result.final_dir).eval()
    ours, _, task = load(str(result.run_dir))
    assert task == "causal-lm"
    ids = torch.tensor([[1, 5, 9, 20, 33, 4]])
    with torch.no_grad():
        a, b = stock(input_ids=ids).logits, ours(input_ids=ids.to(ours.device)).logits.cpu()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # The adapter really changed the model (else this test could not fail).
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=ids).logits, a, atol=1e-4)


def test_accumulation_equals_big_batch(tiny_llama_dir, chat_file, tmp_path):
    """Batch 1 x accumulation 4 must give the loss and gradient of batch 4 (token-count normalisation)."""

    def step_one(bs: int, ga: int, name: str) -> dict:
        raw = run_config(
            tiny_llama_dir,
            chat_file,
            tmp_path / name,
            method="full",
            # float32 everywhere (no bf16 autocast on a GPU): the comparison is exact up to summation order.
            train={"batch_size": bs, "grad_accum": ga, "max_steps": 3, "max_grad_norm": None, "mixed_precision": "no"},
        )
        run = train(config_from_dict(raw), progress=False).run_dir
        return read_metrics(run / "metrics.jsonl")

    big, acc = step_one(4, 1, "big"), step_one(1, 4, "acc")
    for a, b in zip(big, acc, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_causal_lm_run_applies_the_head_only_at_label_positions(tiny_llama_dir, chat_file, tmp_path, monkeypatch,
                                                                  method):  # fmt: skip
    """The recipe's default (issue 14): every training micro-batch takes causal_lm_target_loss_sum, and so do the
    evals (without gradients: their loss needs the label positions' logits only)."""
    import bittune.training.loss as loss_module

    real, calls = loss_module.causal_lm_target_loss_sum, []

    def spy(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_module, "causal_lm_target_loss_sum", spy)
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", method=method, data={"eval_fraction": 0.1},
                     train={"max_steps": 3, "grad_accum": 2, "eval_every": 1,
                            "max_tokens_per_pass": None})  # one pass per micro-batch, to count them  # fmt: skip
    result = train(config_from_dict(raw), progress=False)
    assert calls.count(True) == 6  # 3 steps x 2 micro-batches, with gradients
    assert calls.count(False) >= 3  # an eval after every step, without
    assert "eval_loss" in result.final_metrics


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_is_bit_identical(tiny_llama_dir, chat_file, tmp_path, method):
    from safetensors.torch import load_file

    def cfg(out: Path):
        return config_from_dict(
            run_config(
                tiny_llama_dir,
                chat_file,
                out,
                method=method,
                lora={"dropout": 0.1},  # dropout draws random numbers: resume must restore the RNG
                data={"eval_fraction": 0.1},
                train={"max_steps": 12, "save_every": 4, "eval_every": 3, "scheduler": "cosine", "warmup_steps": 2,
                       "batch_size": 16, "epochs": 1},
            )
        )  # fmt: skip

    straight = train(cfg(tmp_path / "straight"), progress=False)
    with stop_after(10):
        stopped = train(cfg(tmp_path / "resumed"), progress=False)
    assert stopped.stopped_early and stopped.final_dir is None
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-4", "step-8"]
    resumed = train(cfg(tmp_path / "resumed"), resume=True, progress=False)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(straight.final_dir / name), load_file(resumed.final_dir / name)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The metrics of the resumed run read like one uninterrupted run.
    steps = [r["step"] for r in read_metrics(resumed.run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 13))
    assert losses(straight.run_dir) == losses(resumed.run_dir)


def test_output_dir_of_a_finished_run_is_never_overwritten(tiny_llama_dir, chat_file, tmp_path):
    from bittune.errors import BittuneError, ConfigError

    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 2})
    first = train(config_from_dict(raw), progress=False)
    before = (first.final_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config_from_dict(raw), progress=False)
    with pytest.raises(BittuneError, match="already finished"):
        train(config_from_dict(raw), resume=True, progress=False)
    assert (first.final_dir / "adapter_model.safetensors").read_bytes() == before


def test_packing_trains(tiny_llama_dir, chat_file, tmp_path):
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", data={"packing": True, "max_length": 64})
    result = train(config_from_dict(raw), progress=False)
    start, end = first_last(losses(result.run_dir))
    assert end < 0.6 * start


@pytest.mark.parametrize("measured", ["float32", "bfloat16"])
def test_cpu_compute_dtype_follows_the_measurement_and_says_so(tiny_llama_dir, chat_file, tmp_path, monkeypatch,
                                                               measured):  # fmt: skip
    """A CPU without fast bf16 trains in float32 as before; one with it (forced through the measurement's seam)
    trains LoRA under bf16 autocast over a bf16 frozen base. The choice is in the first lines and summary.json, and
    ``train.mixed_precision: no`` keeps float32 whatever was measured."""
    from bittune.data.collate import CPU_TOKENS_PER_PASS
    from bittune.plan.device import FORCE_CPU_DTYPE_ENV

    monkeypatch.setenv(FORCE_CPU_DTYPE_ENV, measured)
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 20})
    result = train(config_from_dict(raw), progress=False)
    start, end = first_last(losses(result.run_dir))
    assert end < 0.6 * start, (start, end)
    compute = json.loads((result.run_dir / "summary.json").read_text())["compute"]
    expected = "bf16" if measured == "bfloat16" else "no"
    assert compute["mixed_precision"] == expected and compute["chosen_by"] == "forced"
    assert compute["speedups"]["fused_lora"] > 0
    assert bool(compute["speedups"].get("frozen_bf16")) == (expected == "bf16")
    assert compute["speedups"]["tokens_per_pass"] == CPU_TOKENS_PER_PASS  # auto on CPU
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "no", train={"max_steps": 2, "mixed_precision": "no"})
    compute = json.loads((train(config_from_dict(raw), progress=False).run_dir / "summary.json").read_text())["compute"]
    assert compute["mixed_precision"] == "no" and compute["chosen_by"] == "config"
    assert "frozen_bf16" not in compute["speedups"]
