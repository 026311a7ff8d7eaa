"""The fine-tuning recipe: full or LoRA, causal-LM SFT or sequence classification.

This file is the whole training loop, on purpose: read it top to bottom to know what a run does. It wires the
components (config, data, model, optimizer, checkpoints, metrics) and owns no clever abstraction of its own.

Flow: set seeds -> tokenize data -> [load the distillation teacher] -> load model (+ LoRA) [+ fake quantization]
-> AdamW + schedule -> [resume] -> loop over optimizer steps (each = ``grad_accum`` micro-batches whose losses are
normalised by the step's total target tokens; QAT sets the stage's bit-width first) -> eval / checkpoint / log
[per-QAT-stage eval and checkpoint] -> save the adapter or model atomically.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bittune.config import RunConfig, dump_config
from bittune.errors import BittuneError, ConfigError, NonFiniteError

FINAL_DIRS = ("adapter", "model")
MAX_SKIPS_IN_A_ROW = 10  # with on_nonfinite: skip, this many bad steps in a row means the run has diverged


@dataclass
class TrainResult:
    """What a finished (or deliberately stopped) run leaves behind."""

    run_dir: Path
    final_dir: Path | None
    final_metrics: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    stopped_early: bool = False


def epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each micro-batch in ``epoch``: a fresh permutation per epoch, derived from the seed alone.

    Deriving the order from (seed, epoch) instead of a running generator is what lets a resumed run rebuild the
    exact remaining batches from the position stored in the checkpoint.
    """
    import torch

    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def prepare_run_data(cfg: RunConfig, tokenizer: Any) -> Any:
    """Read and tokenize the data a run config names (``bittune.data.prepare_data`` with its settings)."""
    from bittune.data import prepare_data

    d = cfg.data
    return prepare_data(
        train=d.train,
        eval=d.eval,
        eval_fraction=d.eval_fraction,
        fmt=d.format,
        template=d.template,
        max_length=d.max_length,
        packing=d.packing,
        train_on_prompt=d.train_on_prompt,
        system_prompt=d.system_prompt,
        columns=d.columns,
        split=d.split,
        max_rows=d.max_rows,
        tokenizer=tokenizer,
        task=cfg.model.task,
        seed=cfg.train.seed,
    )


def _check_output_dir(run_dir: Path, resume: bool) -> None:
    if not run_dir.exists():
        return
    from bittune.training.runlock import RunLock

    RunLock(run_dir).check()  # another live job: refuse now, before loading anything
    if resume:
        return
    held = [n for n in ("checkpoints", *FINAL_DIRS, "metrics.jsonl") if (run_dir / n).exists()]
    if held:
        raise ConfigError(
            f"output_dir {run_dir} already holds a run ({', '.join(held)})",
            hint="pass --resume to continue it, or choose a new output_dir (bittune never overwrites a run)",
        )


def train(
    cfg: RunConfig, *, resume: bool = False, stop_after_step: int | None = None, progress: bool = True
) -> TrainResult:
    """Run the fine-tuning recipe described by ``cfg``.

    Args:
        cfg: A validated run config.
        resume: Continue from the latest complete checkpoint in ``cfg.output_dir``.
        stop_after_step: Stop after this optimizer step as if the process had been killed (no final save).
            Used to test that resuming reproduces an uninterrupted run bit for bit.
        progress: Show a progress bar / progress lines.

    Returns:
        Where the run's outputs are and its final metrics.
    """
    from bittune.training.runlock import RunLock

    lock = RunLock(Path(cfg.output_dir))
    try:
        return _train(cfg, lock, resume=resume, stop_after_step=stop_after_step, progress=progress)
    finally:
        lock.release()  # on errors too; a killed process leaves a lock that the next job finds stale


