"""Training knobs do what the README's config table says, seen from outside the recipe: weight decay skips biases
and norms, the learning rate follows its schedule's formula, eval_batch_size / log_every / lora.bias."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bittune.config import config_from_dict
from bittune.recipes.finetune import train
from bittune.training.metrics import read_metrics
from tiny import color_chat_rows, run_config, sentiment_rows, write_jsonl

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(40))


@pytest.fixture(scope="module")
def sentiment_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sentiment.jsonl", sentiment_rows(16))


def test_weight_decay_skips_biases_and_norms(tiny_bert_dir, sentiment_file, tmp_path):
    """One full-fine-tuning step with and without weight decay: only the decayed tensors differ, by lr * wd * w."""
    from safetensors.torch import load_file

    lr, wd = 1e-3, 0.5
    final = {}
    for decay in (0.0, wd):
        raw = run_config(tiny_bert_dir, sentiment_file, tmp_path / f"wd{decay}", method="full",
                         model={"task": "classification"}, data={"format": "classification"},
                         train={"max_steps": 1, "lr": lr, "weight_decay": decay})  # fmt: skip
        final[decay] = load_file(train(config_from_dict(raw), progress=False).final_dir / "model.safetensors")
    base = load_file(tiny_bert_dir / "model.safetensors")
    base = {f"bert.{k}" if not k.startswith("bert.") else k: v for k, v in base.items()}
    decayed, kept = [], []
    for name, value in final[0.0].items():
        diff = final[wd][name] - value
        (decayed if diff.abs().max() > 0 else kept).append(name)
        if name in base and diff.abs().max() > 0:  # decoupled decay: exactly -lr * wd * (the weight before the step)
            torch.testing.assert_close(diff, -lr * wd * base[name], atol=1e-7, rtol=0)  # float32 rounding
    assert all(final[0.0][n].ndim == 1 and (n.endswith(".bias") or "LayerNorm" in n) for n in kept), kept
    assert all(final[0.0][n].ndim == 2 and "LayerNorm" not in n for n in decayed), decayed
    assert any(n.endswith(".bias") for n in kept) and any("LayerNorm.weight" in n for n in kept)
    assert "classifier.weight" in decayed and any("embeddings" in n for n in decayed)


def expected_lr(kind: str, base: float, warmup: int, total: int, step: int) -> float:
    """The lr of optimizer step ``step`` (1-based): linear warmup from base/(warmup+1), then decay to 0 at ``total``."""
    k = step - 1
    if k < warmup:
        return base * (k + 1) / (warmup + 1)
    progress = (k - warmup) / (total - warmup)
    return base * {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[kind]


@pytest.mark.parametrize(
    ("kind", "warmup"),
    [("cosine", {"warmup_steps": 3}), ("linear", {"warmup_ratio": 0.25}), ("constant", {"warmup_steps": 2})],
)
def test_learning_rate_follows_the_schedule_formula(tiny_llama_dir, chat_file, tmp_path, kind, warmup):
    total, base = 10, 1e-3
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run",
                     train={"max_steps": total, "lr": base, "scheduler": kind, **warmup})  # fmt: skip
    result = train(config_from_dict(raw), progress=False)
    logged = [r["lr"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "lr" in r]
    n_warm = warmup.get("warmup_steps") or int(warmup["warmup_ratio"] * total)
    assert logged == pytest.approx([expected_lr(kind, base, n_warm, total, s) for s in range(1, total + 1)], rel=1e-9)


def test_eval_batch_size_sets_the_rows_per_eval_forward_and_not_the_result(
    tiny_llama_dir, chat_file, tmp_path, monkeypatch
):
    from transformers import LlamaModel

    # The body's forward: evaluation and the training step (both with the head only at label positions) run it.
    seen: list[tuple[bool, int]] = []
    real = LlamaModel.forward

    def forward(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append((self.training, int(ids.shape[0])))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", forward)
    held_out = write_jsonl(tmp_path / "eval.jsonl", color_chat_rows(11, seed=5))
    results = {}
    for eval_bs in (None, 4):
        raw = run_config(tiny_llama_dir, chat_file, tmp_path / f"run-{eval_bs}", data={"eval": str(held_out)},
                         train={"max_steps": 2, "batch_size": 8, "eval_batch_size": eval_bs})  # fmt: skip
        seen.clear()
        results[eval_bs] = train(config_from_dict(raw), progress=False).final_metrics["eval_loss"]
        # The final eval over the 11 held-out rows; each batch's shared prompt prefix runs first, as 1 row (CPU).
        evals = [n for training, n in seen if not training]
        assert evals == ([1, 8, 1, 3] if eval_bs is None else [1, 4, 1, 4, 1, 3]), seen
        # each training step: the rows' shared prompt prefix once (1 row, train.shared_prefix on CPU), then the 8 rows
        assert [n for training, n in seen if training] == [1, 8, 1, 8]
    assert results[4] == pytest.approx(results[None], rel=1e-5)


def test_log_every_writes_every_nth_step_and_the_last(tiny_llama_dir, chat_file, tmp_path):
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 10, "log_every": 3})
    result = train(config_from_dict(raw), progress=False)
    assert [r["step"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r] == [3, 6, 9, 10]


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_lora_bias_trains_and_saves_the_biases_it_names(tiny_bert_dir, sentiment_file, tmp_path, bias):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    raw = run_config(tiny_bert_dir, sentiment_file, tmp_path / "run", model={"task": "classification"},
                     data={"format": "classification"}, lora={"bias": bias, "target_modules": ["query", "value"]},
                     train={"max_steps": 3, "lr": 1e-2})  # fmt: skip
    result = train(config_from_dict(raw), progress=False)
    saved = load_file(result.final_dir / "adapter_model.safetensors")
    body_biases = {k for k in saved if k.endswith(".bias") and ".classifier." not in k}
    if bias == "none":
        assert body_biases == set()
    elif bias == "lora_only":  # the biases of the LoRA-targeted layers, no others
        assert body_biases and all(k.endswith(("query.base_layer.bias", "value.base_layer.bias", "query.bias",
                                               "value.bias")) for k in body_biases), body_biases  # fmt: skip
    else:
        assert any("intermediate.dense" in k for k in body_biases) and any("LayerNorm" in k for k in body_biases)
    # The saved biases moved, and stock PEFT puts them back: same outputs as bittune's own loader.
    base = load_file(tiny_bert_dir / "model.safetensors")
    moved = [k for k in body_biases if not torch.equal(saved[k], base[_base_name(k, base)])]
    assert set(moved) == body_biases
    stock = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2), result.final_dir
    ).eval()
    from bittune.artifacts import load

    ours = load(str(result.run_dir), device="cpu").model
    ids = torch.tensor([[1, 5, 9, 20, 33, 4]])
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-6, rtol=1e-6)


def _base_name(adapter_key: str, base: dict) -> str:
    """The base checkpoint's name of a bias saved in an adapter (PEFT prefixes and LoRA's base_layer removed)."""
    name = adapter_key.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return name if name in base else name.removeprefix("bert.")
