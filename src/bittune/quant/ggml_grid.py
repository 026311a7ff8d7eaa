"""llama.cpp's own Q4_0 and Q8_0 grids in torch, for quantization-aware training whose GGUF export is exact.

Both ggml types cut each row into blocks of 32 weights with one float16 scale ``d`` per block:

* **Q8_0**: ``d = max|x| / 127``, codes ``q = round(x / d)`` (half away from zero) in int8, value ``d16 * q``;
* **Q4_0**: ``d = m / -8`` where ``m`` is the block's value of largest magnitude *with its sign* (the first one on a
  tie), codes ``q = min(15, trunc(x / d + 8.5))`` in 0..15, value ``d16 * (q - 8)``.

The codes are computed with the float32 ``d`` and its float32 reciprocal, and only the stored scale is rounded to
float16 (``d16``), exactly as ``ggml-quants.c`` and ``gguf.quants`` do; every step below is the same float32
operation in the same order, so the result is bit-identical to what the Q4_0/Q8_0 export writes (tested byte for
byte against ``gguf.quants``). The dequantized products are exact in float32 (an 11-bit scale times a small
integer), so a model trained on these values and exported to that type *is* the exported model.

Stages of a QAT schedule at other bit-widths use the Q4_0 form with ``2**(bits-1)`` levels on each side (``bits``
4 is Q4_0 itself; 8 is Q8_0): the same block layout, rounding and float16 scales, so the grid only tightens.
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK = 32
METHODS = {"gguf-q4_0": 4, "gguf-q8_0": 8}  # qat.method -> the bits of its final stage (the exported type)


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"ggml blocks need rows that are a multiple of {BLOCK} weights, got {weight.shape[-1]}")
    return weight.detach().to(torch.float32).reshape(-1, BLOCK)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), as gguf.quants' ``np_roundf`` computes it."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def ggml_codes(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block float16 scales ``[n_blocks, 1]`` and integer codes ``[n_blocks, 32]`` (float32 holding ints).

    ``bits`` 8: Q8_0's signed codes; otherwise the Q4_0 form's unsigned codes ``0 .. 2**bits - 1`` (offset
    ``2**(bits-1)``).
    """
    b = _blocks(weight)
    if bits == 8:
        d = b.abs().amax(dim=-1, keepdim=True) / 127
        q = _roundf(b * _inverse(d)) + 0.0  # + 0.0: a code of -0.0 becomes 0, as the int8 stored
    else:
        half = float(2 ** (bits - 1))
        m = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True))
        d = m / -half
        q = torch.trunc(b * _inverse(d) + (half + 0.5)).clamp(0, 2 * half - 1)
    return d.to(torch.float16), q


def ggml_quantize_dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The values llama.cpp computes with after storing ``weight`` on this grid (float32, ``weight``'s shape)."""
    d16, q = ggml_codes(weight, bits)
    offset = 0.0 if bits == 8 else float(2 ** (bits - 1))
    return ((q - offset) * d16.to(torch.float32)).reshape(weight.shape)


def ggml_fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`ggml_quantize_dequantize` forward, identity gradient (the straight-through estimator).

    Written ``q + (w - w.detach())`` as :func:`bittune.quant.intq.fake_quantize` is, so the forward value is
    ``q`` bit for bit.
    """
    q = ggml_quantize_dequantize(weight, bits).to(weight.dtype)
    return q + (weight - weight.detach())


def to_gguf_blocks(weight: torch.Tensor, bits: int) -> Any:
    """The Q4_0 (``bits`` 4) or Q8_0 (``bits`` 8) bytes of ``weight`` in GGUF's block layout (a uint8 numpy array
    ``[n_blocks, 18 | 34]``): what ``gguf.quants.quantize`` writes, built from :func:`ggml_codes`."""
    import numpy as np

    if bits not in (4, 8):
        raise ValueError("only Q4_0 (4 bits) and Q8_0 (8 bits) are GGUF types")
    d16, q = ggml_codes(weight, bits)
    d = d16.numpy().view(np.uint8)
    if bits == 8:
        codes = q.numpy().astype(np.int8).view(np.uint8)
    else:
        qs = q.numpy().astype(np.uint8).reshape(-1, 2, BLOCK // 2)
        codes = qs[:, 0, :] | (qs[:, 1, :] << np.uint8(4))
    return np.concatenate([d, codes], axis=-1)
