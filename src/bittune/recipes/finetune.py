"""The fine-tuning recipe: full or LoRA, causal-LM SFT or sequence classification.

This file is the whole training loop, on purpose: read it top to bottom to know what a run does. It wires the
components (config, data, model, optimizer, checkpoints, metrics) and owns no clever abstraction of its own.

Flow: set seeds -> tokenize data -> [load the distillation teacher] -> load model (+ LoRA) [+ fake quantization]
-> [shard] -> AdamW + schedule -> [resume] -> loop over optimizer steps (each = ``grad_accum`` micro-batches whose
losses are normalised by the step's total target tokens; QAT sets the stage's bit-width first) -> eval / checkpoint
/ log [per-QAT-stage eval and checkpoint] -> save the adapter or model atomically.

With N processes (``bittune train --nproc N`` or ``accelerate launch``) each global micro-batch of
``batch_size * N`` rows is split across the processes, the target count is summed over all of them, and gradients
are averaged by DDP / FSDP2 / DeepSpeed: N processes x batch b follow the loss curve of 1 process x batch N*b.
Only rank 0 writes into the run directory.
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


def epoch_batches(
    n_rows: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """Row indices of this process's share of each micro-batch in ``epoch``.

    The order is a fresh permutation per epoch derived from (seed, epoch) alone, which lets a resumed run rebuild
    the exact remaining batches from the position stored in the checkpoint. It is cut into global micro-batches
    of ``batch_size * world`` rows, and each process takes its own contiguous part (possibly empty in a short
    last batch), so no row is seen twice and none is skipped.
    """
    import torch

    from bittune.training.distributed import shard_of_batch

    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    step = batch_size * world
    return [shard_of_batch(order[i : i + step], rank, world) for i in range(0, n_rows, step)]


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
    from transformers import set_seed

    from bittune.data import make_collator
    from bittune.model import (
        attach_lora,
        check_lora_targets,
        count_parameters,
        load_model,
        load_tokenizer,
        prepare_kbit_base,
        resolve_device,
        resolve_dtype,
        resolve_mixed_precision,
    )
    from bittune.quant.api import bnb_config
    from bittune.quant.qat import BitSchedule, attach_fake_quant, qat_settings, remove_fake_quant
    from bittune.sidecars import write_qat_settings, write_training_quant
    from bittune.tracking import Trackers, redact
    from bittune.training import distributed as dist
    from bittune.training.checkpoint import (
        atomic_dir,
        atomic_write_text,
        capture_rng,
        list_checkpoints,
        load_checkpoint,
        prune_checkpoints,
        save_checkpoint,
        sweep_stale_temp,
        verify_checkpoint_files,
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

    # --- device, precision, processes, seeds ----------------------------------------------------------------
    device = resolve_device(tcfg.device)
    check_optimizer_device(tcfg.optimizer, device)  # refuse before minutes of loading
    mixed_precision = resolve_mixed_precision(tcfg.mixed_precision, device)
    strategy = cfg.distributed.strategy
    ds_config = None
    if strategy == "deepspeed":
        ds_config = dist.deepspeed_config(
            zero_stage=cfg.distributed.zero_stage,
            grad_accum=tcfg.grad_accum,
            micro_batch=tcfg.batch_size,
            max_grad_norm=tcfg.max_grad_norm,
            mixed_precision=mixed_precision,
            offload=cfg.distributed.offload,
        )
    accelerator = dist.make_accelerator(
        strategy=strategy, device=device, mixed_precision=mixed_precision, ds_config=ds_config
    )
    device = accelerator.device
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
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

    # --- cheap checks, before minutes of loading weights -----------------------------------------------------
    if not full:
        check_lora_targets(
            cfg.model.path,
            task=task,
            target_modules=cfg.lora.target_modules,
            num_labels=len(label_names or []) or 2,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
        )
    if resume and (ckpts := list_checkpoints(run_dir / "checkpoints")):
        verify_checkpoint_files(ckpts[-1])

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
        quantization = bnb_config(qcfg, device)
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
    if dist.sharded(strategy, accelerator):  # FSDP2 shards in place, before the optimizer takes the parameters
        model = dist.shard_model(model, reshard_after_forward=cfg.distributed.reshard_after_forward)

    # --- schedule -----------------------------------------------------------------------------------------
    global_batch = tcfg.batch_size * world  # rows per micro-batch over all processes
    micro_per_epoch = math.ceil(len(data.train) / global_batch)
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
    if not dist.sharded(strategy, accelerator):  # DDP / DeepSpeed wrap here; one process: device placement only
        model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    # --- run directory and resume (rank 0 writes; the others wait for it) ---------------------------------
    ckpt_root = run_dir / "checkpoints"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        for folder in (run_dir, ckpt_root):  # half-written folders of a killed job: never trusted, now removed
            sweep_stale_temp(folder)
    accelerator.wait_for_everyone()
    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "step_in_epoch": 0,
        "best_eval_loss": None,
        "best_step": None,
        "global_batch": global_batch,
        "qat_stages": [],  # per finished QAT stage: its bits, last step and eval metrics
    }
    if resume and (ckpts := list_checkpoints(ckpt_root)):
        state = load_checkpoint(
            ckpts[-1], model=model, full=full, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator
        )
        # The data position counts global micro-batches: it means the same rows only for the same global batch.
        saved = state.setdefault("global_batch", tcfg.batch_size)
        if saved != global_batch:
            raise ConfigError(
                f"{ckpts[-1]} was written with {saved} rows per micro-batch over all processes, and this run has "
                f"{tcfg.batch_size} x {world} process(es) = {global_batch}",
                hint=f"resume with train.batch_size x processes = {saved} (e.g. --set train.batch_size="
                f"{max(1, saved // world)} with {world} process(es), if it divides)",
            )
        state.setdefault("qat_stages", [])
    if main:
        if resume:
            truncate_after(run_dir / "metrics.jsonl", state["step"])
        atomic_write_text(run_dir / "run_config.yaml", redact(dump_config(cfg)))
        if ds_config is not None:
            atomic_write_text(run_dir / "deepspeed_config.json", json.dumps(ds_config, indent=2))
        if label_names:
            atomic_write_text(run_dir / "labels.json", json.dumps(label_names))
    metrics = MetricsLog(run_dir / "metrics.jsonl") if main else None
    trackers = None
    if main and cfg.tracking.backends:
        trk = cfg.tracking
        trackers = Trackers(
            trk.backends,
            project=trk.project,
            run_name=trk.run_name or run_dir.resolve().name,
            run_dir=run_dir,
            tracking_dir=Path(trk.dir) if trk.dir else run_dir / "tracking",
            wandb_mode=trk.wandb_mode,
            mlflow_tracking_uri=trk.mlflow_tracking_uri,
            resume=resume,
        )
        trackers.start(cfg.model_dump(mode="json"))

    def log(record: dict[str, Any]) -> None:
        """A metrics record: metrics.jsonl always, the trackers when configured; rank 0 only."""
        if metrics is not None:
            metrics.log(record)
        if trackers is not None:
            trackers.log(record)

    def close_logs() -> None:
        if metrics is not None:
            metrics.close()
        if trackers is not None:
            trackers.finish()

    eval_bs = tcfg.eval_batch_size or tcfg.batch_size

    def eval_batches():
        for i in range(0, len(data.eval), eval_bs):
            yield collate(data.eval[i : i + eval_bs])

    def run_eval(step: int, **extra: Any) -> dict[str, float]:
        if not data.eval:
            return {}
        # Every process evaluates all rows (FSDP2 needs all of them in each forward); the results are identical.
        result = evaluate(model, eval_batches(), task=task, device=device, autocast=accelerator.autocast)
        log({"step": step, **extra, **result})
        if state["best_eval_loss"] is None or result["eval_loss"] < state["best_eval_loss"]:
            state["best_eval_loss"], state["best_step"] = result["eval_loss"], step
        return result

    bar = ProgressReporter(total_steps, state["step"], progress and main)
    procs = f"{world} processes ({strategy}) x " if world > 1 else ""
    bar.note(
        f"bittune: {cfg.method} {task} on {device.type} ({mixed_precision} mixed precision), "
        f"{trainable:,} of {total:,} parameters trainable; {len(data.train)} train / {len(data.eval)} eval rows; "
        f"{total_steps} steps of {procs}{tcfg.batch_size}x{tcfg.grad_accum}"
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
        micro = epoch_batches(len(data.train), tcfg.batch_size, tcfg.seed, epoch, rank, world)
        groups = [micro[i : i + tcfg.grad_accum] for i in range(0, len(micro), tcfg.grad_accum)]
        for group_index in range(start_in_epoch, len(groups)):
            t0 = time.perf_counter()
            if stages is not None:  # from the global step alone, so a resumed run lands in the right stage
                fake_quant.set_bits(stages.bits_at(step))
            # A process without rows in a short last batch still runs a forward/backward (the collectives need
            # every process), on row 0 with weight 0.
            weights = [1.0 if idx else 0.0 for idx in groups[group_index]]
            batches = [collate([data.train[i] for i in idx or [0]]) for idx in groups[group_index]]
            # Normalise by the targets of the whole step over all processes, so accumulation and N processes
            # equal one big batch. DDP/FSDP2 average gradients over processes: multiply by N to get the sum back.
            n_targets = dist.all_sum(
                accelerator, sum(w * count_targets(task, b["labels"]) for w, b in zip(weights, batches))
            )
            mask = [b.get("attention_mask", b["input_ids"]) for b in batches]
            n_tokens = dist.all_sum(accelerator, sum(w * int(m.ne(0).sum()) for w, m in zip(weights, mask)))
            scale = world * (tcfg.grad_accum if strategy == "deepspeed" else 1)  # DeepSpeed also divides by grad_accum
            step_loss = step_task_loss = 0.0
            for i, (w, batch) in enumerate(zip(weights, batches)):
                with dist.gradient_sync(model, accelerator, strategy, sync=i == len(batches) - 1):
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
                        step_task_loss += w * task_sum.item() / n_targets
                    if not w:
                        loss = loss * 0.0
                    accelerator.backward(loss * scale if scale != 1 else loss)
                step_loss += loss.item()
            step_loss = dist.all_sum(accelerator, step_loss)
            if teacher is not None:
                step_task_loss = dist.all_sum(accelerator, step_task_loss)
            grad_norm = dist.grad_norm(params, tcfg.max_grad_norm, accelerator, model)
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
                # DeepSpeed has already stepped inside backward: it can only stop.
                if tcfg.on_nonfinite == "stop" or skipped_in_a_row >= MAX_SKIPS_IN_A_ROW or strategy == "deepspeed":
                    log({"step": step + 1, "nonfinite": bad, "action": "stop"})
                    close_logs()
                    bar.close()
                    lock.release()
                    raise NonFiniteError(
                        f"non-finite {bad} ({step_loss if bad == 'loss' else grad_norm}) at {where}; {last_good}",
                        hint="lower train.lr, set train.max_grad_norm, check the data rows of that step, "
                        "or set train.on_nonfinite: skip",
                    )
                log({"step": step + 1, "nonfinite": bad, "action": "skipped"})
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
                log(
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
                # Gathering full tensors is a collective: every process takes part, rank 0 writes.
                tensors = dist.full_weights(model, trainable_only=not full, accelerator=accelerator)
                opt_state = dist.full_optimizer_state(model, optimizer, accelerator)
                rngs = dist.gather_rng_states(accelerator, capture_rng())
                if main:
                    save_checkpoint(
                        ckpt_root / f"step-{step}",
                        tensors=tensors,
                        optimizer_state=opt_state,
                        scheduler=scheduler,
                        state=dict(state),
                        rng_states=rngs,
                    )
                    keep = {f"step-{state['best_step']}"} if state["best_step"] else set()
                    keep |= {f"step-{s['end_step']}" for s in state["qat_stages"]}
                    prune_checkpoints(ckpt_root, tcfg.keep_last, keep=keep)
                accelerator.wait_for_everyone()
            if stop_after_step is not None and step >= stop_after_step and step < total_steps:
                stopped = True
                break
            if step >= total_steps:
                break
        epoch, start_in_epoch = state["epoch"], state["step_in_epoch"]
    bar.close()

    if stopped:
        close_logs()
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
    # Sharded weights are gathered into full tensors first (a collective); one process saves the model's own.
    full_state = dist.final_state_dict(model, accelerator, strategy) if world > 1 else None

    def write_final(tmp: Path) -> None:
        unwrapped.save_pretrained(tmp, state_dict=full_state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if label_names:
            (tmp / "labels.json").write_text(json.dumps(label_names))
        if qcfg is not None:
            write_training_quant(tmp, qcfg)
        if stages is not None:
            settings = qat_settings(
                bits=stages.bits[-1], group_size=qat.group_size, symmetric=qat.symmetric, method=qat.method,
                schedule=stages,
            )  # fmt: skip
            write_qat_settings(tmp, settings)

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
    if world > 1:
        summary["processes"] = {"count": world, "strategy": strategy}
    if not main:
        accelerator.wait_for_everyone()
        return TrainResult(run_dir=run_dir, final_dir=final_dir, final_metrics=summary, steps=step)
    # summary.json first: a kill between the two leaves no adapter/, so --resume finishes the run again.
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    atomic_dir(final_dir, write_final)
    close_logs()
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
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=run_dir, final_dir=final_dir, final_metrics=summary, steps=step)
