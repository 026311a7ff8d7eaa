"""Group-wise integer quantization of weight matrices: the one quantizer that PTQ, QAT and convert share.

Representation of a quantized ``[out, in]`` weight with group size ``g`` (the last group is zero-padded when ``in``
is not a multiple of ``g``):

* ``codes``: unsigned integers in ``[0, 2**bits - 1]``, shape ``[out, n_groups, g]`` (uint8, unpacked);
* ``scale`` and ``zero``: one float per group, shape ``[out, n_groups, 1]``;
* ``dequantized = (codes - zero) * scale``.

Symmetric quantization uses the fixed zero point ``2**(bits-1)`` (codes centred on zero); asymmetric uses a per-group
zero point from the group's min/max. Scales and zeros are rounded to float16 *before* the codes are computed, so the
values stored on disk (float16) are exactly the values training and evaluation saw: QAT -> convert is lossless.
"""

from __future__ import annotations

import torch

STORAGE_DTYPE = torch.float16  # scales/zeros are stored (and therefore computed) at this precision
_TINY = torch.finfo(torch.float16).tiny


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reshape ``[out, in]`` into ``[out, n_groups, g]`` in float32, zero-padding the last group."""
    out_features, in_features = weight.shape
    g = in_features if group_size <= 0 else group_size
    pad = (-in_features) % g
    w = weight.detach().float()
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_features, -1, g)


def round_storage(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the storage dtype of scales and zeros (float16), back in float32."""
    return x.to(STORAGE_DTYPE).float()


def int_qparams(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale and zero point per group (float32 tensors holding float16-representable values).

    Args:
        weight: ``[out, in]`` weight matrix.
        bits: bit-width, 2..8.
        group_size: columns per group; ``<= 0`` means one group per row.
        symmetric: fixed zero point (``2**(bits-1)``) if True, per-group min/max zero point otherwise.

    Returns:
        ``(scale, zero)``, each of shape ``[out, n_groups, 1]``.
    """
    _check_bits(bits)
    w = grouped(weight, group_size)
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        absmax = w.abs().amax(dim=-1, keepdim=True)
        # Codes span [-half, half-1] around zero; scale so that +absmax maps to half-1 (the smaller side).
        scale = round_storage((absmax / max(half - 1, 1)).clamp(min=_TINY))
        zero = torch.full_like(scale, float(half))
    else:
        lo = w.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = w.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = round_storage(((hi - lo) / qmax).clamp(min=_TINY))
        zero = round_storage(torch.round(-lo / scale).clamp(0, qmax))
    return scale, zero


def quantize_codes(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Integer codes of ``weight`` for given per-group ``scale``/``zero``: ``clamp(round(w / scale + zero))``."""
    w = grouped(weight, group_size)
    return torch.clamp(torch.round(w / scale + zero), 0, 2**bits - 1).to(torch.uint8)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int] | torch.Size
) -> torch.Tensor:
    """Float32 ``[out, in]`` weight from grouped codes (drops the padding of the last group)."""
    out_features, in_features = shape
    w = codes.to(torch.float32, copy=True).sub_(zero).mul_(scale)  # in place: one float32 buffer, not three
    return w.reshape(out_features, -1)[:, :in_features]


def quantize_int(
    weight: torch.Tensor, bits: int, group_size: int = 64, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group-wise quantization.

    Returns:
        ``(codes, scale, zero)`` as described in the module docstring.
    """
    scale, zero = int_qparams(weight, bits, group_size, symmetric)
    return quantize_codes(weight, scale, zero, bits, group_size), scale, zero


def quantize_dequantize(weight: torch.Tensor, bits: int, group_size: int = 64, symmetric: bool = False) -> torch.Tensor:
    """What the weight becomes after a quantize -> dequantize round trip (float32, same shape)."""
    codes, scale, zero = quantize_int(weight, bits, group_size, symmetric)
    return dequantize(codes, scale, zero, weight.shape)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int = 64, symmetric: bool = False) -> torch.Tensor:
    """Quantize-dequantize in the forward pass, identity gradient in the backward (straight-through estimator).

    The forward value equals :func:`quantize_dequantize` bit for bit (same function), cast to ``weight``'s dtype:
    it is written ``q + (w - w.detach())``, whose second term is exactly zero, rather than ``w + (q - w).detach()``,
    which can land one rounding step away from ``q``.
    """
    q = quantize_dequantize(weight, bits, group_size, symmetric).to(weight.dtype)
    return q + (weight - weight.detach())


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes densely into a flat uint8 tensor (any bit-width 1..8, e.g. 3).

    Every 8 codes become one ``8 * bits``-bit integer, written out as ``bits`` little-endian bytes.
    """
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (flat.reshape(-1, 8) << shifts).sum(dim=1, keepdim=True)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as a flat uint8 tensor."""
    _check_bits(bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (packed.reshape(-1, bits).to(torch.int64) << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = (words >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"integer quantization supports 1..8 bits, got {bits}")
