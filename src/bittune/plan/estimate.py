"""``estimate``: peak memory and time per step of a run, from its config, the model's config.json and, when given,
the data's own rows (:mod:`bittune.plan.workload`).

Memory is the sum of named components (runtime, weights, trainable state, activations, logits, and on CPU the
allocator's retained heap); time is matmul FLOPs over a measured matmul rate plus memory-bound work over a measured
bandwidth. Constants that come from measurement say where they were measured.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bittune.errors import BittuneError
from bittune.plan.activations import ActivationSpec, activation_bytes, layer_bytes_per_token, logits_bytes
from bittune.plan.params import (
    Trainable,
    lora_targets,
    optimizer_state_bytes,
    trainable_tensors,
    weight_bytes_by_dtype,
)
from bittune.plan.report import MB, Component, PlanReport
from bittune.plan.shapes import ModelShape, load_model_config, model_shape

if TYPE_CHECKING:
    from bittune.config import RunConfig
    from bittune.plan.workload import Workload

# RSS of a training process before its weights are touched: Python + torch + transformers + peft + accelerate
# + bittune + tokenizer + tokenized data. Measured on this project's CPU box (torch 2.13, transformers 5.23):
# 474 MiB at the end of load_model on SmolLM2's folder (362 anonymous + 112 file-backed: shared libraries).
CPU_RUNTIME_MB = 475.0
# Importing bitsandbytes and its CPU library adds this much (same machine).
CPU_BNB_MB = 40.0
# glibc malloc keeps freed blocks under its dynamic mmap threshold (which grows up to 32 MiB) in the heap, so on
# CPU the peak RSS sits well above the live bytes: one step's freed activations (and k-bit dequantization
# temporaries) leave holes the next step does not fully reuse. The retained part is modelled as a fraction of
# the bytes a step allocates for its blocks' activations (the same with checkpointing: the no-grad forward and
# the recompute allocate them too). Fractions fitted on SmolLM2-135M runs of 6 steps, batch 4 x 256 packed
# tokens, this project's CPU box (bench/plan_vs_measured.py); by run kind:
CPU_HEAP_RETENTION = {
    "checkpointing": 0.72,  # LoRA, QLoRA NF4 and full with checkpointing: 0.69-0.77 (full 0.57)
    "full": 0.5,  # full fine-tuning: gradients and optimizer state reuse part of the holes (measured 0.47)
    "4bit": 1.5,  # 4-bit base, dequantized weights interleave with activations: 1.67-1.72; 1.31 at 8 x 128
    "8bit": 1.0,  # 8-bit base, bimodal between runs: 0.34-0.4 or 1.5-1.6 (4 x 256 and 8 x 128); the middle
    "lora": 1.2,  # float32 LoRA: 1.10-1.36 between runs; 1.2 at 4 x 128
}
# With a fixed threshold (MALLOC_MMAP_THRESHOLD_ set, or mallopt) freed blocks go back to the kernel and only a
# small slack remains: measured 0.15 of the block activations (LoRA and QLoRA NF4, same runs).
CPU_HEAP_RETENTION_FIXED = 0.15
# A CUDA context with cuBLAS/cuDNN loaded, and the caching allocator's typical slack over what it hands out.
CUDA_CONTEXT_MB = 600.0
CUDA_ALLOCATOR_SLACK = 0.10
# Time per step = matmul FLOPs / (probe rate x efficiency) + memory-bound traffic / probe bandwidth + k-bit
# dequantization + optimizer. The probe multiplies matrices of the model's MLP shape at the step's token count.
# CPU: uncontended SmolLM2-135M steps (batch 4 x 256: full, LoRA, LoRA + checkpointing, QLoRA) ran 170-196
# GFLOP/s with everything included, while the probe (1024 x 576 @ 576 x 1536, idle machine) measured ~320.
# GPU: the H100 runs of bench/gpu_qlora.py (1.1B Llama, 8 x 512, BENCHMARKS.md) give 0.3 for full fine-tuning
# against a 790 TFLOP/s rate; LoRA and k-bit runs there were ~2x slower than this model predicts (adapter and
# dequantization kernels), so refit from `bench/plan_vs_measured.py --device cuda`.
MATMUL_EFFICIENCY = {"cpu": 0.6, "cuda": 0.3}
# Elementwise traffic in units of the blocks' saved activations (written in forward, read with their gradient
# in backward) and of one float32 logits copy (the loss's copies and softmax), over the measured bandwidth.
ACT_PASSES = 1.0
LOGIT_PASSES = 2.0
# AdamW reads param, grad, two moments and writes three of them, in place (no fresh pages, unlike the probe):
# ~3 probe-bandwidth passes over the trainable bytes (full fine-tuning of SmolLM2 on CPU: ~0.2 s per step).
OPTIM_PASSES = 3.0
# Planning for a GPU that is not here: HBM-class bandwidth for the memory-bound part.
NOMINAL_GPU_BANDWIDTH = 2e12


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}.get(name, 4)


def _resolve(cfg: RunConfig, device: str | None) -> tuple[str, str, str, bool]:
    """(device kind, weights dtype, compute dtype, autocast) as the recipe would pick them."""
    kind = device or cfg.train.device
    if kind == "auto":
        import torch

        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind not in ("cpu", "cuda"):
        raise BittuneError(f"unknown device '{kind}' for plan", hint="use --device cpu or --device cuda")
    gpu = kind == "cuda"
    full = cfg.method in ("full", "qat")  # QAT trains every weight
    if cfg.model.dtype != "auto":
        weights = cfg.model.dtype
    else:
        weights = "bfloat16" if gpu and not full else "float32"
    mp = cfg.train.mixed_precision
    autocast = gpu and mp != "no"
    compute = "bfloat16" if autocast else weights
    if cfg.quant is not None and cfg.quant.compute_dtype != "auto":
        compute = cfg.quant.compute_dtype
    elif cfg.quant is not None:
        compute = "bfloat16" if gpu else "float32"
    return kind, weights, compute, autocast


def _checkpoint_bytes(path: str, shape: ModelShape, config: object) -> int:
    """Size of the checkpoint on disk (its safetensors files), or params x its dtype from config.json."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        files = [f for ext in ("*.safetensors", "*.bin") for f in folder.glob(ext)]
        if files:
            return sum(f.stat().st_size for f in files)
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return shape.total_params * _dtype_bytes(name.removeprefix("torch."))


