"""QAT on llama.cpp's own grid: ``qat.method: gguf-q4_0`` trains on exactly what the Q4_0 export stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bittune.quant.ggml_grid import ggml_fake_quantize, ggml_quantize_dequantize, to_gguf_blocks
from tiny import color_chat_rows, write_jsonl


def _hard_blocks() -> list[np.ndarray]:
    """Weights that exercise every corner of the rounding: ties of |max| with both signs, exact halves, zeros,
    values far below the block's scale, subnormal-sized scales, and plain Gaussian weights."""
    rng = np.random.default_rng(0)
    ties = np.tile(np.array([1, -1] * 16, np.float32), (2, 1))
    halves = (np.round(rng.standard_normal((16, 64)) * 8) / 16).astype(np.float32)
    mixed = rng.standard_normal((8, 64)).astype(np.float32)
    mixed[:, ::7] *= 1e-4
    return [
        (rng.standard_normal((64, 256)) * 0.05).astype(np.float32),
        halves,
        ties,
        -ties,
        np.zeros((2, 32), np.float32),
        (rng.standard_normal((4, 64)) * 1e-6).astype(np.float32),
        (rng.standard_normal((4, 64)) * 1e-30).astype(np.float32),
        mixed,
    ]


@pytest.mark.parametrize(("bits", "kind"), [(4, "Q4_0"), (8, "Q8_0")])
def test_the_grid_is_gguf_quants_byte_for_byte(bits: int, kind: str) -> None:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    for w in _hard_blocks():
        ref = gguf.quants.quantize(w, qtype)
        assert np.array_equal(to_gguf_blocks(torch.from_numpy(w), bits).reshape(ref.shape), ref)
        want = gguf.quants.dequantize(ref, qtype)
        got = ggml_quantize_dequantize(torch.from_numpy(w), bits).numpy()
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), "values must match bit for bit"


def test_fake_quant_is_the_grid_forward_and_identity_backward() -> None:
    w = (torch.randn(8, 64) * 0.1).requires_grad_()
    out = ggml_fake_quantize(w, 4)
    assert torch.equal(out.detach(), ggml_quantize_dequantize(w, 4))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_lower_bit_stages_keep_the_q4_0_form() -> None:
    w = torch.randn(16, 64)
    errors = [float((ggml_quantize_dequantize(w, b) - w).abs().mean()) for b in (2, 3, 4, 5, 6, 8)]
    assert errors == sorted(errors, reverse=True)  # more bits, less error: the grid only tightens
    assert len(torch.unique(ggml_quantize_dequantize(w[:1, :32], 3))) <= 8


def test_rows_that_are_not_32_blocks_are_refused(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from bittune.quant.qat import attach_fake_quant

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(48, 32, bias=False)
    with pytest.raises(ValueError, match=r"multiple of llama\.cpp's 32"):
        attach_fake_quant(model, bits=4, group_size=32, symmetric=True, method="gguf-q4_0")


@pytest.mark.parametrize(
    ("qat", "problem"),
    [
        ({"schedule": [8, 6], "method": "gguf-q4_0"}, "last qat.schedule stage must be 4"),
        ({"schedule": [8, 4], "method": "gguf-q8_0"}, "must be 8"),
        ({"schedule": [8, 4], "method": "gguf-q4_0", "group_size": 64}, "blocks are 32 weights"),
    ],
)
def test_config_rules(tmp_path: Path, qat: dict, problem: str) -> None:
    from bittune.config import config_from_dict
    from bittune.errors import ConfigError

    raw = {"model": {"path": "m"}, "method": "qat", "qat": qat, "data": {"train": "t.jsonl"}, "output_dir": "o"}
    with pytest.raises(ConfigError, match=problem):
        config_from_dict(raw)


def _run(tiny_llama_dir: Path, tmp: Path, method: str) -> Path:
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    data = write_jsonl(tmp / "chat.jsonl", color_chat_rows(32))
    raw = {
        "model": {"path": str(tiny_llama_dir)},
        "method": method,
        **({"lora": {"r": 4, "alpha": 8, "dropout": 0.0}} if method == "lora" else {}),
        "qat": {"schedule": [8, 4], "steps_per_stage": 3, "method": "gguf-q4_0"},
        "data": {"train": str(data), "format": "chat", "max_length": 64, "eval_fraction": 0.25},
        "train": {"batch_size": 8, "lr": 3e-3, "seed": 1, "scheduler": "constant"},
        "output_dir": str(tmp / "run"),
    }
    return train(config_from_dict(raw), progress=False).run_dir


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["qat", "lora"])
def test_q4_0_export_is_the_trained_model_bit_for_bit(tiny_llama_dir: Path, tmp_path: Path, method: str) -> None:
    """Every fake-quantized weight the last stage trained and evaluated is stored in the Q4_0 file exactly."""
    import gguf

    from bittune.artifacts import load, resolve
    from bittune.export.commands import export_model
    from bittune.export.gguf_writer import ARCHITECTURES, permute_for_rotary, tensor_name_map
    from bittune.quant.qat import convert
    from bittune.quant.select import quantizable_linears
    from bittune.quant.spec import GgmlSpec

    run = _run(tiny_llama_dir, tmp_path, method)
    settings = resolve(run).qat
    assert settings.method == "gguf-q4_0" and settings.bits == 4 and settings.group_size == 32
    assert settings.spec == GgmlSpec(method="gguf-q4_0", bits=4)
    result = export_model(str(run), fmt="gguf", qtype="q4_0", out=tmp_path / "m.gguf")
    assert result["name"] == f"{tiny_llama_dir.name}-{method}-gguf-q4_0"

    model, _, _ = load(str(run), device="cpu")
    trained = convert(model, bits=4, group_size=32, symmetric=True, method="gguf-q4_0")
    cfg = trained.config
    name_map = tensor_name_map(ARCHITECTURES["LlamaForCausalLM"], cfg.num_hidden_layers)
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    linears = quantizable_linears(trained)
    assert len(linears) == 7 * cfg.num_hidden_layers
    for name, linear in linears:
        t = stored[name_map.get_name(name + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, name
        w = linear.weight.detach().numpy()
        if ".q_proj" in name or ".k_proj" in name:
            heads = cfg.num_attention_heads if ".q_proj" in name else cfg.num_key_value_heads
            w = permute_for_rotary(w, heads)
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        assert np.array_equal(deq.view(np.uint32), np.ascontiguousarray(w).view(np.uint32)), name
        # ... and quantizing the trained values again gives the very bytes that were written
        assert np.array_equal(
            to_gguf_blocks(torch.from_numpy(np.ascontiguousarray(w)), 4).reshape(-1), t.data.reshape(-1)
        )


def test_quantize_refuses_a_gguf_grid_run_and_names_the_export(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    from bittune.errors import ConfigError
    from bittune.quant.spec import spec_for_source

    model = shutil.copytree(tiny_llama_dir, tmp_path / "model")  # a QAT run's model/ folder
    (model / "qat.json").write_text('{"bits": 4, "group_size": 32, "symmetric": true, '
                                                         '"method": "gguf-q4_0", "schedule": [4]}')  # fmt: skip
    with pytest.raises(ConfigError, match="--type q4_0"):
        spec_for_source(str(model), bits=None, method=None, group_size=None, symmetric=False)
