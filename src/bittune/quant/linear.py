"""A linear layer stored as packed integer codes with float16 group scales and zeros.

It holds exactly what goes on disk (densely packed codes, float16 ``scale``/``zero``, the bias) and dequantizes
the weight on every forward: no float copy of the weight is kept, so the memory in use is the quantized size.
There are no custom kernels: the forward is one dequantize plus a float32 matmul.
"""

from __future__ import annotations

import torch

from bittune.quant.intq import STORAGE_DTYPE, dequantize, pack_codes, unpack_codes


def _unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """``unpack_codes`` with a fast path for 1/2/4/8 bits, where whole codes sit inside single bytes.

    ``pack_codes`` writes every 8 codes as one little-endian ``8*bits``-bit word, so for bits dividing 8 byte ``k``
    holds codes ``k*8/bits ...`` from its low bits up: a shift-and-mask per byte recovers them.
    """
    if 8 % bits:
        return unpack_codes(packed, bits, numel)
    if bits == 8:
        return packed[:numel]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]


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
