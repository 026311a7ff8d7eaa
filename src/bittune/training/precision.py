"""Compute precision on CPU: bf16 where this CPU runs it fast, and only where it is fast.

Measured on an Intel Xeon with AMX (bench/results/step_levers_paired_*.md): under bf16 autocast the linears run
~2.4x faster, but PyTorch's CPU flash-attention kernel runs ~10x *slower* in bf16 than in float32 on short
sequences, and autocast re-casts every frozen float32 weight on every forward. So the bf16 recipe here is:

* ``cpu_autocast_dtype()``: bf16 only if a measured bf16 matmul beats float32 (``plan.device.fastest_cpu_dtype``);
* ``store_frozen_linears(model, dtype)``: the frozen base linears stored in bf16 (half the memory, no per-forward
  cast); embeddings, norms, the trainable (LoRA) weights and the optimizer stay float32, so the residual stream and
  the updates keep float32 precision;
* ``use_fp32_attention(model)``: scaled-dot-product attention computed in float32 (inputs up-cast, output cast
  back) inside the bf16 autocast region.
"""

from __future__ import annotations

from typing import Any

import torch

FP32_SDPA = "bittune_sdpa_fp32"


def cpu_autocast_dtype() -> torch.dtype | None:
    """The autocast dtype for training on this CPU: ``torch.bfloat16`` where it was measured faster, else None."""
    from bittune.plan.device import fastest_cpu_dtype

    dtype = fastest_cpu_dtype()
    return None if dtype == torch.float32 else dtype


def store_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the weights (and biases) of frozen ``nn.Linear`` layers in ``dtype``; returns how many were cast.

    Only for use under autocast to that dtype (the layers then compute exactly as autocast would have, without
    casting the weight on every call). Embedding tables (even when tied to the output head), norms and trainable
    parameters are left in their dtype.
    """
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.requires_grad or id(module.weight) in tied:
            continue
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None and not module.bias.requires_grad:
            module.bias.data = module.bias.data.to(dtype)
        n += 1
    return n


def store_frozen_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen floating-point parameter in ``dtype`` (trainable ones untouched); returns how many.

    The in-place equivalent of loading the base in ``dtype`` and attaching LoRA (PEFT keeps adapters float32):
    the GPU recipe's frozen-base policy. Unlike :func:`store_frozen_linears` the embeddings and norms are cast too,
    so the residual stream runs in ``dtype`` and no linear input needs a cast under autocast.

    Except ``torch.nn.LayerNorm`` (BERT's norms; Llama's RMSNorm is its own module, cast like the rest): PyTorch's
    CPU ``layer_norm`` takes a 16-bit input with float32 parameters but not a float32 input with 16-bit ones, and
    a fused LoRA linear's output is float32 (:mod:`bittune.training.fused_lora`), so BERT's
    ``LayerNorm(dense(x) + residual)`` needs float32 parameters.
    """
    keep = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype and id(p) not in keep:
            p.data = p.data.to(dtype)
            n += 1
    return n


def _sdpa_fp32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), *args, **kwargs)
    return out.to(dtype), weights


def use_fp32_attention(model: Any) -> bool:
    """Make ``model`` (a transformers model using ``sdpa``) compute attention in float32 under autocast.

    Registers the attention function once per process (transformers' ``AttentionInterface``, with sdpa's mask) and
    switches the model to it. Returns False, changing nothing, for models on another attention implementation.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(FP32_SDPA, _sdpa_fp32)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FP32_SDPA, sdpa_mask)
    base.set_attn_implementation(FP32_SDPA)
    return True
