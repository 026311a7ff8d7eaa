"""A linear layer stored as packed integer codes with float16 group scales and zeros.

It holds exactly what goes on disk (densely packed codes, float16 ``scale``/``zero``, the bias) and dequantizes
the weight on every forward: no float copy of the weight is kept, so the memory in use is the quantized size.
There are no custom kernels: the forward is one dequantize plus a float32 matmul.
"""

from __future__ import annotations

import torch

from bittune.quant.intq import STORAGE_DTYPE, dequantize, pack_codes, unpack_codes


def _unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """``unpack_codes``, faster for the widths people ship (it runs on every forward of every layer).

    ``pack_codes`` writes every 8 codes as one little-endian ``8*bits``-bit word. For bits dividing 8, byte ``k``
    holds codes ``k*8/bits ...`` from its low bits up: one shift-and-mask per code slot, in uint8. For 3 bits the
    word (3 bytes) fits an int32, a quarter of the traffic of ``unpack_codes``' int64 words (measured 4x faster
    on a 576x1536 layer; 2.5-3x for 1/2/4 bits). Other widths take ``unpack_codes`` itself.
    """
    if bits == 8:
        return packed[:numel]
    mask = 2**bits - 1
    if 8 % bits == 0:
        slots = [packed >> s if s + bits == 8 else (packed >> s) & mask for s in range(0, 8, bits)]
        return torch.stack(slots, dim=-1).reshape(-1)[:numel]
    if bits == 3:
        b = packed.reshape(-1, 3).to(torch.int32)
        words = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        return ((words.unsqueeze(-1) >> shifts) & mask).to(torch.uint8).reshape(-1)[:numel]
    return unpack_codes(packed, bits, numel)


class QuantizedLinear(torch.nn.Module):
    """``y = x @ dequantize(codes, scale, zero).T + bias`` for group-wise integer codes.

    Buffers (all saved in the state dict): ``qweight`` (uint8, packed codes), ``scale`` and ``zero`` (float16,
    ``[out, n_groups, 1]``); ``bias`` is a parameter as in ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        bias: bool,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        g = in_features if group_size <= 0 else group_size
        n_groups = -(-in_features // g)
        self.n_codes = out_features * n_groups * g
        n_bytes = -(-self.n_codes // 8) * bits
        self.register_buffer("qweight", torch.zeros(n_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, n_groups, 1, dtype=STORAGE_DTYPE, device=device))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, 1, dtype=STORAGE_DTYPE, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._group = g

    @classmethod
    def from_codes(
        cls,
        linear: torch.nn.Linear,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        *,
        bits: int,
        group_size: int,
    ) -> QuantizedLinear:
        """Build from a float linear (for shape and bias) and its codes/scale/zero (``intq`` representation)."""
        q = cls(
            linear.in_features,
            linear.out_features,
            bits=bits,
            group_size=group_size,
            bias=linear.bias is not None,
            device=linear.weight.device,
        )
        with torch.no_grad():
            q.qweight.copy_(pack_codes(codes, bits))
            q.scale.copy_(scale.to(STORAGE_DTYPE))
            q.zero.copy_(zero.to(STORAGE_DTYPE))
            if linear.bias is not None:
                q.bias.copy_(linear.bias.float())
        return q

    def codes(self) -> torch.Tensor:
        """The unpacked codes, ``[out, n_groups, g]`` uint8."""
        return _unpack(self.qweight, self.bits, self.n_codes).reshape(self.out_features, -1, self._group)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight this layer computes with."""
        return dequantize(self.codes(), self.scale.float(), self.zero.float(), (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