def _train(cfg: RunConfig, lock: Any, *, resume: bool, stop_after_step: int | None, progress: bool) -> TrainResult:
    """The body of :func:`train`; ``lock`` is taken once the run directory is created."""
    import torch
    from accelerate import Accelerator
    from transformers import set_seed

    from bittune.data import make_collator
    from bittune.model import (
        QUANT_FILE,
        attach_lora,
        bnb_config,
        count_parameters,
        load_model,
        load_tokenizer,
        prepare_kbit_base,
        resolve_compute_dtype,
        resolve_device,
        resolve_dtype,
        resolve_mixed_precision,
    )
    from bittune.quant.qat import QAT_FILE, BitSchedule, attach_fake_quant, qat_settings, remove_fake_quant
    from bittune.training.checkpoint import (
        atomic_dir,
        atomic_write_text,
        list_checkpoints,
        load_checkpoint,
        prune_checkpoints,
        save_checkpoint,
        sweep_stale_temp,
    )
    from bittune.training.distill import check_output_size, distillation_loss_sum, load_teacher, teacher_logits
    from bittune.training.evaluate import count_targets, evaluate, model_inputs
    from bittune.training.loss import loss_sum
    from bittune.training.memory import peak_memory_mb, reset_peak, weights_footprint
    from bittune.training.metrics import MetricsLog, truncate_after
    from bittune.training.optim import build_optimizer, build_scheduler, check_optimizer_device
    from bittune.training.progress import ProgressReporter

    tcfg, task, full = cfg.train, cfg.model.task, cfg.method in ("full", "qat")
    run_dir = Path(cfg.output_dir)
    _check_output_dir(run_dir, resume)
    if resume and any((run_dir / d).is_dir() for d in FINAL_DIRS):
        raise BittuneError(f"the run in {run_dir} has already finished", hint="start a new run with another output_dir")

    # --- device, precision, seeds -------------------------------------------------------------------------
    device = resolve_device(tcfg.device)
    check_optimizer_device(tcfg.optimizer, device)  # refuse before minutes of loading
    mixed_precision = resolve_mixed_precision(tcfg.mixed_precision, device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
    device = accelerator.device
    set_seed(tcfg.seed)

    # --- data ---------------------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    data = prepare_run_data(cfg, tokenizer)
    if not data.train:
        raise BittuneError(f"no training rows left in {cfg.data.train} after tokenization")
    label_names = data.label_names
    if task == "classification" and cfg.model.num_labels and cfg.model.num_labels != len(label_names or []):
        raise ConfigError(
            f"model.num_labels is {cfg.model.num_labels} but the data has {len(label_names or [])} labels "
            f"({', '.join(label_names or [])})",
            hint="remove model.num_labels (it is read from the data) or fix the labels",
        )
    collate = make_collator(task, tokenizer.pad_token_id, data.packed)

    # --- distillation teacher (frozen, eval mode; its tokenizer is checked before its weights are read) -----
    dcfg, teacher = cfg.distill, None
    if dcfg is not None:
        teacher = load_teacher(
            dcfg.teacher,
            student_tokenizer=tokenizer,
            task=task,
            label_names=label_names,
            device=device,
            trust_remote_code=cfg.model.trust_remote_code,
        )

    # --- model --------------------------------------------------------------------------------------------
    quantization, qcfg = None, cfg.quant
    if qcfg is not None:  # method: qlora -- the frozen base is stored in 4 or 8 bits by bitsandbytes
        quantization = bnb_config(
            bits=qcfg.bits,
            quant_type=qcfg.type,
            double_quant=qcfg.double_quant,
            compute_dtype=resolve_compute_dtype(qcfg.compute_dtype, device),
        )
    model = load_model(
        cfg.model.path,
        task=task,
        dtype=resolve_dtype(cfg.model.dtype, device, trainable_base=full),
        label_names=label_names,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
        attn_implementation=cfg.model.attn_implementation,
        pad_token_id=tokenizer.pad_token_id,
        quantization=quantization,
        device=device,
    )
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    if quantization is not None:
        import warnings

        # bitsandbytes warns on every 8-bit matmul that it casts its input; once per run says nothing new.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        model = prepare_kbit_base(model, gradient_checkpointing=tcfg.gradient_checkpointing)
    elif tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not full:
        model = attach_lora(
            model,
            task=task,
            r=cfg.lora.r,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            bias=cfg.lora.bias,
            modules_to_save=cfg.lora.modules_to_save,
        )
    qat, fake_quant = cfg.qat, None
    if qat is not None:
        # After LoRA, so that the merged weight W + BA is what gets fake-quantized (see quant/qat.py).
        fake_quant = attach_fake_quant(model, bits=qat.schedule[0], group_size=qat.group_size, symmetric=qat.symmetric)
    if teacher is not None and task == "causal-lm":
        check_output_size(model, teacher, dcfg.teacher)
    trainable, total = count_parameters(model)
    footprint = weights_footprint(model)

    # --- schedule -----------------------------------------------------------------------------------------
    micro_per_epoch = math.ceil(len(data.train) / tcfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tcfg.grad_accum)
    stage_steps = qat.explicit_steps() if qat is not None else None
    total_steps = tcfg.max_steps or (sum(stage_steps) if stage_steps else tcfg.epochs * steps_per_epoch)
    stages = None
    if qat is not None:  # which bit-width each step trains at; the loop sets it from the global step
        try:
            stages = BitSchedule.build(qat.schedule, stage_steps, total_steps)
        except ValueError as exc:
            raise ConfigError(f"qat.schedule: {exc}", hint="use fewer stages or more steps") from None
    warmup = tcfg.warmup_steps or int(tcfg.warmup_ratio * total_steps)
    optimizer = build_optimizer(
        model,
        lr=tcfg.lr,
        weight_decay=tcfg.weight_decay,
        betas=(tcfg.adam_beta1, tcfg.adam_beta2),
        eps=tcfg.adam_eps,
        name=tcfg.optimizer,
        device=device,
    )
    scheduler = build_scheduler(optimizer, kind=tcfg.scheduler, warmup_steps=warmup, total_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    # --- run directory and resume -------------------------------------------------------------------------
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    ckpt_root = run_dir / "checkpoints"
    for folder in (run_dir, ckpt_root):  # half-written folders of a killed job: never trusted, now removed
        sweep_stale_temp(folder)
    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "step_in_epoch": 0,
        "best_eval_loss": None,
        "best_step": None,
        "qat_stages": [],  # per finished QAT stage: its bits, last step and eval metrics
    }
    if resume and (ckpts := list_checkpoints(ckpt_root)):
        state = load_checkpoint(
            ckpts[-1],
            model=accelerator.unwrap_model(model),
            full=full,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        truncate_after(run_dir / "metrics.jsonl", state["step"])
        state.setdefault("qat_stages", [])
    elif resume:
        truncate_after(run_dir / "metrics.jsonl", 0)
    atomic_write_text(run_dir / "run_config.yaml", dump_config(cfg))
    if label_names:
        atomic_write_text(run_dir / "labels.json", json.dumps(label_names))
    metrics = MetricsLog(run_dir / "metrics.jsonl")

    eval_bs = tcfg.eval_batch_size or tcfg.batch_size

    def eval_batches():
        for i in range(0, len(data.eval), eval_bs):
            yield collate(data.eval[i : i + eval_bs])

    def run_eval(step: int, **extra: Any) -> dict[str, float]:
        if not data.eval:
            return {}
        result = evaluate(model, eval_batches(), task=task, device=device, autocast=accelerator.autocast)
        metrics.log({"step": step, **extra, **result})
        if state["best_eval_loss"] is None or result["eval_loss"] < state["best_eval_loss"]:
            state["best_eval_loss"], state["best_step"] = result["eval_loss"], step
        return result

    bar = ProgressReporter(total_steps, state["step"], progress)
    bar.note(
        f"bittune: {cfg.method} {task} on {device.type} ({mixed_precision} mixed precision), "
        f"{trainable:,} of {total:,} parameters trainable; {len(data.train)} train / {len(data.eval)} eval rows; "
        f"{total_steps} steps of {tcfg.batch_size}x{tcfg.grad_accum}"
        + (f"; QAT {stages.bits} bits, stages ending at steps {stages.ends}" if stages else "")
        + (f"; distilling from {dcfg.teacher}" if dcfg else "")
    )
    for split, st in data.stats.items():
        if st.truncated or st.dropped:
            bar.note(f"  {split}: {st.truncated} rows truncated to {cfg.data.max_length} tokens, {st.dropped} dropped")

    # --- the loop -----------------------------------------------------------------------------------------
    reset_peak(device)
    model.train()
    step, epoch, start_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
    last_eval: dict[str, float] = {}
    stopped = False
    skipped_in_a_row = 0
    t_start = time.perf_counter()
    steps_this_session = 0
    while step < total_steps and not stopped:
        micro = epoch_batches(len(data.train), tcfg.batch_size, tcfg.seed, epoch)
        groups = [micro[i : i + tcfg.grad_accum] for i in range(0, len(micro), tcfg.grad_accum)]
        for group_index in range(start_in_epoch, len(groups)):
            t0 = time.perf_counter()
            if stages is not None:  # from the global step alone, so a resumed run lands in the right stage
                fake_quant.set_bits(stages.bits_at(step))
            batches = [collate([data.train[i] for i in idx]) for idx in groups[group_index]]
            # Normalise by the targets of the whole step, so accumulation equals one big batch.
            n_targets = sum(count_targets(task, b["labels"]) for b in batches)
            n_tokens = sum(int(b.get("attention_mask", b["input_ids"]).ne(0).sum()) for b in batches)
            step_loss = step_task_loss = 0.0
            for batch in batches:
                inputs, labels = model_inputs(batch, device), batch["labels"].to(device)
                with accelerator.autocast():
                    logits = model(**inputs).logits
                    t_logits = teacher_logits(teacher, inputs) if teacher is not None else None
                if teacher is None:
                    loss = loss_sum(task, logits, labels) / n_targets
                else:
                    total_sum, task_sum = distillation_loss_sum(
                        task, logits, t_logits, labels, temperature=dcfg.temperature, alpha=dcfg.alpha
                    )
                    loss = total_sum / n_targets
                    step_task_loss += task_sum.item() / n_targets
                accelerator.backward(loss)
                step_loss += loss.item()
            if tcfg.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(params, tcfg.max_grad_norm))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
            lr = scheduler.get_last_lr()[0]
            # A NaN/inf loss or gradient would poison the weights and every later checkpoint: stop with the last
            # good checkpoint on disk, or (train.on_nonfinite: skip) drop this step's update and go on.
            bad = "loss" if not math.isfinite(step_loss) else "grad_norm" if not math.isfinite(grad_norm) else None
            if bad is None:
                optimizer.step()
                skipped_in_a_row = 0
            else:
                skipped_in_a_row += 1
                where = f"step {step + 1} (epoch {epoch}, batch group {group_index})"
                kept = list_checkpoints(ckpt_root)
                last_good = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved yet"
                if tcfg.on_nonfinite == "stop" or skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
                    metrics.log({"step": step + 1, "nonfinite": bad, "action": "stop"})
                    metrics.close()
                    bar.close()
                    lock.release()
                    raise NonFiniteError(
                        f"non-finite {bad} ({step_loss if bad == 'loss' else grad_norm}) at {where}; {last_good}",
                        hint="lower train.lr, set train.max_grad_norm, check the data rows of that step, "
                        "or set train.on_nonfinite: skip",
                    )
                metrics.log({"step": step + 1, "nonfinite": bad, "action": "skipped"})
                bar.note(f"skipped the update of {where}: non-finite {bad}")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_this_session += 1
            state.update(step=step, epoch=epoch, step_in_epoch=group_index + 1)
            if group_index + 1 == len(groups):
                state.update(epoch=epoch + 1, step_in_epoch=0)

            dt = time.perf_counter() - t0
            elapsed = time.perf_counter() - t_start
            eta = elapsed / steps_this_session * (total_steps - step)
            if step % tcfg.log_every == 0 or step == total_steps:
                metrics.log(
                    {
                        "step": step,
                        "epoch": epoch + (group_index + 1) / len(groups),
                        "loss": step_loss,
                        **({"task_loss": step_task_loss} if teacher is not None else {}),
                        **({"qat_bits": fake_quant.bits} if fake_quant is not None else {}),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": n_tokens / dt,
                        "elapsed_s": round(elapsed, 3),
                        **peak_memory_mb(device),
                    }
                )
            bar.update(step, f"loss {step_loss:.4f}  {n_tokens / dt:,.0f} tok/s", eta)
            # The end of a QAT stage (not the last) gets an eval at the stage's own bits and a checkpoint pruning keeps.
            stage_done = stages.ends_stage(step) if stages is not None and step < total_steps else None
            if stage_done is not None or (tcfg.eval_every and step % tcfg.eval_every == 0 and step < total_steps):
                tags = {"qat_stage": stage_done, "qat_bits": fake_quant.bits} if stage_done is not None else {}
                last_eval = run_eval(step, **tags)
                if last_eval:
                    bar.note(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            if stage_done is not None:
                record = {"stage": stage_done, "bits": fake_quant.bits, "end_step": step, "loss": step_loss}
                state["qat_stages"].append({**record, **last_eval})
            periodic = bool(tcfg.save_every) and step % tcfg.save_every == 0
            if (periodic or stage_done is not None) and step < total_steps:
                save_checkpoint(
                    ckpt_root / f"step-{step}",
                    model=accelerator.unwrap_model(model),
                    full=full,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    state=dict(state),
                )
                keep = {f"step-{state['best_step']}"} if state["best_step"] else set()
                keep |= {f"step-{s['end_step']}" for s in state["qat_stages"]}
                prune_checkpoints(ckpt_root, tcfg.keep_last, keep=keep)
            if stop_after_step is not None and step >= stop_after_step and step < total_steps:
                stopped = True
                break
            if step >= total_steps:
                break
        epoch, start_in_epoch = state["epoch"], state["step_in_epoch"]
    bar.close()

    if stopped:
        metrics.close()
        lock.release()
        return TrainResult(run_dir=run_dir, final_dir=None, steps=step, stopped_early=True)

    # --- final eval and save ------------------------------------------------------------------------------
    qat_final: dict[str, Any] = {}
    if stages is not None:  # the last stage ends with the run; its eval is the final eval
        fake_quant.set_bits(stages.bits[-1])
        qat_final = {"qat_stage": len(stages.bits) - 1, "qat_bits": stages.bits[-1]}
    last_eval = run_eval(step, **qat_final) or last_eval
    if stages is not None:
        state["qat_stages"].append({"stage": qat_final["qat_stage"], "bits": stages.bits[-1], "end_step": step,
                                    **last_eval})  # fmt: skip
    unwrapped = accelerator.unwrap_model(model)
    final_dir = run_dir / ("model" if full else "adapter")
    if fake_quant is not None:
        # Save the latent float weights (and adapter) under their usual names: quantizing them to the final
        # bit-width (qat.json) reproduces exactly what the last stage trained and evaluated.
        remove_fake_quant(unwrapped)

    def write_final(tmp: Path) -> None:
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if label_names:
            (tmp / "labels.json").write_text(json.dumps(label_names))
        if qcfg is not None:
            (tmp / QUANT_FILE).write_text(json.dumps(qcfg.model_dump()))
        if stages is not None:
            settings = qat_settings(
                bits=stages.bits[-1], group_size=qat.group_size, symmetric=qat.symmetric, method=qat.method,
                schedule=stages,
            )  # fmt: skip
            (tmp / QAT_FILE).write_text(json.dumps(settings, indent=2))

    if not full and Path(cfg.model.path).exists():
        # An absolute base path keeps the adapter loadable from any working directory.
        unwrapped.peft_config["default"].base_model_name_or_path = str(Path(cfg.model.path).resolve())
    summary = {
        "steps": step,
        "method": cfg.method,
        "task": task,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "memory": {
            **peak_memory_mb(device),
            "weights_mb_by_dtype": {k: round(v / 2**20, 2) for k, v in footprint.items()},
            "weights_mb": round(sum(footprint.values()) / 2**20, 2),
        },
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "data": {k: vars(v) for k, v in data.stats.items()},
        "best_eval_loss": state["best_eval_loss"],
        "best_step": state["best_step"],
        **(
            {"qat": {"schedule": list(stages.bits), "stage_ends": list(stages.ends), "stages": state["qat_stages"]}}
            if stages is not None
            else {}
        ),
        **({"distill": dcfg.model_dump()} if dcfg is not None else {}),
        "final_dir": str(final_dir),
        **last_eval,
    }
    # summary.json first: a kill between the two leaves no adapter/, so --resume finishes the run again.
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    atomic_dir(final_dir, write_final)
    metrics.close()
    mem = summary["memory"]
    peak = mem.get("peak_cuda_allocated_mb", mem["peak_rss_mb"])
    bar.note(
        f"done: {step} steps; outputs in {final_dir}"
        + ("".join(f", {k} {v:.4f}" for k, v in last_eval.items()) if last_eval else "")
        + f"\n  memory: peak {'CUDA allocated' if 'peak_cuda_allocated_mb' in mem else 'RSS'} {peak:,.0f} MB; "
        + f"weights {mem['weights_mb']:,.1f} MB ("
        + ", ".join(f"{k} {v:,.1f}" for k, v in mem["weights_mb_by_dtype"].items())
        + f"); {trainable:,} trainable parameters"
    )
    lock.release()
    return TrainResult(run_dir=run_dir, final_dir=final_dir, final_metrics=summary, steps=step)
