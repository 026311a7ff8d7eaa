"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from bittune.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def check_optimizer_device(name: str, device: torch.device | None) -> None:
    """Paged optimizers page state out of GPU memory: refuse them on CPU (bitsandbytes would quietly not page)."""
    if name.startswith("paged_") and (device is None or device.type != "cuda"):
        raise ConfigError(
            f"train.optimizer {name} pages optimizer state out of GPU memory, and this run is on the CPU",
            hint="use train.optimizer adamw_8bit (small state, works on CPU) or adamw",
        )


def build_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    name: str = "adamw",
    device: torch.device | None = None,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norm weights get no weight decay.

    Args:
        name: ``adamw`` (torch), ``adamw_8bit`` (bitsandbytes; 8-bit optimizer state, 4x smaller), or
            ``paged_adamw_8bit`` / ``paged_adamw_32bit`` (bitsandbytes; state in CUDA unified memory that is
            paged out to CPU RAM under GPU memory pressure instead of failing with OOM).
        device: Where training runs. Paged optimizers are refused on CPU: there is no GPU memory to page from,
            and bitsandbytes would quietly run the unpaged one.
    """
    decay, no_decay = [], []
    for param_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 1-D tensors are biases and norm scales: decaying them towards zero only hurts.
        (no_decay if p.ndim < 2 or "norm" in param_name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    check_optimizer_device(name, device)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    return cls(groups, lr=lr, betas=betas, eps=eps)


def lr_lambda(kind: str, warmup: int, total: int) -> Any:
    """Multiplier on the base lr at each step: linear warmup, then linear/cosine decay to zero (or constant)."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR; its state_dict is plain numbers, so it checkpoints as JSON."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup_steps, total_steps))
