"""The speed levers a LoRA run turns on after its model is built (issue 14; measured in BENCHMARKS.md).

Each lever keeps the loss curve (equivalence tests in tests/test_perf_equivalence.py and tests/test_train_step.py):

* bf16 compute, only where ``train.mixed_precision`` resolved to ``bf16`` on CPU (``auto`` + a start-up matmul
  measurement, :func:`bittune.model.resolve_mixed_precision`): the frozen base is stored in bf16 (no per-forward
  cast; LoRA weights, their gradients and AdamW state stay float32) and attention is computed in float32 inside
  the autocast region (PyTorch's CPU flash-attention is ~10x slower in bf16 on short rows);
* fused LoRA linears (:mod:`bittune.training.fused_lora`): no dropped copy of each input kept for backward, cheap
  dropout masks; on CPU in float32 and bf16 alike, and over QLoRA's bitsandbytes bases (their own forward and
  backward compute the base part; the adapter is one node), and on a GPU over float bases, where they also drop
  PEFT's cast of every adapted linear's input to float32 and back (the sum there stays in the compute dtype, as
  PEFT's is; ``bench/gpu_lora_step.py``).

The output head only at label positions is the loss's lever (:func:`bittune.training.loss.TaskLoss`,
``head_at_targets``), and thread / allocator settings are the process's (:mod:`bittune.threads`,
:func:`bittune.training.memory.release_free_memory`).
"""

from __future__ import annotations

from typing import Any


def apply_speedups(model: Any, *, device: Any, mixed_precision: str, lora: bool) -> dict[str, Any]:
    """Turn on the levers that pay for this run, in place; returns what was done (for the run's first lines).

    Nothing changes without LoRA (full fine-tuning stays plain); on a GPU only the fused LoRA linears apply.
    """
    import torch

    from bittune.training.fused_lora import fuse_lora
    from bittune.training.precision import store_frozen_weights, use_fp32_attention

    if not lora:
        return {}
    if device.type == "cuda":
        return {"fused_lora": fuse_lora(model, fast_mask=True, float32_sum=False)}
    if device.type != "cpu":
        return {}
    done: dict[str, Any] = {}
    if mixed_precision == "bf16":
        done["frozen_bf16"] = store_frozen_weights(model, torch.bfloat16)
        done["fp32_attention"] = use_fp32_attention(model)
    done["fused_lora"] = fuse_lora(model, fast_mask=True, kbit=True)  # QLoRA too: float32 compute on CPU
    return done


def compute_choice(preference: str, device: Any, mixed_precision: str) -> dict[str, Any]:
    """How the run computes and why, for its first lines and ``summary.json``.

    ``{"mixed_precision": "bf16"|"no"|..., "chosen_by": "config"|"measured"|"forced"|"device",
    "cpu_matmul_gflops": {"float32": .., "bfloat16": ..}}`` (the rates only when a CPU measurement was made).
    """
    import os

    from bittune.plan.device import FORCE_CPU_DTYPE_ENV, cpu_matmul_rates

    out: dict[str, Any] = {"mixed_precision": mixed_precision}
    if preference != "auto":
        out["chosen_by"] = "config"
    elif device.type != "cpu":
        out["chosen_by"] = "device"
    elif os.environ.get(FORCE_CPU_DTYPE_ENV) in ("float32", "bfloat16"):
        out["chosen_by"] = "forced"
    else:
        out["chosen_by"] = "measured"
        if cpu_matmul_rates.cache_info().currsize:  # measured by preflight for a bf16 candidate: report it
            out["cpu_matmul_gflops"] = {k: round(v / 1e9, 1) for k, v in cpu_matmul_rates().items()}
    return out


def describe(choice: dict[str, Any], done: dict[str, Any]) -> str:
    """One line for the run's start: the compute dtype, why, and the levers on."""
    mp = choice["mixed_precision"]
    text = "compute: " + ("bf16 autocast" if mp == "bf16" else "fp16 autocast" if mp == "fp16" else "float32")
    rates = choice.get("cpu_matmul_gflops")
    why = choice["chosen_by"]
    if rates:
        why += f": bf16 matmul {rates['bfloat16']:.0f} vs fp32 {rates['float32']:.0f} GFLOP/s"
    text += f" ({why})"
    levers = [f"passes of <= {v} tokens" if k == "tokens_per_pass" else k.replace("_", " ")
              for k, v in done.items() if v]  # fmt: skip
    return text + (f"; {', '.join(levers)}" if levers else "")
