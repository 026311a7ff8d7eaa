"""Merging a LoRA adapter into its base in full precision, whatever the base was stored in during training.

A QLoRA adapter was trained against the *dequantized NF4* weights, not the original ones. Merging it into the
original fp16/fp32 checkpoint (the common mistake) changes what the adapter corrects; merging into the 4-bit base
and re-quantizing the sum without measuring hides the rounding of the merged weights. Here the base is loaded
exactly as in training, its bitsandbytes layers are dequantized to float32 (so the merged model starts from what
the adapter saw), and PEFT's ``merge_and_unload`` adds the LoRA delta in float32. Re-quantizing, and measuring what
that costs, is the caller's next step (:mod:`bittune.quant.flows`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bittune.errors import ModelLoadError


def dequantize_bnb_linears(model: Any) -> int:
    """Replace every bitsandbytes 4-bit/8-bit linear in ``model`` by an ``nn.Linear`` holding its float32 weight.

    Returns:
        How many layers were replaced.
    """
    import torch
    from peft.utils.integrations import dequantize_bnb_weight

    from bittune.quant.api import _set_module

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
        _set_module(model, name, linear.to(weight.device))
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

    from bittune.quant.api import _set_module
    from bittune.quant.linear import QuantizedLinear

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, layer in targets:
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.float())
        _set_module(model, name, linear.to(layer.qweight.device))
    return len(targets)


def load_merged(path: str, *, device: str = "cpu") -> tuple[Any, Any, str, dict[str, Any]]:
    """Load a model folder or run directory as one full-precision model, with any adapter merged in.

    A bitsandbytes base (QLoRA, or a bnb-quantized folder) is dequantized first, so the result equals the model as
    trained (up to float32 rounding).

    Returns:
        ``(model in eval mode, tokenizer, task, info)``; ``info`` says whether an adapter was merged and how the
        base was quantized in training (``base_quantization``).
    """
    from bittune.model import QUANT_FILE, load_for_inference, resolve_inference_source

    _, adapter, _ = resolve_inference_source(path)
    qlora = None
    if adapter is not None and (Path(adapter) / QUANT_FILE).is_file():
        qlora = json.loads((Path(adapter) / QUANT_FILE).read_text())
    if adapter is None:
        model, tokenizer, task = load_for_inference(path, device=device)
        dequantize_bnb_linears(model)
        return model.eval(), tokenizer, task, {"adapter": None, "base_quantization": None}
    from peft import PeftModel

    # Load the base exactly as in training, dequantize it, then attach the adapter to the float32 layers.
    peft_model, tokenizer, task = load_for_inference(path, device=device)
    if qlora is None:
        return peft_model.merge_and_unload().eval(), tokenizer, task, {"adapter": adapter, "base_quantization": None}
    base_model = peft_model.unload()
    dequantize_bnb_linears(base_model)
    merged = PeftModel.from_pretrained(base_model, adapter).merge_and_unload()
    return merged.eval(), tokenizer, task, {"adapter": adapter, "base_quantization": qlora}


def require_adapter_run(path: str) -> str:
    """The adapter folder of a run directory (or adapter folder) to merge; a clear error for anything else."""
    from bittune.model import resolve_inference_source

    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"{path} is not a directory", hint="pass a bittune run directory (or an adapter folder)")
    if (root / "run_config.yaml").is_file() and (root / "model" / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is a full fine-tuning run: its model/ has no adapter to merge",
            hint=f"use it as it is, or shrink it with `bittune quantize {path} --bits 4`",
        )
    _, adapter, _ = resolve_inference_source(path)
    if adapter is None:
        raise ModelLoadError(
            f"{path} has no LoRA adapter to merge",
            hint="pass a LoRA/QLoRA run directory (with adapter/) or an adapter folder",
        )
    return adapter
