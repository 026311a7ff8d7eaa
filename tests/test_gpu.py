"""GPU paths: bf16 mixed precision, QLoRA with bf16 compute, paged optimizers. Skipped without CUDA (CI)."""

from __future__ import annotations

import pytest
import torch

from bittune.config import config_from_dict
from bittune.recipes.finetune import train
from tiny import color_chat_rows, first_last, losses, run_config, write_jsonl

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(64))


@pytest.mark.parametrize(
    "method,extra",
    [
        ("full", {}),
        ("lora", {}),
        ("qlora", {"quant": {"bits": 4, "type": "nf4"}, "train": {"optimizer": "paged_adamw_8bit"}}),
        ("qlora", {"quant": {"bits": 8}, "train": {"optimizer": "paged_adamw_32bit"}}),
        ("qlora", {"quant": {"bits": 4}, "train": {"optimizer": "adamw_8bit", "gradient_checkpointing": True}}),
    ],
    ids=["full-bf16", "lora-bf16", "qlora-nf4-paged8", "int8-paged32", "nf4-adamw8-ckpt"],
)
def test_trains_on_gpu_in_bf16(tiny_llama_dir, chat_file, tmp_path, method, extra):
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", method=method, **extra)
    if method == "full":
        raw["train"]["lr"] = 3e-3
    result = train(config_from_dict(raw), progress=False)
    start, end = first_last(losses(result.run_dir))
    assert end < 0.7 * start, (start, end)
    memory = result.final_metrics["memory"]
    assert memory["peak_cuda_allocated_mb"] > 0
    if method != "full":
        # On a GPU the frozen base stays bf16 (LoRA) or k-bit (QLoRA): only the trainable adapter is float32.
        fp32_mb = memory["weights_mb_by_dtype"].get("float32", 0.0)
        assert fp32_mb == pytest.approx(result.final_metrics["trainable_parameters"] * 4 / 2**20, abs=0.011)


def test_qlora_adapter_gives_same_logits_after_reload_on_gpu(tiny_llama_dir, chat_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from bittune.artifacts import load

    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", method="qlora", train={"max_steps": 5})
    result = train(config_from_dict(raw), progress=False)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    base = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=q, device_map={"": 0}, dtype=torch.bfloat16
    )
    stock = PeftModel.from_pretrained(base, result.final_dir).eval()
    ours, _, _ = load(str(result.run_dir))
    ids = torch.tensor([[1, 5, 9, 20, 33, 4, 17]], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-2, rtol=1e-2)
