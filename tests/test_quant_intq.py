"""The shared integer quantizer: error bounds, storage precision, packing, straight-through gradients."""

import pytest
import torch

from bittune.quant.intq import (
    STORAGE_DTYPE,
    dequantize,
    fake_quantize,
    pack_codes,
    quantize_dequantize,
    quantize_int,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_is_at_most_half_a_step(bits: int, symmetric: bool) -> None:
    torch.manual_seed(bits)
    w = torch.randn(48, 100) * 0.02  # 100 is not a multiple of 32: the last group is padded
    codes, scale, zero = quantize_int(w, bits, 32, symmetric)
    dq = dequantize(codes, scale, zero, w.shape)
    assert dq.shape == w.shape
    assert int(codes.max()) <= 2**bits - 1
    step = scale.expand(-1, -1, 32).reshape(48, -1)[:, :100]
    flat_codes = codes.reshape(48, -1)[:, :100]
    err = (dq - w).abs()
    # Values that landed on an end code may have been clamped (the zero point is rounded): within one step.
    assert bool((err <= step * 1.0001).all())
    # Every other value is rounded to the nearest level: within half a step.
    interior = (flat_codes > 0) & (flat_codes < 2**bits - 1)
    assert interior.float().mean() > (0.9 if bits >= 4 else 0.6)  # 2-3 bits have few interior levels
    assert bool((err[interior] <= step[interior] / 2 * 1.0001).all())


def test_error_shrinks_with_bits() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    errs = [(quantize_dequantize(w, b, 64) - w).pow(2).mean().item() for b in (2, 3, 4, 6, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-3 * errs[0]


def test_scales_are_exactly_representable_in_storage_dtype() -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    codes, scale, zero = quantize_int(w, 4, 16)
    for t in (scale, zero):
        assert torch.equal(t.to(STORAGE_DTYPE).float(), t)
    # So a reload from float16 storage reproduces the weight bit for bit.
    again = dequantize(codes, scale.to(STORAGE_DTYPE).float(), zero.to(STORAGE_DTYPE).float(), w.shape)
    assert torch.equal(again, dequantize(codes, scale, zero, w.shape))


def test_constant_and_zero_groups_survive() -> None:
    w = torch.zeros(2, 32)
    w[1] = 0.5
    assert torch.allclose(quantize_dequantize(w, 4, 16), w, atol=1e-3)


def test_per_row_groups() -> None:
    w = torch.randn(4, 40)
    _, scale, _ = quantize_int(w, 4, group_size=-1)
    assert scale.shape == (4, 1, 1)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_and_density(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (1003,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 126 * bits  # ceil(1003 / 8) words of `bits` bytes
    assert torch.equal(unpack_codes(packed, bits, 1003), codes)


def test_fake_quantize_forward_is_quantize_dequantize_and_gradient_is_identity() -> None:
    torch.manual_seed(2)
    w = torch.randn(8, 64, requires_grad=True)
    out = fake_quantize(w, 3, 16)
    assert torch.equal(out.detach(), quantize_dequantize(w.detach(), 3, 16))
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_bad_bit_width_is_refused() -> None:
    with pytest.raises(ValueError, match=r"1\.\.8 bits"):
        quantize_int(torch.randn(2, 8), 9, 8)


def test_quantizable_linears_skip_heads_and_lora_matrices(tiny_llama_dir) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bittune.quant.select import quantizable_linears

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    names = [n for n, _ in quantizable_linears(model)]
    assert names and "lm_head" not in names
    assert all(n.startswith("model.layers.") for n in names)
    n_linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(names) == n_linears - 1  # everything but the head

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_names = [n for n, _ in quantizable_linears(peft_model)]
    assert len(peft_names) == len(names)
    assert any(n.endswith("q_proj.base_layer") for n in peft_names)
    assert not any("lora_" in n for n in peft_names)