@dataclass(frozen=True)
class _Run:
    """What the recipe would pick for ``cfg`` on a device, resolved once."""

    kind: str
    weights_dtype: str
    act_bytes: int
    autocast: bool
    full: bool
    bits: int | None
    tokens: int  # per micro-batch (the step's compute is grad_accum of these)
    spec: ActivationSpec
    pass_tokens: int  # per forward pass: what is alive at once (a micro-batch, or the pooled pass of the budget)
    workload: Workload | None = None  # the data's own tokens per step (None: every row at max_length)


def estimate(
    cfg: RunConfig,
    *,
    device: str | None = None,
    matmul_flops: float | None = None,
    data: Any = None,
) -> PlanReport:
    """Estimate peak memory and time per optimizer step of ``cfg``, loading no weights.

    Args:
        cfg: A validated run config.
        device: ``cpu`` or ``cuda``; default: ``train.device`` (``auto``: cuda when visible).
        matmul_flops: Matmul rate in FLOP/s to plan with; default: measured here (float32 on CPU, bf16 on a
            GPU) when the device is present, else the time is not estimated.
        data: The run's tokenized rows (``bittune.data.PreparedData``, as preflight prepares them): the time then
            follows the mean step of their first epoch and the activations its largest pass, counted as the
            training step runs them (:func:`bittune.plan.workload.replay_epoch`). None: every row is
            ``data.max_length`` tokens (the worst case).

    Returns:
        A :class:`PlanReport`; ``peak_mb`` is comparable with ``summary.json``'s ``peak_rss_mb`` (CPU) or
        ``peak_cuda_allocated_mb`` (GPU).
    """
    from bittune.model import model_source
    from bittune.plan import device as probe

    kind, weights_dtype, compute_dtype, autocast = _resolve(cfg, device)
    mcfg = cfg.model
    source = model_source(mcfg.path)  # a .gguf file stands for its converted folder
    config = load_model_config(source, trust_remote_code=mcfg.trust_remote_code, revision=mcfg.revision)
    task = cfg.model.task
    labels = len(data.label_names) if data is not None and data.label_names else cfg.model.num_labels
    shape = model_shape(config, task=task, num_labels=labels or 2)
    notes = _caveats(cfg, shape, labels_known=bool(labels))
    full, bits = cfg.lora is None, (cfg.quant.bits if cfg.quant is not None else None)  # full / QAT: no adapter
    trainable, rank_per_layer = _trainable(cfg, shape, full)
    wbytes = _dtype_bytes(weights_dtype)
    act_bytes = _dtype_bytes(compute_dtype) if (autocast or bits) else wbytes
    batch, seq = cfg.train.batch_size, cfg.data.max_length
    spec = ActivationSpec(
        act_bytes=act_bytes,
        resid_bytes=wbytes,
        full=full,
        lora_rank_per_layer=rank_per_layer,
        # Packed rows always carry a block-diagonal mask; padded batches carry one whenever a row is padded.
        mask=cfg.data.packing or batch > 1,
        seq=seq,
        checkpointing=cfg.train.gradient_checkpointing,
    )
    workload = _workload(cfg, data, kind, shape) if data is not None else None
    pass_tokens = workload.max_pass_tokens if workload is not None else _pass_rows(cfg, kind) * seq
    run = _Run(kind, weights_dtype, act_bytes, autocast, full, bits, batch * seq, spec, pass_tokens, workload)
    by_dtype = weight_bytes_by_dtype(
        shape,
        dtype_bytes=wbytes,
        dtype_name=weights_dtype,
        trainable=trainable,
        bits=bits,
        double_quant=cfg.quant.double_quant if cfg.quant is not None else False,
    )
    comps = _memory(cfg, run, shape, trainable, sum(by_dtype.values()), config)
    phases = {
        "forward/backward": sum(c.mb for c in comps if c.in_backward),
        "optimizer step": sum(c.mb for c in comps if c.in_step),
    }
    peak = max(phases.values())
    if kind == "cuda":
        need = peak * (1 + CUDA_ALLOCATOR_SLACK) + CUDA_CONTEXT_MB
    else:
        need = peak - sum(c.mb for c in comps if c.name == "checkpoint pages")

    info = probe.device_info(kind)
    seconds, breakdown, rate = _time(cfg, run, shape, trainable, probe, info, matmul_flops, notes)
    if info.available_mb is not None and need > info.available_mb:
        notes.append(f"needs more than is free now ({info.available_mb:,.0f} MiB of {info.total_mb:,.0f} MiB)")
    tokens, keys, _ = _step_work(cfg, run)
    flops = _step_flops(shape, tokens=tokens, keys=keys, full=full, lora_params=trainable.adapters, spec=spec)
    return PlanReport(
        model=cfg.model.path,
        method=cfg.method + (f" ({bits}-bit {cfg.quant.method if bits == 4 else 'int8'})" if bits else ""),
        device=kind,
        device_name=info.name,
        shape_source=shape.source,
        batch_size=batch,
        seq_len=seq,
        grad_accum=cfg.train.grad_accum,
        total_parameters=shape.total_params + (0 if full else trainable.adapters + trainable.head_copy),
        trainable_parameters=trainable.count,
        weights_mb_by_dtype={k: round(v / MB, 2) for k, v in by_dtype.items()},
        components=[replace(c, mb=round(c.mb, 1)) for c in comps],
        phase_peaks_mb={k: round(v, 1) for k, v in phases.items()},
        peak_mb=round(peak, 1),
        need_mb=round(need, 1),
        available_mb=None if info.available_mb is None else round(info.available_mb, 1),
        total_mb=None if info.total_mb is None else round(info.total_mb, 1),
        fits=None if info.available_mb is None else need <= info.available_mb,
        flops_per_step=flops,
        matmul_flops=rate,
        seconds_per_step=seconds,
        time_breakdown={k: round(v, 3) for k, v in breakdown.items()},
        notes=notes,
        workload=None if workload is None else {k: round(float(v), 2) for k, v in asdict(workload).items()},
    )


