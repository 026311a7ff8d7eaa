"""Quantized layers back to float ``nn.Linear``: the tools of the merge policy and of float-only writers.

:func:`bittune.artifacts.load` with ``as_="merged"`` uses them: a QLoRA base is loaded as trained and
:func:`dequantize_bnb_linears` turns its 4/8-bit layers into the float32 weights the adapter was trained against,
before PEFT merges the adapter in (the merge policy, ARCHITECTURE.md); :func:`dequantize_grid_linears` lets a
``bittune quantize`` folder be exported as the float values it computes with.
"""

from __future__ import annotations

from typing import Any

from bittune.model import set_module


def dequantize_bnb_linears(model: Any) -> int:
    """Replace every bitsandbytes 4-bit/8-bit linear in ``model`` by an ``nn.Linear`` holding its float32 weight.

    Returns:
        How many layers were replaced.
    """
    import torch
    from peft.utils.integrations import dequantize_bnb_weight

    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    for name, layer in targets:
        weight = dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.to(linear.weight.device))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.float())
        set_module(model, name, linear.to(weight.device))
    if targets:
        # The model is no longer a bitsandbytes model: saving it must not claim it is.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
            if attr in model.__dict__:
                delattr(model, attr)
        # transformers records how it converted the checkpoint on load and reverts that on save; the bitsandbytes
        # unpacking steps have no inverse (save_pretrained would raise), and the weights are plain floats now.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions if _reversible(c)] or None
    return len(targets)


def _reversible(conversion: Any) -> bool:
    try:
        [op.reverse_op for op in getattr(conversion, "operations", None) or []]
    except NotImplementedError:
        return False
    return True


def dequantize_grid_linears(model: Any) -> int:
    """Replace every :class:`~bittune.quant.linear.QuantizedLinear` (int/hqq/gptq) by an ``nn.Linear`` holding the
    float32 weight it computes with, so that float-only writers (GGUF, safetensors) see the quantized values.

    Returns:
        How many layers were replaced.
    """
    import torch

    from bittune.quant.linear import QuantizedLinear

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, layer in targets:
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.float())
        set_module(model, name, linear.to(layer.qweight.device))
    return len(targets)
