"""What bittune writes loads with stock libraries alone: PEFT adapters (classifier with its head, LoRA + QAT) and
bitsandbytes quantize folders, giving exactly the outputs bittune's own loader gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bittune.config import config_from_dict
from bittune.recipes.finetune import train
from tiny import color_chat_rows, run_cli, run_config, sentiment_rows, write_jsonl

pytestmark = pytest.mark.e2e

IDS = torch.tensor([[1, 5, 9, 20, 33, 4, 17]])


def pin_fp32_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Switch off bitsandbytes' AVX512-BF16 eval kernel (bf16 compute), as bittune does; nothing else is changed."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def ours(path: Path) -> torch.nn.Module:
    from bittune.artifacts import load

    return load(str(path), device="cpu").model


@pytest.mark.parametrize(("method", "bits", "layer"), [("nf4", 4, "Linear4bit"), ("fp4", 4, "Linear4bit"),
                                                      ("llm-int8", 8, "Linear8bitLt")])  # fmt: skip
def test_bitsandbytes_quantize_folder_loads_with_stock_from_pretrained(
    tiny_llama_dir: Path, tmp_path: Path, capsys, method: str, bits: int, layer: str
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    argv = ["quantize", str(tiny_llama_dir), "--bits", str(bits), "--method", method, "--out", str(out)]
    code, _, err = run_cli([*argv, "--device", "cpu"], capsys)
    assert code == 0, err
    stock = pin_fp32_kernels(AutoModelForCausalLM.from_pretrained(out)).eval()  # no dtype, no device map: defaults
    assert sum(type(m).__name__ == layer for m in stock.modules()) == 14  # every body linear, not the head
    with torch.no_grad():
        got, expected = stock(input_ids=IDS).logits, ours(out)(input_ids=IDS).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(input_ids=IDS).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, plain, atol=1e-4)  # the stored weights are the quantized ones


def test_classifier_lora_adapter_loads_in_stock_peft_with_its_head(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(32))
    raw = run_config(tiny_bert_dir, data, tmp_path / "run", model={"task": "classification"},
                     data={"format": "classification"}, train={"max_steps": 4, "lr": 3e-3})  # fmt: skip
    result = train(config_from_dict(raw), progress=False)
    # Stock: a fresh (randomly initialised) head on the base, then the adapter, which carries the trained head.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    fresh_head = base.classifier.weight.detach().clone()
    stock = PeftModel.from_pretrained(base, result.final_dir).eval()
    with torch.no_grad():
        got, expected = stock(input_ids=IDS).logits, ours(result.run_dir)(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    head = stock.base_model.model.classifier.modules_to_save["default"].weight
    assert not torch.equal(head, fresh_head)  # the saved head replaced the fresh one


def test_lora_qat_adapter_loads_in_stock_peft(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The adapter holds the latent float LoRA weights (qat.json beside it): stock PEFT gives bittune's float view."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "chat.jsonl", color_chat_rows(32))
    raw = run_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 4, "lr": 1e-2},
                     qat={"schedule": [4], "group_size": 16})  # fmt: skip
    result = train(config_from_dict(raw), progress=False)
    assert json.loads((result.final_dir / "qat.json").read_text())["bits"] == 4
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    stock = PeftModel.from_pretrained(base, result.final_dir).eval()
    with torch.no_grad():
        got, expected = stock(input_ids=IDS).logits, ours(result.run_dir)(input_ids=IDS).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-4)  # the adapter is not a no-op