def _caveats(cfg: RunConfig, shape: ModelShape, *, labels_known: bool) -> list[str]:
    """What the estimate of ``cfg`` leaves out or guesses, in a line each."""
    notes: list[str] = []
    if shape.source == "meta":
        notes.append(f"'{shape.model_type}' is counted on a meta-device model; its activation formula is generic")
    if cfg.model.task == "classification" and not labels_known:
        notes.append("classification head sized for 2 labels (the real count comes from the data)")
    if cfg.qat is not None:
        notes.append("QAT's fake-quantized weight copies (one per linear while it runs) are not counted")
    if cfg.distill is not None:
        notes.append("the distillation teacher (its weights and logits) is not counted")
    return notes


def _trainable(cfg: RunConfig, shape: ModelShape, full: bool) -> tuple[Trainable, int]:
    """The trained tensors, and the LoRA rank summed over one block's adapted linears (0 for full fine-tuning)."""
    from bittune.config import LoraConfig

    lora = cfg.lora or LoraConfig()  # (unused for full fine-tuning)
    trainable = trainable_tensors(
        shape,
        method="full" if full else cfg.method,
        task=cfg.model.task,
        r=lora.r,
        target_modules=lora.target_modules,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save,
    )
    if full:
        return trainable, 0
    in_blocks = {lin.name for lin in shape.layer_linears}
    targets = lora_targets(shape, lora.target_modules)
    return trainable, lora.r * sum(lin.name in in_blocks for lin in targets) // max(shape.layers, 1)


