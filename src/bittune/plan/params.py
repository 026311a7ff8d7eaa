"""Parameter bookkeeping for a planned run: what is trainable, and how many bytes weights and optimizer state take.

Everything here is arithmetic on a :class:`~bittune.plan.shapes.ModelShape`; nothing is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bittune.plan.shapes import Linear, ModelShape

# bitsandbytes 4-bit: weights packed two per byte, one absmax scale per block of 64 weights (the default
# bnb_4bit blocksize). Double quant stores each absmax as one uint8 and adds one float32 per 256 absmax values,
# plus a 256-entry float32 code book per layer; plain 4-bit keeps float32 absmax. Each layer also keeps its
# 16-entry NF4/FP4 code book. Checked against ``weights_footprint`` of a loaded model in tests/test_plan.py.
BLOCK_4BIT = 64
NESTED_BLOCK = 256
# bitsandbytes 8-bit optimizers quantize state blockwise (256 values per float32 absmax) and keep tensors with
# fewer than 4096 elements in 32-bit state (``min_8bit_size``).
OPTIM_8BIT_BLOCK = 256
OPTIM_8BIT_MIN_SIZE = 4096


@dataclass(frozen=True)
class Trainable:
    """The trainable tensors of a run, as element counts (one entry per tensor)."""

    tensors: list[int]
    adapters: int  # LoRA parameters (0 for full fine-tuning)
    head_copy: int  # a trainable copy of the classifier head (PEFT modules_to_save), added to the total

    @property
    def count(self) -> int:
        return sum(self.tensors)


def lora_targets(shape: ModelShape, target_modules: list[str] | str) -> list[Linear]:
    """The Linear layers LoRA wraps, one entry per layer instance.

    ``all-linear`` is every Linear but the output head (as PEFT does); a list matches module names exactly or by
    their last dotted parts (``q_proj`` matches ``self_attn.q_proj``), as PEFT's suffix matching does.
    """
    candidates = shape.all_linears()
    if target_modules == "all-linear":
        return candidates

    def hit(name: str) -> bool:
        return any(name == t or name.endswith("." + t) for t in target_modules)

    return [lin for lin in candidates if hit(lin.name)]


def trainable_tensors(
    shape: ModelShape,
    *,
    method: str,
    task: str,
    r: int,
    target_modules: list[str] | str,
    bias: str = "none",
    modules_to_save: list[str] | None = None,
) -> Trainable:
    """Trainable tensors of a full or LoRA/QLoRA run (element counts, tensor by tensor).

    Full fine-tuning trains every parameter. LoRA trains ``r * (in + out)`` per wrapped Linear (A: r x in,
    B: out x r), plus biases when ``bias`` asks for them, plus a trainable copy of the head for classification
    (PEFT puts ``classifier``/``score`` in ``modules_to_save`` for sequence classification).
    """
    if method == "full":
        tensors = []
        for lin in shape.all_linears():
            tensors.append(lin.in_features * lin.out_features)
            if lin.bias:
                tensors.append(lin.out_features)
        if shape.head is not None and not shape.head_tied:
            tensors.append(shape.head.in_features * shape.head.out_features)
            if shape.head.bias:
                tensors.append(shape.head.out_features)
        # Embedding matrices and norms: their exact split into tensors only matters for 8-bit optimizer state,
        # where tensors under 4096 elements stay 32-bit; norms are (hidden,) vectors, so treat them as such.
        tensors.append(shape.embedding_params)
        n_small = max(1, shape.other_params // max(shape.hidden, 1))
        tensors.extend([shape.other_params // n_small] * n_small)
        return Trainable([t for t in tensors if t], adapters=0, head_copy=0)
    targets = lora_targets(shape, target_modules)
    tensors = []
    for lin in targets:
        tensors += [r * lin.in_features, lin.out_features * r]
    adapters = sum(tensors)
    if bias == "all":
        tensors += [lin.out_features for lin in shape.all_linears() if lin.bias]
    elif bias == "lora_only":
        tensors += [lin.out_features for lin in targets if lin.bias]
    head_copy = 0
    saved = set(modules_to_save or [])
    if shape.head is not None and (task == "classification" or shape.head.name in saved):
        head_copy = shape.head.params
        tensors += [shape.head.in_features * shape.head.out_features] + (
            [shape.head.out_features] if shape.head.bias else []
        )
    return Trainable(tensors, adapters=adapters, head_copy=head_copy)


def quantized_linear_bytes(lin: Linear, *, bits: int, double_quant: bool) -> tuple[int, int]:
    """(weight bytes, quant_state bytes) of one Linear stored by bitsandbytes (bias excluded)."""
    n = lin.in_features * lin.out_features
    if bits == 8:
        return n, 4 * lin.out_features  # int8 weight + one float32 scale per output row (SCB)
    blocks = math.ceil(n / BLOCK_4BIT)
    code = 16 * 4
    if double_quant:
        state = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + 4 + code
    else:
        state = 4 * blocks + code
    return math.ceil(n / 2), state


def weight_bytes_by_dtype(
    shape: ModelShape,
    *,
    dtype_bytes: int,
    dtype_name: str,
    trainable: Trainable,
    bits: int | None,
    double_quant: bool = True,
) -> dict[str, int]:
    """Bytes held by the model's weights, by storage dtype (the keys ``weights_footprint`` uses).

    Args:
        dtype_bytes: Bytes per element of the dense weights (4 for float32, 2 for bfloat16).
        dtype_name: Their dtype name (``float32``, ``bfloat16``).
        trainable: LoRA adapters and a trainable head copy are float32 (PEFT upcasts adapters).
        bits: 4 or 8 for a k-bit base, None for a dense one.
    """
    out: dict[str, int] = {}

    def add(key: str, n: int) -> None:
        if n:
            out[key] = out.get(key, 0) + n

    dense_params = shape.total_params
    if bits is not None:
        key = "int8" if bits == 8 else "uint8"
        for lin in shape.all_linears():
            w, state = quantized_linear_bytes(lin, bits=bits, double_quant=double_quant)
            add(key, w)
            add("quant_state", state)
        dense_params -= shape.linear_params - sum(lin.out_features for lin in shape.all_linears() if lin.bias)
    add(dtype_name, dense_params * dtype_bytes)
    add("float32", 4 * (trainable.adapters + trainable.head_copy))
    return out


def optimizer_state_bytes(trainable: Trainable, *, optimizer: str, param_bytes: int = 4) -> int:
    """AdamW state: two moments per trainable element; 8-bit optimizers store them in one byte each."""
    if optimizer in ("adamw", "paged_adamw_32bit"):
        return 2 * param_bytes * trainable.count
    total = 0
    for n in trainable.tensors:
        if n < OPTIM_8BIT_MIN_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / OPTIM_8BIT_BLOCK)
    return total
