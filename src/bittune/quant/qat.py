"""Quantization-aware training: fake-quantized linears, the bit-width schedule, and convert.

Every linear that quantization will touch (:func:`bittune.quant.select.quantizable_linears`) gets a
``torch.nn.utils.parametrize`` parametrization on its weight that returns
:func:`bittune.quant.intq.fake_quantize` of it: the forward pass sees exactly the numbers the integer quantizer will
store, the backward pass treats the rounding as identity (straight-through estimator). The bit-width is a plain
attribute, so the recipe moves it along the schedule at stage boundaries.

With LoRA, what is fake-quantized is the *merged* weight ``W + s * B @ A``: the base layer computes
``(Q(W + D) - D) x`` with ``D`` the adapter's delta (detached), and PEFT adds ``D x`` back through the adapter
path, so the layer outputs ``Q(W + D) x`` -- the very model that :func:`convert` (fold the adapter, then quantize)
produces. The adapter's gradient comes from PEFT's own path, which is the straight-through gradient of
``Q(W + D)``. (With ``lora.dropout > 0`` the adapter path sees dropped-out inputs while training; in eval the
identity is exact.) Fake-quantizing only the base and adding the adapter on top would train a model that convert
cannot reproduce: at 4 bits most of a small LoRA delta rounds away when it is folded in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils import parametrize

from bittune.quant.intq import fake_quantize, quantize_dequantize
from bittune.quant.select import quantizable_linears
from bittune.sidecars import QatSettings


class FakeQuant(torch.nn.Module):
    """Parametrization ``W -> fake_quantize(W)`` with a bit-width that can change between steps."""

    def __init__(self, bits: int, group_size: int, symmetric: bool) -> None:
        super().__init__()
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.bits, self.group_size, self.symmetric)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"


class FakeQuantMerged(FakeQuant):
    """Parametrization of a LoRA base layer: ``W -> Q(W + D) - D``, with ``D`` the adapter's (detached) delta.

    The LoRA layer is held in a plain list, not as a submodule: registering it would make the module tree cyclic.
    """

    def __init__(self, lora_layer: Any, adapter: str, bits: int, group_size: int, symmetric: bool) -> None:
        super().__init__(bits, group_size, symmetric)
        self._lora = [lora_layer]
        self.adapter = adapter

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            delta = self._lora[0].get_delta_weight(self.adapter)
            # As PEFT's merge (`weight.data += delta`): add in the wider dtype, round once to the weight's dtype.
            merged = (weight.to(torch.promote_types(weight.dtype, delta.dtype)) + delta).to(weight.dtype)
        return fake_quantize(merged, self.bits, self.group_size, self.symmetric) - delta.to(weight.dtype)


@dataclass
class FakeQuantized:
    """Handle on a model's fake-quant parametrizations."""

    modules: list[FakeQuant]
    names: list[str]

    @property
    def bits(self) -> int:
        return self.modules[0].bits if self.modules else 0

    def set_bits(self, bits: int) -> None:
        """Switch every fake-quantized weight to ``bits`` (takes effect at the next forward pass)."""
        for m in self.modules:
            m.bits = bits


def _lora_parent(model: torch.nn.Module, name: str) -> tuple[Any, str] | None:
    """The PEFT LoRA layer whose ``base_layer`` is ``name``, and its (single) active adapter; else None."""
    if not name.endswith(".base_layer"):
        return None
    parent = model.get_submodule(name.rsplit(".", 1)[0])
    adapters = [a for a in getattr(parent, "active_adapters", []) if a in getattr(parent, "lora_A", {})]
    if not adapters:
        return None
    if len(adapters) > 1 or getattr(parent, "use_dora", {}).get(adapters[0], False):
        raise ValueError(f"{name}: QAT supports one plain LoRA adapter per layer (no DoRA, no adapter mixes)")
    return parent, adapters[0]