def _memory(cfg: RunConfig, run: _Run, shape: ModelShape, trainable: Trainable, weights: int, config: object) -> list:
    """The memory components, each marked with the phase(s) of the step it is alive in.

    Two moments compete for the peak: the start of backward (activations and logits all alive, gradients not
    yet: the recipe frees them after every optimizer step) and the optimizer step (all gradients, the moments,
    the update's temporaries). With grad_accum > 1 the gradients of earlier micro-batches live through both.
    """
    gpu, full, bits, spec = run.kind == "cuda", run.full, run.bits, run.spec
    param_bytes = _dtype_bytes(run.weights_dtype) if full else 4  # trained: the weights, or float32 adapters
    grads = trainable.count * param_bytes
    optim = optimizer_state_bytes(trainable, optimizer=cfg.train.optimizer, param_bytes=param_bytes)
    paged = cfg.train.optimizer.startswith("paged_")
    if cfg.train.optimizer == "adamw" and gpu:
        step_tmp = trainable.count * param_bytes  # foreach AdamW: one temporary per parameter (sqrt of 2nd moment)
    else:
        step_tmp = max(trainable.tensors, default=0) * param_bytes  # per-tensor loop: one tensor at a time
    acts = activation_bytes(shape, spec, run.pass_tokens)
    per_token = layer_bytes_per_token(shape, spec)
    logits = _logits(cfg, run, shape)

    comps: list[Component] = []
    if not gpu:
        runtime = CPU_RUNTIME_MB + (CPU_BNB_MB if bits or cfg.train.optimizer != "adamw" else 0)
        comps.append(Component("runtime", runtime, "Python + torch + transformers + peft + data (measured)"))
    comps.append(Component("weights", weights / MB, _weights_note(run.weights_dtype, bits)))
    if bits and not gpu:
        from bittune.model import model_source

        pages = _checkpoint_bytes(model_source(cfg.model.path), shape, config)
        comps.append(Component("checkpoint pages", pages / MB, "the file it was quantized from stays mapped"))
    accumulating = cfg.train.grad_accum > 1
    comps.append(
        Component(
            "gradients",
            grads / MB,
            f"{trainable.count:,} trainable x {param_bytes} B",
            in_backward=accumulating,
        )
    )
    note = cfg.train.optimizer + (" (paged: CUDA unified memory, outside torch's count)" if paged and gpu else "")
    comps.append(Component("optimizer state", 0.0 if paged and gpu else optim / MB, note))
    comps.append(Component("optimizer step temporaries", step_tmp / MB, "update buffers", in_backward=False))
    if spec.checkpointing:
        act_note = f"block inputs + one block recomputed ({per_token:,.0f} B/token/block)"
    else:
        act_note = f"{per_token:,.0f} B/token/block x {shape.layers} blocks x {run.pass_tokens} tokens"
    comps.append(Component("activations", sum(acts.values()) / MB, act_note, in_step=False))
    if run.autocast and full:
        copies = 2 * (shape.linear_params + shape.head_params)
        comps.append(Component("autocast weight copies", copies / MB, "bf16 casts kept for backward", in_step=False))
    if logits:
        note = "logits + 3 float32 loss copies" if cfg.distill else "one chunk of label positions' logits + softmax"
        comps.append(Component("logits + loss", logits / MB, note, in_step=False))
    if not gpu:
        rho = _heap_retention(full=full, bits=bits, checkpointing=spec.checkpointing)
        churn = shape.layers * per_token * run.pass_tokens
        comps.append(Component("retained heap", rho * churn / MB, f"malloc keeps freed blocks ({rho:g} x block acts)"))
    return comps


