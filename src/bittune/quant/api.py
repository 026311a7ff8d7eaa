"""One entry point for post-training quantization: ``quantize(model, spec)`` looks up the spec's method in
:data:`QUANTIZERS` (method -> quantizer).

Every method touches the same layers (:func:`bittune.quant.select.quantizable_linears`): the body's linear layers,
never the output head. The model is changed in place and returned. :func:`bnb_config` is the one place a
:class:`~bittune.quant.spec.BnbSpec` becomes a transformers ``BitsAndBytesConfig`` (a QLoRA base, a quantized
folder, its reload).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from bittune.errors import ConfigError
from bittune.model import set_module
from bittune.quant.select import HEAD_NAMES, quantizable_linears
from bittune.quant.spec import BnbSpec, CastSpec, GptqSpec, HqqSpec, IntSpec, Spec

if TYPE_CHECKING:
    import torch

# LLM.int8: input columns with a value above this run in 16-bit (the outlier decomposition; transformers' default).
LLM_INT8_THRESHOLD = 6.0
Batches = Iterable[dict[str, Any]] | None
Log = Callable[[str], None] | None


def check_group_size(model: torch.nn.Module, group_size: int) -> None:
    """Refuse a group size that does not divide the input width of every quantized layer.

    ``intq`` could pad a ragged last group, but that stores padding and no other tool reads such groups; a group
    size that fits is always available (e.g. 32, 64 or 128 for common widths).
    """
    if group_size == -1:
        return
    widths = sorted({lin.in_features for _, lin in quantizable_linears(model)})
    bad = [w for w in widths if w % group_size]
    if bad:
        fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
        raise ConfigError(
            f"--group-size {group_size} does not divide the input width of every layer (widths {widths})",
            hint=f"use --group-size {' or '.join(map(str, fits))}" if fits else "use --group-size -1 (one per row)",
        )


def quantize(
    model: torch.nn.Module,
    spec: Spec,
    *,
    calibration: Iterable[dict[str, torch.Tensor]] | None = None,
    log: Callable[[str], None] | None = None,
) -> torch.nn.Module:
    """Quantize ``model`` in place as ``spec`` says and return it.

    Args:
        model: A full-precision transformers model (no adapters: merge them first).
        spec: :class:`CastSpec`, :class:`BnbSpec`, :class:`IntSpec`, :class:`HqqSpec` or :class:`GptqSpec`.
        calibration: Model input batches (``input_ids`` ...) for methods that look at activations (GPTQ);
            :func:`calibration_batches` makes them from tokenized rows.
        log: Progress messages for the slow methods.

    Raises:
        ConfigError: a group size that does not fit the model, or GPTQ without calibration batches.
    """
    quantizer = QUANTIZERS.get(getattr(spec, "method", None))
    if quantizer is None:
        raise TypeError(f"not a quantization spec: {spec!r}")
    return quantizer(model, spec, calibration, log)


def _cast(model: torch.nn.Module, spec: CastSpec, calibration: Batches, log: Log) -> torch.nn.Module:
    import torch

    return model.to(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[spec.method]))


def calibration_batches(
    rows: Iterable[dict[str, Any]], tokens: int, *, seq_len: int = 512, per_row: bool = False
) -> list[dict[str, Any]]:
    """GPTQ calibration batches from tokenized rows (``input_ids``), about ``tokens`` tokens in all.

    Causal-LM rows are concatenated and cut into ``seq_len``-token sequences (no padding, so every position is a
    real input; the last piece may be shorter). With ``per_row`` (classifiers, whose rows each carry their own
    special tokens) each row is one batch of its own.
    """
    import torch

    if per_row:
        batches, n = [], 0
        for row in rows:
            if n >= tokens:
                break
            batches.append({"input_ids": torch.tensor([list(row["input_ids"])])})
            n += len(row["input_ids"])
        return batches
    ids: list[int] = []
    for row in rows:
        ids.extend(int(t) for t in row["input_ids"])
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    return [{"input_ids": torch.tensor([ids[i : i + seq_len]])} for i in range(0, len(ids), seq_len)]


def _quantize_gptq(model: torch.nn.Module, spec: GptqSpec, calibration: Batches, log: Log) -> torch.nn.Module:
    import torch

    from bittune.quant.gptq import gptq_quantize_model
    from bittune.quant.linear import QuantizedLinear

    if calibration is None:
        raise ConfigError(
            "--method gptq needs calibration text", hint="add --calib FILE: a few thousand tokens like your use"
        )
    check_group_size(model, spec.group_size)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in calibration]
    linears = quantizable_linears(model)
    was_training = model.training
    model.eval()
    codes = gptq_quantize_model(
        model, linears, batches, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
        act_order=spec.act_order, log=log,
    )  # fmt: skip
    model.train(was_training)
    with torch.no_grad():
        for name, linear in linears:
            c, scale, zero = codes[name]
            q = QuantizedLinear.from_codes(linear, c, scale, zero, bits=spec.bits, group_size=spec.group_size)
            set_module(model, name, q)
    return model


def _quantize_grid(model: torch.nn.Module, spec: IntSpec | HqqSpec, calibration: Batches, log: Log) -> torch.nn.Module:
    import torch

    from bittune.quant.hqq import quantize_hqq
    from bittune.quant.intq import quantize_int
    from bittune.quant.linear import QuantizedLinear

    check_group_size(model, spec.group_size)
    with torch.no_grad():
        for name, linear in quantizable_linears(model):
            w = linear.weight.detach().float()
            if spec.method == "int":
                codes, scale, zero = quantize_int(w, spec.bits, spec.group_size, spec.symmetric)
            else:
                codes, scale, zero = quantize_hqq(w, spec.bits, spec.group_size, iters=spec.iters)
            q = QuantizedLinear.from_codes(linear, codes, scale, zero, bits=spec.bits, group_size=spec.group_size)
            set_module(model, name, q)
    return model


def bnb_config(spec: BnbSpec, device: Any = None, *, skip_modules: list[str] | None = None) -> Any:
    """The transformers ``BitsAndBytesConfig`` of ``spec`` on ``device``: a QLoRA base to load, or what a
    bitsandbytes-quantized folder records (and reloads with).

    Args:
        skip_modules: Modules kept in full precision. None: transformers' own choice (tied weights and the output
            embedding), what a QLoRA base is loaded with; a PTQ folder names the heads it left out
            (:data:`~bittune.quant.select.HEAD_NAMES`), so that reloading rebuilds exactly the swapped layers.

    ``compute_dtype: auto`` is float32 on CPU and bf16 on a GPU that has it
    (:func:`bittune.model.resolve_compute_dtype`).
    """
    import torch
    from transformers import BitsAndBytesConfig

    from bittune.model import resolve_compute_dtype

    skip = skip_modules
    if spec.method == "llm-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=LLM_INT8_THRESHOLD, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.method,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=resolve_compute_dtype(spec.compute_dtype, torch.device(device or "cpu")),
        llm_int8_skip_modules=skip,
    )


def _quantize_bnb(model: torch.nn.Module, spec: BnbSpec, calibration: Batches, log: Log) -> torch.nn.Module:
    """Swap the body linears for bitsandbytes layers; they quantize when placed on the device.

    The model's config gets the matching ``quantization_config``, so ``save_pretrained`` writes a folder that
    transformers reloads as the same bitsandbytes model.
    """
    import bitsandbytes as bnb
    import torch

    from bittune.model import pin_bnb_cpu_kernels, resolve_compute_dtype

    device = next(model.parameters()).device
    compute_dtype = resolve_compute_dtype(spec.compute_dtype, device)
    with torch.no_grad():
        for name, linear in quantizable_linears(model):
            w = linear.weight.detach().float()
            if spec.method == "llm-int8":
                new = bnb.nn.Linear8bitLt(
                    linear.in_features,
                    linear.out_features,
                    bias=linear.bias is not None,
                    has_fp16_weights=False,
                    threshold=LLM_INT8_THRESHOLD,  # what the saved config reloads with
                )
                new.weight = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    bias=linear.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=spec.double_quant,
                    quant_type=spec.method,
                )
                new.weight = bnb.nn.Params4bit(
                    w, requires_grad=False, compress_statistics=spec.double_quant, quant_type=spec.method, blocksize=64
                )
            if linear.bias is not None:
                new.bias = torch.nn.Parameter(linear.bias.detach().float(), requires_grad=False)
            set_module(model, name, new.to(device))  # placement is what quantizes
    model.config.quantization_config = bnb_config(spec, device, skip_modules=sorted(HEAD_NAMES))
    return pin_bnb_cpu_kernels(model)


# method -> quantizer(model, spec, calibration, log); every method of bittune.quant.spec.METHODS has one.
QUANTIZERS: dict[str, Callable[[Any, Any, Batches, Log], Any]] = {
    "fp16": _cast,
    "bf16": _cast,
    "nf4": _quantize_bnb,
    "fp4": _quantize_bnb,
    "llm-int8": _quantize_bnb,
    "int": _quantize_grid,
    "hqq": _quantize_grid,
    "gptq": _quantize_gptq,
}
