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


def test_fused_lora_matches_peft_on_gpu():
    """The GPU form of the fused LoRA linears (sum in bf16, as PEFT's) gives PEFT's loss and gradients on a GPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bittune.training.fused_lora import fuse_lora, unfuse_lora

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 256, (3, 17), device="cuda")

    def loss_and_grads():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    plain = loss_and_grads()
    assert fuse_lora(model, float32_sum=False) == 14
    fused = loss_and_grads()
    unfuse_lora(model)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-2, atol=1e-2)
    assert plain[1].keys() == fused[1].keys() and len(plain[1]) == 28
    for name, want in plain[1].items():
        rel = float((fused[1][name] - want).norm() / want.norm())
        assert rel < 0.05, (name, rel)