def _step_work(cfg: RunConfig, run: _Run) -> tuple[float, float, float]:
    """(tokens through the body, keys each one's query meets, forward calls) per optimizer step: the data's own
    mean step when it was read, else ``grad_accum`` micro-batches of ``batch x max_length``."""
    w = run.workload
    if w is None:
        return run.tokens * cfg.train.grad_accum, run.spec.seq, cfg.train.grad_accum
    return w.computed_tokens, w.keys_per_token, w.forwards


def _time(cfg, run: _Run, shape: ModelShape, trainable: Trainable, probe, info, matmul_flops, notes) -> tuple:
    """(seconds per optimizer step, breakdown, matmul rate); seconds is None without a rate."""
    present = info.total_mb is not None
    # The model's MLP product at one pass's token count (capped: larger products only run faster).
    m = min(run.pass_tokens if run.workload is not None else run.tokens, 4096)
    k, n = shape.hidden or 2048, shape.intermediate or 4 * (shape.hidden or 512)
    rate = matmul_flops or (probe.matmul_flops(run.kind, m, k, n) if present else None)
    if not rate:
        notes.append(f"no {run.kind} device here: pass matmul_flops (--matmul-tflops) to estimate time")
        return None, {}, None
    spec = run.spec
    bw = probe.memory_bandwidth(run.kind) if present else NOMINAL_GPU_BANDWIDTH
    tokens, keys, forwards = _step_work(cfg, run)
    flops = _step_flops(shape, tokens=tokens, keys=keys, full=run.full, lora_params=trainable.adapters, spec=spec)
    # Checkpointing writes every block's activations twice (no-grad forward, then the recompute).
    touched = shape.layers * layer_bytes_per_token(shape, spec) * tokens * (2 if spec.checkpointing else 1)
    vocab = shape.head.out_features if shape.head is not None and cfg.model.task == "causal-lm" else 0
    logits_copy = tokens * vocab * 4
    parts = {
        "matmul": flops / (rate * MATMUL_EFFICIENCY[run.kind]),
        "memory-bound": (ACT_PASSES * touched + LOGIT_PASSES * logits_copy) / bw,
    }
    if run.bits:
        per_weight = probe.kbit_seconds_per_weight(run.kind, run.bits) if present else 0.0
        calls = 3 if spec.checkpointing else 2  # forward, backward (input gradient), recompute
        parts["k-bit dequant"] = per_weight * shape.linear_params * calls * forwards
    param_bytes = _dtype_bytes(run.weights_dtype) if run.full else 4
    parts["optimizer"] = OPTIM_PASSES * trainable.count * param_bytes / bw
    if run.kind == "cpu":
        notes.append("CPU step times swing with other load on the machine; the rates used are best-of-N")
    return sum(parts.values()), parts, rate


def _logits(cfg: RunConfig, run: _Run, shape: ModelShape) -> float:
    classification = cfg.model.task != "causal-lm"
    # One process trains with the head at label positions (recipes.finetune.setup_loss); distillation needs the
    # student's full logits.
    at_targets = cfg.distill is None
    w = run.workload
    return logits_bytes(
        shape,
        tokens=w.max_pass_targets if w is not None and at_targets else run.pass_tokens,
        act_bytes=run.act_bytes,
        classification=classification,
        head_at_targets=at_targets,
    )


