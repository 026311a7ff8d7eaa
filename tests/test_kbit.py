"""QLoRA (4-bit NF4/FP4) and 8-bit LoRA on CPU through bitsandbytes."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch

from bittune.config import config_from_dict
from bittune.errors import ConfigError
from bittune.recipes.finetune import train
from bittune.sidecars import read_training_quant
from tiny import color_chat_rows, first_last, losses, run_config, write_jsonl

# These train on the CPU path on purpose (fp32 compute, CPU-only refusals). One process holds one accelerate
# device, so on a GPU machine they are left to CI and the GPU paths are covered by test_gpu.py.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path test; see test_gpu.py on a GPU")


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(64))


@cpu_only
@pytest.mark.e2e
@pytest.mark.parametrize(
    "quant,optimizer",
    [({"bits": 4, "type": "nf4"}, "adamw"), ({"bits": 4, "type": "fp4"}, "adamw_8bit"), ({"bits": 8}, "adamw")],
    ids=["nf4", "fp4-adamw8bit", "int8"],
)
def test_kbit_lora_trains_on_cpu(tiny_llama_dir, chat_file, tmp_path, quant, optimizer):
    raw = run_config(
        tiny_llama_dir,
        chat_file,
        tmp_path / "run",
        method="qlora",
        quant=quant,
        train={"optimizer": optimizer, "device": "cpu"},
    )
    result = train(config_from_dict(raw), progress=False)
    start, end = first_last(losses(result.run_dir))
    assert end < 0.7 * start, (start, end)
    memory = result.final_metrics["memory"]
    assert memory["peak_rss_mb"] > 0 and memory["weights_mb"] > 0
    stored = "uint8" if quant["bits"] == 4 else "int8"
    assert memory["weights_mb_by_dtype"][stored] > 0
    saved = read_training_quant(result.final_dir)  # bittune_quantization.json, in the one vocabulary
    assert saved.bits == quant["bits"]
    assert json.loads((result.final_dir / "bittune_quantization.json").read_text())["method"] == saved.method


@cpu_only
@pytest.mark.e2e
@pytest.mark.parametrize("quant", [{"bits": 4}, {"bits": 4, "type": "fp4"}, {"bits": 8}], ids=["nf4", "fp4", "int8"])
def test_qlora_adapter_loads_in_stock_peft_on_a_transformers_quantized_base(tiny_llama_dir, chat_file, tmp_path, quant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from bittune.artifacts import load

    raw = run_config(
        tiny_llama_dir,
        chat_file,
        tmp_path / "run",
        method="qlora",
        quant=quant,
        train={"max_steps": 5, "device": "cpu"},
    )
    result = train(config_from_dict(raw), progress=False)
    if quant["bits"] == 4:
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.get("type", "nf4"),
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=q, device_map={"": "cpu"})
    # Stock files, stock libraries; only bitsandbytes' AVX512-BF16 eval kernel is switched off, as bittune does
    # (it computes in bf16 and needs 64+ inputs per layer; see bittune.model.pin_bnb_cpu_kernels).
    for m in base.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    stock = PeftModel.from_pretrained(base, result.final_dir).eval()
    ours, _, _ = load(str(result.run_dir), device="cpu")
    ids = torch.tensor([[1, 5, 9, 20, 33, 4, 17]])
    with torch.no_grad():
        a, b = stock(input_ids=ids).logits, ours(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    lora_b = [p for n, p in ours.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the adapter is not a no-op


def test_double_quant_shrinks_the_stored_scales(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from bittune.quant.api import bnb_config
    from bittune.quant.spec import BnbSpec
    from bittune.training.memory import weights_footprint
    from tiny import make_tiny_llama

    # Wide layers: on a 32-wide toy the fixed per-layer tables of double quant outweigh what it saves.
    model_dir = make_tiny_llama(tmp_path / "wide", tokenizer, hidden=512, layers=1)

    def footprint(double: bool) -> dict[str, int]:
        q = bnb_config(BnbSpec(method="nf4", double_quant=double, compute_dtype="float32"))
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map={"": "cpu"})
        n4 = sum(p.numel() * 2 for p in model.parameters() if p.dtype == torch.uint8)  # two weights per byte
        return weights_footprint(model), n4

    (single, n4), (double, _) = footprint(False), footprint(True)
    assert single["uint8"] == double["uint8"] == n4 // 2
    # One float32 scale per 64 weights (0.5 bit/weight) becomes one uint8 per 64 plus a float32 per 256 blocks.
    assert single["quant_state"] >= n4 // 64 * 4
    assert double["quant_state"] < 0.5 * single["quant_state"]


def test_incompatible_options_are_refused_at_config_time():
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output_dir": "o"}
    with pytest.raises(ConfigError, match="use method: qlora"):
        config_from_dict({**base, "method": "full", "quant": {"bits": 4}})
    with pytest.raises(ConfigError, match="apply to 4-bit only"):
        config_from_dict({**base, "method": "qlora", "quant": {"bits": 8, "type": "fp4"}})
    cfg = config_from_dict({**base, "method": "qlora"})
    assert cfg.quant.bits == 4 and cfg.quant.method == "nf4" and cfg.quant.double_quant


@cpu_only
def test_paged_optimizer_is_refused_on_cpu(tiny_llama_dir, chat_file, tmp_path):
    raw = run_config(
        tiny_llama_dir, chat_file, tmp_path / "run", train={"optimizer": "paged_adamw_8bit", "device": "cpu"}
    )
    with pytest.raises(ConfigError, match="paged_adamw_8bit pages optimizer state"):
        train(config_from_dict(raw), progress=False)


@cpu_only
def test_half_precision_compute_is_refused_on_cpu(tiny_llama_dir, chat_file, tmp_path):
    from bittune.errors import ModelLoadError

    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", method="qlora", quant={"compute_dtype": "bfloat16"})
    with pytest.raises(ModelLoadError, match="50x slower"):
        train(config_from_dict(raw), progress=False)
    assert not (tmp_path / "run").exists()


def test_4bit_layers_keep_the_training_numerics_in_eval(tokenizer, tmp_path):
    """bitsandbytes switches 4-bit layers to a bf16 kernel in no-grad eval on CPUs with AVX512-BF16 (which also
    fails on layers narrower than its 64-wide blocks); bittune pins the fp32 path so eval computes what training did.
    """
    from transformers import AutoModelForCausalLM

    from bittune.model import pin_bnb_cpu_kernels
    from bittune.quant.api import bnb_config
    from bittune.quant.spec import BnbSpec
    from tiny import make_tiny_llama

    path = make_tiny_llama(tmp_path / "m", tokenizer)
    q = bnb_config(BnbSpec(method="nf4", double_quant=True, compute_dtype="float32"))
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": "cpu"})
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    pin_bnb_cpu_kernels(model)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    ids = torch.tensor([[1, 5, 9, 20, 33, 4]])
    model.train()
    train_logits = model(ids).logits.detach()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, train_logits, atol=1e-6, rtol=1e-6)
