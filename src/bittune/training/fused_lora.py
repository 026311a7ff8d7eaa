"""LoRA linears as one autograd node: no dropped copy of the input is kept for backward.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate ops, so with ``lora.dropout > 0``
autograd keeps, for every adapted linear, the dropout mask *and* the dropped input ``dropout(x)`` (as ``lora_A``'s
saved input): five bytes per input element on top of ``x`` itself, which the base linear keeps anyway. On a
135M model with 210 adapted linears that is ~0.6 GB per 1,024 tokens of a micro-batch. Here one autograd
function keeps ``x`` (shared with whatever else saved it), the mask (one byte per element; two, in the compute
dtype, under bf16 where converting it on each use costs more time than the byte) and the rank-r product ``A x``,
and rebuilds ``dropout(x)`` in backward. With ``dropout == 0`` PEFT already passes ``x`` itself (no copy); the fused
form then only saves the three temporaries of ``result + B(A x) * s``.

Dropout masks: with ``fast_mask=False`` each mask is drawn exactly as ``torch.nn.functional.dropout`` draws it on
CPU (``bernoulli_(1 - p)`` on a tensor like ``x``), in the same order of calls, so from the same RNG state the
fused model computes what PEFT's does (the equivalence tests rely on it). ``bernoulli_`` spends one 32-bit draw
per element and was ~12% of a LoRA step on a 2-core Xeon; the default ``fast_mask=True`` draws four 15-bit lanes
per 64-bit random word (~3.4x faster), with the drop probability rounded to a multiple of 1/32,768 (0.05 ->
0.04999) and the kept values scaled by that exact probability, so the layer stays unbiased.

Under 16-bit compute on CPU the layer returns ``base + adapter`` in float32 (``float32_sum=True``): there the frozen
base is stored in bf16 by bittune itself, early in training the adapter's share of the output is below bf16's
resolution of it, and a bf16 sum would round the update away (measured: the loss curve then fell far more slowly
than float32's). On a GPU (``float32_sum=False``) the sum stays in the compute dtype, as PEFT's own forward gives it
under autocast: a float32 output there turns the residual stream float32 and costs a cast at every next linear.

Parameters, state dicts and ``save_pretrained`` are untouched: only each layer's ``forward`` is replaced.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

_FUSED = "_bittune_fused_forward"
_LANES = 32768  # 15-bit lanes of the fast masks


def keep_mask(x: torch.Tensor, p: float, *, fast: bool = True) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask shaped like ``x`` (each element kept with probability ~``1 - p``) and the exact drop
    probability it was drawn with. ``fast=False`` draws it like ``F.dropout`` (same RNG stream)."""
    if not fast:
        return torch.empty_like(x).bernoulli_(1.0 - p).bool(), p
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()  # 63 random bits each
    threshold = round(p * _LANES)
    lanes = words.view(torch.int16)[:n].bitwise_and_(_LANES - 1)
    return (lanes >= threshold).view(x.shape), threshold / _LANES