def attach_fake_quant(model: torch.nn.Module, *, bits: int, group_size: int, symmetric: bool) -> FakeQuantized:
    """Fake-quantize the weights of every quantizable linear of ``model`` (in place).

    Call it after LoRA is attached (so the merged weight is what gets quantized) and before the optimizer is built.

    Returns:
        A handle whose :meth:`FakeQuantized.set_bits` moves all of them to another bit-width.
    """
    modules, names = [], []
    for name, linear in quantizable_linears(model):
        lora = _lora_parent(model, name)
        if lora is None:
            fq = FakeQuant(bits, group_size, symmetric)
        else:
            fq = FakeQuantMerged(lora[0], lora[1], bits, group_size, symmetric)
        parametrize.register_parametrization(linear, "weight", fq)
        modules.append(fq)
        names.append(name)
    return FakeQuantized(modules, names)


def remove_fake_quant(model: torch.nn.Module) -> None:
    """Drop the fake-quant parametrizations, keeping the latent float weights (what convert quantizes)."""
    for _, module in list(model.named_modules()):
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, FakeQuant) for p in module.parametrizations["weight"]
        ):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def quantize_linears_(model: torch.nn.Module, *, bits: int, group_size: int, symmetric: bool) -> int:
    """Replace each quantizable linear's weight by its integer quantize-dequantize round trip (in place).

    This is post-training quantization evaluated in float: numerically what the ``int`` quantizer stores.

    Returns:
        How many linears were quantized.
    """
    chosen = quantizable_linears(model)
    with torch.no_grad():
        for _, linear in chosen:
            w = linear.weight
            w.copy_(quantize_dequantize(w, bits, group_size, symmetric).to(w.dtype))
    return len(chosen)


def convert(model: torch.nn.Module, *, bits: int, group_size: int, symmetric: bool) -> torch.nn.Module:
    """A QAT-trained model as the quantized model it was trained to be.

    Strips the fake-quant parametrizations, folds a LoRA adapter into the base weights (PEFT's
    ``merge_and_unload``), then replaces each quantizable weight by its quantize-dequantize round trip. The result
    computes what the fake-quantized model computed (in eval mode); storing the codes is the PTQ side's job.

    Returns:
        A plain transformers model (no PEFT wrapper, no parametrizations).
    """
    remove_fake_quant(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    quantize_linears_(model, bits=bits, group_size=group_size, symmetric=symmetric)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The schedule


@dataclass(frozen=True)
class BitSchedule:
    """Which bit-width each optimizer step trains at.

    Attributes:
        bits: bits of each stage, in order.
        ends: the global step at which each stage ends (cumulative; the last one is the run's last step).
    """

    bits: tuple[int, ...]
    ends: tuple[int, ...]

    @classmethod
    def build(cls, bits: list[int], stage_steps: list[int] | None, total_steps: int) -> BitSchedule:
        """Stage ends from explicit stage lengths (the last stage runs on to ``total_steps``) or an even split.

        Raises:
            ValueError: if there are more stages than steps, or the stages outlast the run.
        """
        n = len(bits)
        if stage_steps is None:
            if total_steps < n:
                raise ValueError(f"{n} qat stages need at least {n} steps, the run has {total_steps}")
            stage_steps = [total_steps // n + (1 if i < total_steps % n else 0) for i in range(n)]
        ends = [sum(stage_steps[: i + 1]) for i in range(n)]
        if ends[-1] > total_steps:
            raise ValueError(f"the qat stages last {ends[-1]} steps but the run has {total_steps}")
        ends[-1] = total_steps
        return cls(tuple(bits), tuple(ends))

    def stage_of(self, step: int) -> int:
        """Stage (0-based) of the optimizer step that follows ``step`` completed steps."""
        for i, end in enumerate(self.ends):
            if step < end:
                return i
        return len(self.ends) - 1

    def bits_at(self, step: int) -> int:
        """Bits of the optimizer step that follows ``step`` completed steps (the run's state after ``step``)."""
        return self.bits[self.stage_of(step)]

    def ends_stage(self, step: int) -> int | None:
        """The stage that completed ``step`` finishes, or None."""
        return self.ends.index(step) if step in self.ends else None


def qat_settings(*, bits: int, group_size: int, symmetric: bool, method: str, schedule: BitSchedule) -> QatSettings:
    """What ``qat.json`` records (:func:`bittune.sidecars.write_qat_settings`): the final quantization to apply,
    and the schedule that led there."""
    return QatSettings(
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        method=method,
        schedule=list(schedule.bits),
        stage_ends=list(schedule.ends),
    )