def _weights_note(dtype: str, bits: int | None) -> str:
    if bits == 4:
        return f"Linear layers 4-bit + block scales; embeddings, norms, head {dtype}"
    if bits == 8:
        return f"Linear layers int8 + row scales; embeddings, norms, head {dtype}"
    return f"all {dtype}" if dtype == "float32" else f"all {dtype}; LoRA adapters float32"


def _pass_rows(cfg: RunConfig, kind: str) -> int:
    """Rows of ``max_length`` tokens in one forward pass: the micro-batch, or as many rows as the pass budget holds
    (``bittune.data.collate.step_passes``: padded rows pooled over the step's micro-batches, packed rows within
    their micro-batch; causal LMs only)."""
    from bittune.data.collate import pass_budget

    batch = cfg.train.batch_size
    budget = pass_budget(cfg.train.max_tokens_per_pass, kind)
    if budget is None or cfg.model.task == "classification":
        return batch
    pooled = batch if cfg.data.packing else batch * cfg.train.grad_accum
    return max(1, min(pooled, budget // cfg.data.max_length))


def _workload(cfg: RunConfig, data: Any, kind: str, shape: ModelShape) -> Workload:
    """The data's own tokens per step, batched as one process of this run would batch them."""
    from bittune.data import make_collator
    from bittune.data.collate import pass_budget
    from bittune.plan.workload import replay_epoch
    from bittune.training.shared_prefix import prefix_sharing

    t, causal = cfg.train, cfg.model.task == "causal-lm"
    return replay_epoch(
        data.train,
        make_collator(cfg.model.task, 0, data.packed),  # the pad id changes no count: the masks say what is padding
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        seed=t.seed,
        max_tokens_per_pass=pass_budget(t.max_tokens_per_pass, kind),
        # The prefix runs once on the head-at-targets loss only (distillation keeps the full logits).
        share_prefix=causal and cfg.distill is None and prefix_sharing(t.shared_prefix, kind),
        hidden=shape.hidden or 0,
        inner=shape.intermediate,
        max_steps=t.max_steps,
    )


def _heap_retention(*, full: bool, bits: int | None, checkpointing: bool) -> float:
    """Fraction of a step's block activations that the CPU allocator keeps after freeing them."""
    import sys

    if not sys.platform.startswith("linux"):
        return CPU_HEAP_RETENTION_FIXED  # other allocators return freed memory more eagerly; not measured
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return CPU_HEAP_RETENTION_FIXED
    if checkpointing:
        return CPU_HEAP_RETENTION["checkpointing"]
    if full:
        return CPU_HEAP_RETENTION["full"]
    if bits:
        return CPU_HEAP_RETENTION["4bit" if bits == 4 else "8bit"]
    return CPU_HEAP_RETENTION["lora"]


def _step_flops(
    shape: ModelShape, *, tokens: float, keys: float, full: bool, lora_params: int, spec: ActivationSpec
) -> float:
    """Matmul FLOPs of ``tokens`` tokens through the model: forward, backward, and the checkpointing recompute.

    Forward is 2 FLOPs per weight per token. Backward computes input gradients (2 per weight per token) for every
    layer, and weight gradients (2 more) only for trained weights, so frozen bases cost ~4N per token and full
    fine-tuning ~6N. Attention adds 4 * keys * (heads * head_dim) per token per layer forward (QK^T and AV over
    the ``keys`` positions of its pass: a mask skips nothing), twice that backward.
    """
    block = shape.layers * sum(lin.in_features * lin.out_features for lin in shape.layer_linears)
    block += sum(lin.in_features * lin.out_features for lin in shape.other_linears)
    head = shape.head.in_features * shape.head.out_features if shape.head is not None else 0
    attn = 4 * keys * shape.heads * shape.head_dim * shape.layers
    fwd = 2 * tokens * (block + head + lora_params) + attn * tokens
    if full:
        bwd = 2 * fwd
    else:
        bwd = 2 * tokens * (block + head) + 4 * tokens * lora_params + 2 * attn * tokens
    recompute = (2 * tokens * (block + lora_params) + attn * tokens) if spec.checkpointing else 0
    return float(fwd + bwd + recompute)