def _kbit_base(layer: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear (only such a layer's own forward computes with its packed weight)."""
    return type(layer).__name__ in ("Linear4bit", "Linear8bitLt") and type(layer).__module__.startswith("bitsandbytes")


def _fusable(module: torch.nn.Module, kbit: bool = False) -> bool:
    """A PEFT LoRA Linear over a plain ``nn.Linear`` (or, with ``kbit``, a bitsandbytes k-bit linear) with one
    active vanilla adapter (no DoRA / variants)."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return False
    if not isinstance(module, LoraLayer) or not hasattr(module, "get_base_layer"):
        return False
    base = module.get_base_layer()
    if type(base) is not torch.nn.Linear and not (kbit and _kbit_base(base)):
        return False
    active = module.active_adapters
    return (
        len(active) == 1
        and active[0] in module.lora_A
        and not getattr(module, "lora_variant", {}).get(active[0])
        and not getattr(module, "fan_in_fan_out", False)
    )


def fuse_lora(model: torch.nn.Module, *, fast_mask: bool = True, float32_sum: bool = True, kbit: bool = False) -> int:
    """Replace the forward of every fusable LoRA linear in ``model``; returns how many were fused.

    ``fast_mask``: draw dropout masks the fast way (see the module docstring); False reproduces PEFT's masks.
    ``float32_sum``: under 16-bit compute, return ``base + adapter`` in float32 (CPU) or in the compute dtype (GPU).
    ``kbit``: also LoRA over bitsandbytes 4-bit / 8-bit bases (QLoRA): their own forward (and backward) computes
    the base part, one autograd node the adapter's, so the dropped copy of each input is not kept either.

    Layers that are not plain LoRA over ``nn.Linear`` (k-bit bases unless ``kbit``, DoRA, several active
    adapters) keep PEFT's forward. Merged or disabled adapters fall back to PEFT's forward at call time. Undo with
    :func:`unfuse_lora`.
    """
    n = 0
    for module in model.modules():
        if _fusable(module, kbit):
            n += not hasattr(module, _FUSED)
            setattr(module, _FUSED, {"fast_mask": fast_mask, "float32_sum": float32_sum, "kbit": kbit})
            module.forward = types.MethodType(_fused_forward, module)
    return n


def unfuse_lora(model: torch.nn.Module) -> int:
    """Give every fused layer back PEFT's own forward; returns how many were restored."""
    n = 0
    for module in model.modules():
        if hasattr(module, _FUSED):
            del module.forward  # the instance attribute; the class's forward shows through again
            delattr(module, _FUSED)
            n += 1
    return n


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    options = getattr(self, _FUSED)
    if self.disable_adapters or self.merged or args or kwargs or not _fusable(self, options["kbit"]):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.get_base_layer()
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    a, b = self.lora_A[name], self.lora_B[name]
    if type(base) is not torch.nn.Linear:  # a k-bit base: its own forward and backward for the base part
        if torch.is_autocast_enabled(x.device.type):  # only float compute is fused over k-bit bases (CPU QLoRA)
            return type(self).forward(self, x, *args, **kwargs)
        return _kbit_forward(base(x), x, a.weight, b.weight, float(self.scaling[name]), p, options["fast_mask"])
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    with torch.autocast(x.device.type, enabled=False):
        # Autocast is applied by hand (one cast per tensor), so that backward computes in the same dtype.
        cast = (lambda t: t if t is None else t.to(dtype)) if dtype is not None else (lambda t: t)
        mask = None
        if p > 0:
            mask, p = keep_mask(x, p, fast=options["fast_mask"])
            if (dtype or x.dtype).itemsize == 2:
                # Multiplying by a bool mask converts it on every use (3 per step, ~5x slower than the product
                # itself); a 16-bit compute dtype keeps it converted once, at one more byte per element.
                mask = mask.to(dtype or x.dtype)
        return _LoraLinear.apply(
            cast(x), cast(base.weight), cast(base.bias), cast(a.weight), cast(b.weight), float(self.scaling[name]), p,
            mask, options["float32_sum"],
        )  # fmt: skip


def _kbit_forward(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    p: float,
    fast: bool,
) -> torch.Tensor:
    """``result + s * B(A(drop(x)))`` for a k-bit base's ``result``, the adapter in its weights' dtype (as PEFT's)."""
    x = x.to(lora_a.dtype)
    mask = None
    if p > 0:
        mask, p = keep_mask(x, p, fast=fast)
    delta = _LoraDelta.apply(x, lora_a, lora_b, scaling / (1.0 - p), mask)
    return result + delta.to(result.dtype)


def _adapter_grads(
    g2: torch.Tensor,
    x2: torch.Tensor,
    mask: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ax: torch.Tensor,
    s: float,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The adapter branch's gradients ``(d x, d A, d B)`` (2-D, ``None`` where not needed) for the output gradient
    ``g2``; ``drop(x) = x * mask`` with the ``1 / (1 - p)`` folded into ``s``."""
    need_x, need_a, need_b = needs
    gb = g2 @ lora_b  # [tokens, r]: the gradient reaching A x, before the scaling
    mask2 = None if mask is None else mask.reshape(x2.shape)
    back = grad_a = grad_b = None
    if need_x:
        back = (gb @ lora_a).mul_(s)
        if mask2 is not None:
            back = back.mul_(mask2)
    if need_a:
        grad_a = (gb.T @ (x2 if mask2 is None else x2 * mask2)).mul_(s)
    if need_b:
        grad_b = (g2.T @ ax.reshape(-1, ax.shape[-1])).mul_(s)
    return back, grad_a, grad_b


class _LoraDelta(torch.autograd.Function):
    """``s * (drop(x) A^T) B^T``: the adapter branch alone, beside a base layer that has its own autograd."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, s, mask):
        ax = F.linear(x if mask is None else x * mask, lora_a)
        ctx.save_for_backward(x, lora_a, lora_b, ax, mask)
        ctx.s = s
        return F.linear(ax, lora_b).mul_(s)

    @staticmethod
    def backward(ctx, grad):
        x, lora_a, lora_b, ax, mask = ctx.saved_tensors
        g2 = grad.to(x.dtype).reshape(-1, grad.shape[-1])
        back, grad_a, grad_b = _adapter_grads(
            g2, x.reshape(-1, x.shape[-1]), mask, lora_a, lora_b, ax, ctx.s, ctx.needs_input_grad[:3]
        )
        return (None if back is None else back.reshape(x.shape)), grad_a, grad_b, None, None


class _LoraLinear(torch.autograd.Function):
    """``y = x W^T + bias + s * (drop(x) A^T) B^T`` with ``drop(x) = x * mask / (1 - p)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, p, mask, float32_sum):
        # drop(x) = (x * mask) / (1 - p): the division is folded into the rank-r side, s' = s / (1 - p).
        ax = F.linear(x if mask is None else x * mask, lora_a)  # [..., r], without the 1 / (1 - p)
        s = scaling / (1.0 - p)
        y = F.linear(x, weight, bias)
        if float32_sum and y.dtype.itemsize == 2:
            # 16-bit compute: the sum is float32. Early in training the adapter's share of y (B starts at zero) is
            # below bf16's resolution of y (2^-8 relative): rounded into a bf16 y, the update would not be seen.
            y = y.float()
        y = y.add_(F.linear(ax, lora_b), alpha=s)
        ctx.save_for_backward(x, weight, lora_a, lora_b, ax, mask)
        ctx.s, ctx.has_bias = s, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, ax, mask = ctx.saved_tensors
        s = ctx.s
        grad = grad.to(x.dtype)  # a float32 output's gradient, back in the compute dtype (as autocast would)
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        back, grad_a, grad_lb = _adapter_grads(g2, x2, mask, lora_a, lora_b, ax, s, (need_x, need_a, need_bb))
        grad_x = grad_w = grad_bias = None
        if need_x:
            grad_x = (g2 @ weight).add_(back).reshape(x.shape)
        if need_w:
            grad_w = g2.T @ x2
        if need_b and ctx.has_bias:
            grad_bias = g2.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_lb, None, None, None, None
