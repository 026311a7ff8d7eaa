"""The fine-tuning recipe: full or LoRA, causal-LM SFT or sequence classification.

Read :func:`train` top to bottom: it is the whole run, as a list of named steps. One optimizer step is
:func:`train_step`; the loop around it is :func:`train_loop`. Everything else is set up once before the loop:

    preflight (bittune.preflight: every check, all problems at once; tokenizer and tokenized data)
    -> setup_runtime (accelerator, seeds) -> setup_loss (plain loss, or distillation from a teacher)
    -> setup_model (weights [k-bit], LoRA, [fake quantization]) -> setup_optimizer ([FSDP2], AdamW, schedule)
    -> open_run_dir (lock) -> resume_state -> open_logs (metrics.jsonl, trackers, progress)
    -> train_loop (train_step, eval, checkpoints) -> save_final (adapter/ or model/, summary.json)

Three capabilities hook in as small named pieces, so that a reader of plain LoRA training can skip them:

- QAT: :class:`bittune.training.qat_hook.QatHook` sets each step's bit-width and marks where a stage ends;
- distillation: the step's loss function is a :class:`bittune.training.distill.DistillLoss` instead of a
  :class:`bittune.training.loss.TaskLoss`;
- several processes: :class:`bittune.training.distributed.Processes` sums targets and losses over processes,
  synchronises gradients on a step's last micro-batch only and scales the loss against gradient averaging, so N
  processes x batch b follow the loss curve of 1 process x batch N*b. Only rank 0 writes into the run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bittune.config import RunConfig, dump_config
from bittune.errors import NonFiniteError
from bittune.preflight import Checked, preflight
from bittune.training.schedule import StepPlan, step_plan

if TYPE_CHECKING:
    from bittune.training.checkpoint import CheckpointState, QatStageRecord

__all__ = ["StepStats", "TrainResult", "stop_after", "train", "train_step"]

MAX_SKIPS_IN_A_ROW = 10  # with on_nonfinite: skip, this many bad steps in a row means the run has diverged

# Test seam (see stop_after): the optimizer step after which train() stops as if the process had been killed.
_STOP_AFTER: ContextVar[int | None] = ContextVar("bittune_stop_after", default=None)


@contextlib.contextmanager
def stop_after(step: int) -> Iterator[None]:
    """Inside this block, :func:`train` stops after optimizer step ``step`` as if the process were killed there.

    Checkpoints written so far stay; nothing final is saved; the result has ``stopped_early``. For tests of
    resume (an interrupted run resumed must equal an uninterrupted one bit for bit); not part of ``train()``.
    """
    token = _STOP_AFTER.set(step)
    try:
        yield
    finally:
        _STOP_AFTER.reset(token)


@dataclass
class TrainResult:
    """What a finished (or deliberately stopped) run leaves behind."""

    run_dir: Path
    final_dir: Path | None
    final_metrics: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    stopped_early: bool = False


@dataclass
class StepStats:
    """What one optimizer step measured (summed over all processes).

    Attributes:
        loss: The step's loss: its summed loss over its target count (tokens or rows).
        grad_norm: The gradient norm before clipping.
        lr: The learning rate the update used.
        tokens: Input tokens (not padding) the step processed.
        task_loss: Distillation only: the task-loss part of ``loss``.
        nonfinite: ``"loss"`` or ``"grad_norm"`` when that was NaN/inf: the update was not applied.
    """

    loss: float
    grad_norm: float
    lr: float
    tokens: float
    task_loss: float | None = None
    nonfinite: str | None = None


def train_step(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    batches: list[dict[str, Any]],
    *,
    loss_fn: Any,
    device: Any,
    max_grad_norm: float | None,
    params: list[Any] | None = None,
    procs: Any = None,
    weights: list[float] | None = None,
    max_tokens_per_pass: int | None = None,
) -> StepStats:
    """One optimizer step over ``batches`` (``grad_accum`` micro-batches): forward, backward, clip, update.

    Each micro-batch's loss is its *sum* over targets divided by the targets of the whole step, so that
    accumulating k micro-batches gives exactly the gradient of one k times larger batch. A NaN/inf loss or
    gradient would poison the weights: the update is skipped and :attr:`StepStats.nonfinite` says why (the caller
    decides whether to stop).

    Args:
        batches: Collated micro-batches (``bittune.data.make_collator``).
        loss_fn: :class:`bittune.training.loss.TaskLoss` (or ``DistillLoss``): ``loss_fn(logits, labels, inputs)``
            returns the summed loss and its task part; ``loss_fn.targets(labels)`` counts the loss terms. Each
            micro-batch's loss comes from :func:`bittune.training.loss.micro_batch_loss`: from the full logits, or
            for a causal-LM ``TaskLoss(..., head_at_targets=True)`` from the hidden states at label positions
            (:func:`bittune.training.loss.causal_lm_target_loss_sum`; plain PEFT/HF models only).
        params: The trainable parameters (default: those of ``model``).
        procs: :class:`bittune.training.distributed.Processes`; default plain PyTorch in one process.
        weights: Several processes only: 0.0 marks a placeholder micro-batch (this process has no rows of a short
            last batch but must run the collectives); default all 1.0.
        max_tokens_per_pass: Pool the rows of ``batches`` and run them as forward passes of at most this many
            padded tokens, rows grouped by length (:func:`bittune.data.collate.step_passes`); the gradients are the
            step's own. One process only: collectives and DeepSpeed's step boundary count micro-batches.
    """
    from bittune.data.collate import count_tokens, step_passes
    from bittune.training.distributed import OneProcess
    from bittune.training.evaluate import model_inputs
    from bittune.training.loss import micro_batch_loss

    procs = procs or OneProcess()
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    weights = weights or [1.0] * len(batches)
    # Length-grouped passes over the step's pooled rows (same targets and gradients); one process only, where
    # every micro-batch is real (weight 1).
    if max_tokens_per_pass is not None and procs.world == 1 and procs.strategy != "deepspeed":
        batches = step_passes(batches, max_tokens_per_pass)
        weights = [1.0] * len(batches)
    targets = procs.total(sum(w * loss_fn.targets(b["labels"]) for w, b in zip(weights, batches)))
    tokens = procs.total(sum(w * count_tokens(b) for w, b in zip(weights, batches)))
    step_loss, task_loss = 0.0, None  # task_loss: the task part of a loss with other parts (distillation)
    for i, (weight, batch) in enumerate(zip(weights, batches)):
        with procs.accumulating(model, last=i == len(batches) - 1):
            inputs, labels = model_inputs(batch, device), batch["labels"].to(device)
            total, task = micro_batch_loss(model, loss_fn, inputs, labels, autocast=procs.autocast)
            loss = total / targets
            if weight != 1.0:
                loss = loss * weight
            procs.backward(loss)
        step_loss += loss.item()
        if task is not None:
            task_loss = (task_loss or 0.0) + weight * task.item() / targets
    step_loss = procs.total(step_loss)
    grad_norm = procs.grad_norm(params, max_grad_norm, model)
    lr = scheduler.get_last_lr()[0]
    nonfinite = "loss" if not math.isfinite(step_loss) else "grad_norm" if not math.isfinite(grad_norm) else None
    if nonfinite is None:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    task_loss = procs.total(task_loss) if task_loss is not None else None
    return StepStats(step_loss, grad_norm, lr, tokens, task_loss, nonfinite)


# ---------------------------------------------------------------------------------------------------------------
# The run


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run the fine-tuning recipe described by ``cfg``.

    Args:
        cfg: A validated run config.
        resume: Continue from the latest complete checkpoint in ``cfg.output_dir``.
        progress: Show a progress bar / progress lines.

    Returns:
        Where the run's outputs are and its final metrics.

    Raises:
        BittuneError: every problem preflight finds (all at once), or a failure while training.
    """
    from transformers import set_seed

    # The run's random stream starts here, before preflight (whose meta-device LoRA check draws from it), so a
    # seed gives the same LoRA initialisation and dropout masks as it always did.
    set_seed(cfg.train.seed)
    checked = preflight(cfg, resume=resume)  # every check, all problems at once; tokenizes the data once
    checked.raise_problems()
    with contextlib.ExitStack() as stack:  # lock, logs, trackers and progress bar: released on every way out
        rt = setup_runtime(cfg, checked)
        data, collate = setup_data(cfg, checked)
        plan = step_plan(cfg, len(data.train), rt.world)  # how many steps; QAT: the bits of each
        loss_fn = setup_loss(cfg, rt)  # the teacher (distillation) loads before the student: same RNG draws
        model, qat, sizes = setup_model(cfg, checked, rt, plan)
        if cfg.distill is not None:
            loss_fn.check_student(model, cfg.distill.teacher)
        model, optimizer, scheduler, params = setup_optimizer(cfg, model, plan, rt)
        run_dir = open_run_dir(cfg, rt, stack)
        state = resume_state(cfg, checked, rt, plan, model, optimizer, scheduler)
        log = open_logs(cfg, rt, stack, state, plan, resume=resume, label_names=data.label_names, progress=progress)
        run = Run(cfg, rt, data, collate, checked.tokenizer, plan, model, optimizer, scheduler, params, loss_fn,
                  qat, sizes, log, run_dir)  # fmt: skip
        log.note(_start_note(run) + (_resume_note(checked.resume_from, state, plan) if resume else ""))
        if train_loop(run, state):  # stopped by the test seam
            return TrainResult(run_dir=run_dir, final_dir=None, steps=state.step, stopped_early=True)
        return save_final(run, state)


@dataclass
class Runtime:
    """Where and how the run computes: the accelerator (device, autocast, processes) and its settings."""

    accelerator: Any
    mixed_precision: str
    strategy: str
    ds_config: dict[str, Any] | None
    procs: Any  # bittune.training.distributed.Processes

    @property
    def device(self) -> Any:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class RunState:
    """Where the run stands. What a checkpoint keeps of it is ``state.json`` (:class:`CheckpointState`)."""

    global_batch: int
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in ``epoch``
    best_eval_loss: float | None = None
    best_step: int | None = None
    qat_stages: list[QatStageRecord] = field(default_factory=list)
    last_eval: dict[str, float] = field(default_factory=dict)  # not saved: the latest eval's metrics
    skipped_in_a_row: int = 0  # not saved: updates skipped for a NaN/inf (train.on_nonfinite: skip)

    def advance(self, index: int, steps_in_epoch: int) -> None:
        """Step ``index`` of the epoch is done."""
        self.step, self.step_in_epoch = self.step + 1, index + 1
        if index + 1 == steps_in_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def record_eval(self, result: dict[str, float]) -> None:
        if self.best_eval_loss is None or result["eval_loss"] < self.best_eval_loss:
            self.best_eval_loss, self.best_step = result["eval_loss"], self.step

    def checkpoint(self) -> CheckpointState:
        from bittune.training.checkpoint import CheckpointState

        keys = ("step", "epoch", "step_in_epoch", "best_eval_loss", "best_step", "global_batch")
        return CheckpointState(**{k: getattr(self, k) for k in keys}, qat_stages=list(self.qat_stages))

    @classmethod
    def from_checkpoint(cls, saved: CheckpointState, global_batch: int) -> RunState:
        """The state a checkpoint restores (preflight checked that its global batch is this run's)."""
        keys = ("step", "epoch", "step_in_epoch", "best_eval_loss", "best_step")
        return cls(global_batch, **{k: getattr(saved, k) for k in keys}, qat_stages=list(saved.qat_stages))


@dataclass
class Run:
    """Everything the loop works with, set up once by :func:`train`."""

    cfg: RunConfig
    rt: Runtime
    data: Any  # bittune.data.PreparedData
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    tokenizer: Any
    plan: StepPlan
    model: Any
    optimizer: Any
    scheduler: Any
    params: list[Any]
    loss_fn: Any
    qat: Any  # bittune.training.qat_hook.QatHook | None
    sizes: dict[str, Any]  # trainable / total parameters, weights footprint by dtype
    log: RunLog
    run_dir: Path


# ---------------------------------------------------------------------------------------------------------------
# Set-up


def setup_runtime(cfg: RunConfig, checked: Checked) -> Runtime:
    """The accelerator on the device preflight chose (DDP/DeepSpeed processes when launched with several)."""
    from bittune.training import distributed as dist

    t, strategy = cfg.train, cfg.distributed.strategy
    ds_config = None
    if strategy == "deepspeed":
        ds_config = dist.deepspeed_config(
            zero_stage=cfg.distributed.zero_stage,
            grad_accum=t.grad_accum,
            micro_batch=t.batch_size,
            max_grad_norm=t.max_grad_norm,
            mixed_precision=checked.mixed_precision,
            offload=cfg.distributed.offload,
        )
    accelerator = dist.make_accelerator(
        strategy=strategy, device=checked.device, mixed_precision=checked.mixed_precision, ds_config=ds_config
    )
    procs = dist.Processes(accelerator, strategy, t.grad_accum)
    return Runtime(accelerator, checked.mixed_precision, strategy, ds_config, procs)


def setup_data(cfg: RunConfig, checked: Checked) -> tuple[Any, Callable]:
    """The rows preflight tokenized, and the function that batches them."""
    from bittune.data import make_collator

    return checked.data, make_collator(cfg.model.task, checked.tokenizer.pad_token_id, checked.data.packed)


def setup_loss(cfg: RunConfig, rt: Runtime) -> Any:
    """The step's loss: the task's own, or with ``distill:`` a frozen teacher's outputs as a second target."""
    from bittune.training.loss import TaskLoss

    task, d = cfg.model.task, cfg.distill
    if d is None:
        # Causal LM: the step applies the output head only at label positions where the model can be split into
        # body and head (training.loss.targets_only; same loss and gradients). Classification ignores the flag.
        return TaskLoss(task, head_at_targets=True, share_prefix=share_prefix(cfg.train, rt.device))
    # Distillation stays on the full-logits path: its KL term needs the student's whole logit vector at each label
    # position (DistillLoss has no head_at_targets).
    from bittune.training.distill import DistillLoss, load_teacher

    # Its tokenizer, task and labels were checked by preflight; here only its weights load (frozen, eval mode).
    teacher = load_teacher(d.teacher, device=rt.device, trust_remote_code=cfg.model.trust_remote_code)
    return DistillLoss(task, teacher, temperature=d.temperature, alpha=d.alpha, autocast=rt.accelerator.autocast)


def share_prefix(t: Any, device: Any) -> bool:
    """Whether the step runs a micro-batch's common prompt prefix once (``train.shared_prefix``; auto: on CPU,
    where it was measured to pay). Gradient checkpointing keeps it: the checkpointed layers read the prefix's
    cache (:func:`bittune.training.shared_prefix.shared_prefix_hidden`)."""
    from bittune.training.shared_prefix import prefix_sharing

    return prefix_sharing(t.shared_prefix, device.type)


def tokens_per_pass(t: Any, rt: Runtime) -> int | None:
    """This run's pass budget (:func:`bittune.data.collate.pass_budget` of ``train.max_tokens_per_pass``)."""
    from bittune.data.collate import pass_budget

    one = rt.world == 1 and rt.strategy != "deepspeed"
    return pass_budget(t.max_tokens_per_pass, rt.device.type, one_process=one)


def setup_model(cfg: RunConfig, checked: Checked, rt: Runtime, plan: StepPlan) -> tuple[Any, Any, dict[str, Any]]:
    """Load the model to train: weights (k-bit for QLoRA), LoRA adapters, fake quantization for QAT.

    Returns:
        (model, QatHook or None, sizes: trainable/total parameters, the weights' bytes by dtype, the compute
        dtype choice and the speed levers applied)
    """
    from bittune.model import (
        attach_lora,
        count_parameters,
        enable_checkpointing,
        load_model,
        prepare_kbit_base,
        resolve_dtype,
    )
    from bittune.quant.api import bnb_config
    from bittune.training.memory import release_free_memory, weights_footprint
    from bittune.training.speedups import apply_speedups, compute_choice

    t, m, lora, q = cfg.train, cfg.model, cfg.lora, cfg.quant
    # method: qlora -- the frozen base is stored in 4 or 8 bits by bitsandbytes
    quantization = bnb_config(q, rt.device) if q is not None else None
    model = load_model(
        m.path,
        task=m.task,
        dtype=resolve_dtype(m.dtype, rt.device, trainable_base=lora is None),
        label_names=checked.data.label_names,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
        attn_implementation=m.attn_implementation,
        pad_token_id=checked.tokenizer.pad_token_id,
        quantization=quantization,
        device=rt.device,
    )
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    if quantization is not None:
        import warnings

        # bitsandbytes warns on every 8-bit matmul that it casts its input; once per run says nothing new.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        model = prepare_kbit_base(model, gradient_checkpointing=t.gradient_checkpointing)
    elif t.gradient_checkpointing:
        enable_checkpointing(model)
    if lora is not None:
        model = attach_lora(
            model, task=m.task, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
            bias=lora.bias, modules_to_save=lora.modules_to_save,
        )  # fmt: skip
    # CPU: bf16 frozen base + fp32 attention where bf16 was measured faster; CPU and GPU: fused LoRA linears (not
    # under QAT, whose hook fake-quantizes W + BA inside PEFT's own forward)
    plain_lora = lora is not None and cfg.qat is None
    speedups = apply_speedups(model, device=rt.device, mixed_precision=rt.mixed_precision, lora=plain_lora)
    compute = compute_choice(t.mixed_precision, rt.device, rt.mixed_precision)
    qat = None
    if cfg.qat is not None:
        from bittune.training.qat_hook import QatHook

        qat = QatHook.attach(model, cfg.qat, plan.stages)  # after LoRA: W + BA is what gets fake-quantized
    trainable, total = count_parameters(model)
    release_free_memory()  # what loading and converting the weights freed goes back before training starts
    sizes = {"trainable": trainable, "total": total, "footprint": weights_footprint(model)}
    sizes.update(compute=compute, speedups=speedups)
    return model, qat, sizes


def setup_optimizer(cfg: RunConfig, model: Any, plan: StepPlan, rt: Runtime) -> tuple[Any, Any, Any, list[Any]]:
    """AdamW (or a bitsandbytes variant) and the learning-rate schedule; the model wrapped for its processes.

    Returns:
        (model, optimizer, scheduler, trainable parameters)
    """
    from bittune.training import distributed as dist
    from bittune.training.optim import build_optimizer, build_scheduler

    t = cfg.train
    if dist.sharded(rt.strategy, rt.accelerator):  # FSDP2 shards in place, before the optimizer takes the parameters
        model = dist.shard_model(model, reshard_after_forward=cfg.distributed.reshard_after_forward)
    optimizer = build_optimizer(
        model,
        lr=t.lr,
        weight_decay=t.weight_decay,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        name=t.optimizer,
        device=rt.device,
    )
    warmup = t.warmup_steps or int(t.warmup_ratio * plan.total_steps)
    scheduler = build_scheduler(optimizer, kind=t.scheduler, warmup_steps=warmup, total_steps=plan.total_steps)
    if not dist.sharded(rt.strategy, rt.accelerator):  # DDP / DeepSpeed wrap here; one process: device placement
        model, optimizer = rt.accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler, [p for p in model.parameters() if p.requires_grad]


def open_run_dir(cfg: RunConfig, rt: Runtime, stack: contextlib.ExitStack) -> Path:
    """Take the run directory (rank 0): created, locked for this job, cleared of what killed jobs left behind."""
    from bittune.storage import sweep_stale_temp
    from bittune.training.runlock import RunLock

    run_dir = Path(cfg.output_dir)
    lock = RunLock(run_dir)
    stack.callback(lock.release)  # on errors too; a killed process leaves a lock that the next job finds stale
    if rt.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        for folder in (run_dir, run_dir / "checkpoints"):  # half-written folders are never trusted: removed now
            sweep_stale_temp(folder)
    rt.accelerator.wait_for_everyone()
    return run_dir


def resume_state(
    cfg: RunConfig, checked: Checked, rt: Runtime, plan: StepPlan, model: Any, optimizer: Any, scheduler: Any
) -> RunState:
    """Step 0, or (``--resume``) the latest complete checkpoint: weights, optimizer, schedule, RNG, data position."""
    if checked.resume_from is None:
        return RunState(plan.global_batch)
    from bittune.training import checkpoint

    saved = checkpoint.load_checkpoint(
        checked.resume_from,
        model=model,
        full=cfg.lora is None,
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=rt.accelerator,
    )
    return RunState.from_checkpoint(saved, plan.global_batch)


class RunLog:
    """Where the run reports: ``metrics.jsonl`` and the trackers (rank 0 only), and the progress bar."""

    def __init__(self, metrics: Any, trackers: Any, bar: Any) -> None:
        self.metrics, self.trackers, self.bar = metrics, trackers, bar

    def log(self, record: dict[str, Any]) -> None:
        """A metrics record: metrics.jsonl always, the trackers when configured."""
        if self.metrics is not None:
            self.metrics.log(record)
        if self.trackers is not None:
            self.trackers.log(record)

    def note(self, text: str) -> None:
        self.bar.note(text)


def open_logs(
    cfg: RunConfig,
    rt: Runtime,
    stack: contextlib.ExitStack,
    state: RunState,
    plan: StepPlan,
    *,
    resume: bool,
    label_names: list[str] | None,
    progress: bool,
) -> RunLog:
    """Write the run's description (run_config.yaml, labels) and open metrics.jsonl, trackers and progress."""
    from bittune.storage import atomic_write_text
    from bittune.tracking import Trackers, redact
    from bittune.training.metrics import MetricsLog, truncate_after
    from bittune.training.progress import ProgressReporter

    run_dir, metrics, trackers = Path(cfg.output_dir), None, None
    logged_through = 0  # steps the trackers already received before an interruption
    if rt.main:
        if resume:  # records an interrupted run logged after its checkpoint are dropped
            logged_through = truncate_after(run_dir / "metrics.jsonl", state.step)
        atomic_write_text(run_dir / "run_config.yaml", redact(dump_config(cfg)))
        if rt.ds_config is not None:
            atomic_write_text(run_dir / "deepspeed_config.json", json.dumps(rt.ds_config, indent=2))
        if label_names:
            atomic_write_text(run_dir / "labels.json", json.dumps(label_names))
        metrics = MetricsLog(run_dir / "metrics.jsonl")
        stack.callback(metrics.close)
        if cfg.tracking.backends:
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
                logged_through=logged_through,
            )
            trackers.start(cfg.model_dump(mode="json"))
            stack.callback(trackers.finish)
    bar = ProgressReporter(plan.total_steps, state.step, progress and rt.main)
    stack.callback(bar.close)
    return RunLog(metrics, trackers, bar)


def levers(run: Run) -> dict[str, Any]:
    """The speed and memory levers on in this run: the model's (:func:`bittune.training.speedups.apply_speedups`),
    the loss's shared prompt prefix, the step's token-budgeted passes and gradient checkpointing."""
    shared = bool(getattr(run.loss_fn, "share_prefix", False))
    budget = tokens_per_pass(run.cfg.train, run.rt)
    return {
        **run.sizes["speedups"],
        **({"shared_prefix": True} if shared else {}),
        **({"tokens_per_pass": budget} if budget else {}),
        **({"gradient_checkpointing": True} if run.cfg.train.gradient_checkpointing else {}),
    }


def _start_note(run: Run) -> str:
    """The run's first line: how many processes (always), where, what trains, on how many rows, in how many steps.

    A launcher that asked for more processes than the run got (``accelerate launch --cpu --num_processes 2``
    starts one) gets a warning line right below, with the command that starts them. The compute line says which
    dtype the step runs in and why (measured), and which CPU speedups are on.
    """
    from bittune.training.distributed import launch_request
    from bittune.training.speedups import describe

    cfg, rt, t, data = run.cfg, run.rt, run.cfg.train, run.data
    procs = f"{rt.world} processes ({rt.strategy})" if rt.world > 1 else "1 process"
    request = launch_request()
    short = request is not None and (request.count or 2) > rt.world
    text = (
        f"bittune: {procs}{f' ({request.describe()})' if short else ''} on {rt.device.type} "
        f"({rt.mixed_precision} mixed precision): {cfg.method} {cfg.model.task}, {run.sizes['trainable']:,} of "
        f"{run.sizes['total']:,} parameters trainable; {len(data.train)} train / {len(data.eval)} eval rows; "
        f"{run.plan.total_steps} steps of {t.batch_size}x{t.grad_accum}{' per process' if rt.world > 1 else ''}"
        + (run.qat.note() if run.qat is not None else "")
        + (f"; distilling from {cfg.distill.teacher}" if cfg.distill else "")
    )
    if short:
        n = request.count or "N"
        text += (
            f"\nwarning: {request.describe()}, but this run has {rt.world}: "
            + (
                "accelerate launch without --multi_gpu (or with --cpu, which expects MPI) starts one process. "
                if request.launcher == "accelerate launch"
                else ""
            )
            + f"Start {n} processes with `bittune train CONFIG --nproc {n}` (or `accelerate launch --multi_gpu "
            f"--num_processes {n} -m bittune train CONFIG`)."
        )
    text += f"\n  {describe(run.sizes['compute'], levers(run))}"  # after the warning, which belongs to line 1
    for split, st in data.stats.items():
        if st.truncated or st.dropped:
            text += f"\n  {split}: {st.truncated} rows truncated to {cfg.data.max_length} tokens, {st.dropped} dropped"
    return text


def _resume_note(resume_from: Path | None, state: RunState, plan: StepPlan) -> str:
    """What ``--resume`` found: the checkpoint it continues from, or none yet (the run starts at step 0)."""
    if resume_from is None:
        return "\n  --resume: no checkpoint here yet, so the run starts at step 0"
    return f"\n  resumed from {resume_from.name}: step {state.step} of {plan.total_steps} done"


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train_loop(run: Run, state: RunState) -> bool:
    """Optimizer steps from ``state`` to the plan's last one, with evals and checkpoints on the way.

    The rows of an epoch come in an order derived from (seed, epoch) alone, so a resumed run rebuilds exactly the
    batches it had left (see :func:`bittune.training.schedule.epoch_batches`).

    Returns:
        False when the run reached its last step; True when the test seam :func:`stop_after` stopped it.
    """
    from bittune.training.memory import peak_memory_mb, reset_peak
    from bittune.training.schedule import epoch_steps

    t, rt, total = run.cfg.train, run.rt, run.plan.total_steps
    stop_at = _STOP_AFTER.get()
    reset_peak(rt.device)
    run.model.train()
    t_start, steps_this_session = time.perf_counter(), 0
    while state.step < total:
        epoch = state.epoch
        steps = epoch_steps(len(run.data.train), t.batch_size, t.grad_accum, t.seed, epoch, rt.rank, rt.world)
        for index in range(state.step_in_epoch, len(steps)):
            t0 = time.perf_counter()
            if run.qat is not None:
                run.qat.before_step(state.step)
            # A process without rows in a short last batch still runs forward/backward (the collectives need every
            # process), on row 0 with weight 0.
            weights = [1.0 if rows else 0.0 for rows in steps[index]]
            batches = [run.collate([run.data.train[i] for i in rows or [0]]) for rows in steps[index]]
            stats = train_step(
                run.model, run.optimizer, run.scheduler, batches, loss_fn=run.loss_fn, device=rt.device,
                max_grad_norm=t.max_grad_norm, params=run.params, procs=rt.procs, weights=weights,
                max_tokens_per_pass=tokens_per_pass(t, rt),
            )  # fmt: skip
            if stats.nonfinite is not None:
                _on_nonfinite(run, state, stats, f"step {state.step + 1} (epoch {epoch}, batch group {index})")
            else:
                state.skipped_in_a_row = 0
            state.advance(index, len(steps))
            steps_this_session += 1
            dt, elapsed = time.perf_counter() - t0, time.perf_counter() - t_start
            if state.step % t.log_every == 0 or state.step == total:
                record: dict[str, Any] = {"step": state.step, "epoch": epoch + (index + 1) / len(steps)}
                record["loss"] = stats.loss
                if stats.task_loss is not None:
                    record["task_loss"] = stats.task_loss
                if run.qat is not None:
                    record["qat_bits"] = run.qat.bits
                record.update(lr=stats.lr, grad_norm=stats.grad_norm, tokens_per_s=stats.tokens / dt)
                run.log.log({**record, "elapsed_s": round(elapsed, 3), **peak_memory_mb(rt.device)})
            eta = elapsed / steps_this_session * (total - state.step)
            run.log.bar.update(state.step, f"loss {stats.loss:.4f}  {stats.tokens / dt:,.0f} tok/s", eta)
            stage_done = run.qat.stage_ended(state.step, total) if run.qat is not None else None
            maybe_evaluate(run, state, stage_done, stats.loss)
            maybe_checkpoint(run, state, stage_done)
            if stop_at is not None and stop_at <= state.step < total:
                return True
            if state.step >= total:
                break
    run.log.bar.close()
    return False


def _on_nonfinite(run: Run, state: RunState, stats: StepStats, where: str) -> None:
    """A NaN/inf loss or gradient: stop with the last good checkpoint on disk, or (on_nonfinite: skip) go on."""
    from bittune.training.checkpoint import list_checkpoints

    t, bad = run.cfg.train, stats.nonfinite
    state.skipped_in_a_row += 1
    kept = list_checkpoints(run.run_dir / "checkpoints")
    last_good = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved yet"
    # DeepSpeed has already stepped inside backward: it can only stop.
    if t.on_nonfinite == "stop" or state.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW or run.rt.strategy == "deepspeed":
        run.log.log({"step": state.step + 1, "nonfinite": bad, "action": "stop"})
        raise NonFiniteError(
            f"non-finite {bad} ({stats.loss if bad == 'loss' else stats.grad_norm}) at {where}; {last_good}",
            hint="lower train.lr, set train.max_grad_norm, check the data rows of that step, "
            "or set train.on_nonfinite: skip",
        )
    run.log.log({"step": state.step + 1, "nonfinite": bad, "action": "skipped"})
    run.log.note(f"skipped the update of {where}: non-finite {bad}")


def run_eval(run: Run, state: RunState, **tags: Any) -> dict[str, float]:
    """Evaluate on the eval rows (logged with ``tags``), keeping the best eval loss; {} without eval data."""
    from bittune.training.evaluate import evaluate

    data, rt = run.data, run.rt
    if not data.eval:
        return {}
    bs = run.cfg.train.eval_batch_size or run.cfg.train.batch_size
    batches = (run.collate(data.eval[i : i + bs]) for i in range(0, len(data.eval), bs))
    # Every process evaluates all rows (FSDP2 needs all of them in each forward); the results are identical.
    result = evaluate(run.model, batches, task=run.cfg.model.task, device=rt.device, autocast=rt.accelerator.autocast)
    run.log.log({"step": state.step, **tags, **result})
    state.record_eval(result)
    return result


def maybe_evaluate(run: Run, state: RunState, stage_done: int | None, loss: float) -> None:
    """Eval every ``train.eval_every`` steps, and (QAT) at the end of a stage, at that stage's bits."""
    t, step = run.cfg.train, state.step
    periodic = bool(t.eval_every) and step % t.eval_every == 0 and step < run.plan.total_steps
    if stage_done is None and not periodic:
        return
    state.last_eval = run_eval(run, state, **(run.qat.eval_tags(stage_done) if stage_done is not None else {}))
    if state.last_eval:
        run.log.note(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in state.last_eval.items()))
    if stage_done is not None:
        state.qat_stages.append(run.qat.record(stage_done, step, loss, state.last_eval))


def maybe_checkpoint(run: Run, state: RunState, stage_done: int | None) -> None:
    """A checkpoint every ``train.save_every`` steps and (QAT) at a stage's end; pruned to ``train.keep_last``.

    The best eval's checkpoint and the QAT stages' are kept beyond ``keep_last``. Gathering full tensors is a
    collective: every process takes part, rank 0 writes.
    """
    from bittune.training import distributed as dist
    from bittune.training.checkpoint import capture_rng, prune_checkpoints, save_checkpoint

    t, rt, step = run.cfg.train, run.rt, state.step
    periodic = bool(t.save_every) and step % t.save_every == 0
    if not (periodic or stage_done is not None) or step >= run.plan.total_steps:
        return
    tensors = dist.full_weights(run.model, trainable_only=run.cfg.lora is not None, accelerator=rt.accelerator)
    opt_state = dist.full_optimizer_state(run.model, run.optimizer, rt.accelerator)
    rngs = dist.gather_rng_states(rt.accelerator, capture_rng())
    if rt.main:
        ckpt_root = run.run_dir / "checkpoints"
        save_checkpoint(
            ckpt_root / f"step-{step}",
            tensors=tensors,
            optimizer_state=opt_state,
            scheduler=run.scheduler,
            state=state.checkpoint(),
            rng_states=rngs,
        )
        keep = {f"step-{state.best_step}"} if state.best_step else set()
        keep |= {f"step-{s.end_step}" for s in state.qat_stages}
        prune_checkpoints(ckpt_root, t.keep_last, keep=keep)
    rt.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------
# The end


def save_final(run: Run, state: RunState) -> TrainResult:
    """Final eval; ``summary.json``, then ``adapter/`` (PEFT layout) or ``model/`` with the tokenizer, atomically."""
    from bittune.storage import atomic_dir, atomic_write_text

    cfg, rt = run.cfg, run.rt
    tags = run.qat.finish() if run.qat is not None else {}  # QAT: the last stage ends with the run
    state.last_eval = run_eval(run, state, **tags) or state.last_eval
    if run.qat is not None:
        state.qat_stages.append(run.qat.record(tags["qat_stage"], state.step, None, state.last_eval))
    unwrapped = rt.accelerator.unwrap_model(run.model)
    final_dir = run.run_dir / ("model" if cfg.lora is None else "adapter")
    if run.qat is not None:
        # The latent float weights (and adapter) under their usual names: quantizing them to the final bit-width
        # (qat.json) reproduces exactly what the last stage trained and evaluated.
        run.qat.detach(unwrapped)
    # Sharded weights are gathered into full tensors first (a collective); one process saves the model's own.
    full_state = None
    if rt.world > 1:
        from bittune.training.distributed import final_state_dict

        full_state = final_state_dict(run.model, rt.accelerator, rt.strategy)
    if cfg.lora is not None and Path(cfg.model.path).exists():
        # An absolute base path keeps the adapter loadable from any working directory.
        unwrapped.peft_config["default"].base_model_name_or_path = str(Path(cfg.model.path).resolve())
    summary = _summary(run, state, final_dir)
    if not rt.main:
        rt.accelerator.wait_for_everyone()
        return TrainResult(run_dir=run.run_dir, final_dir=final_dir, final_metrics=summary, steps=state.step)
    # summary.json first: a kill between the two leaves no adapter/, so --resume finishes the run again.
    atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2))
    atomic_dir(final_dir, lambda tmp: _write_final(run, unwrapped, full_state, tmp))
    run.log.note(_done_note(summary, state))
    rt.accelerator.wait_for_everyone()
    return TrainResult(run_dir=run.run_dir, final_dir=final_dir, final_metrics=summary, steps=state.step)


def _write_final(run: Run, unwrapped: Any, full_state: dict[str, Any] | None, tmp: Path) -> None:
    from bittune.sidecars import write_labels, write_qat_settings, write_training_quant

    unwrapped.save_pretrained(tmp, state_dict=full_state, safe_serialization=True)
    run.tokenizer.save_pretrained(tmp)
    if run.data.label_names:
        write_labels(tmp, run.data.label_names)
    if run.cfg.quant is not None:  # how the QLoRA base was quantized: loading must do the same
        write_training_quant(tmp, run.cfg.quant)
    if run.qat is not None:
        write_qat_settings(tmp, run.qat.settings())


def _summary(run: Run, state: RunState, final_dir: Path) -> dict[str, Any]:
    """``summary.json``: steps, sizes, memory, data statistics, best and final eval."""
    from bittune.training.memory import peak_memory_mb

    cfg, data, footprint = run.cfg, run.data, run.sizes["footprint"]
    summary: dict[str, Any] = {
        "steps": state.step,
        "method": cfg.method,
        "task": cfg.model.task,
        "trainable_parameters": run.sizes["trainable"],
        "total_parameters": run.sizes["total"],
        "memory": {
            **peak_memory_mb(run.rt.device),
            "weights_mb_by_dtype": {k: round(v / 2**20, 2) for k, v in footprint.items()},
            "weights_mb": round(sum(footprint.values()) / 2**20, 2),
        },
        "compute": {**run.sizes["compute"], "speedups": levers(run)},
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "data": {k: vars(v) for k, v in data.stats.items()},
        "best_eval_loss": state.best_eval_loss,
        "best_step": state.best_step,
    }
    if run.qat is not None:
        summary["qat"] = run.qat.summary(state.qat_stages)
    if cfg.distill is not None:
        summary["distill"] = cfg.distill.model_dump()
    summary.update(final_dir=str(final_dir), **state.last_eval)
    if run.rt.world > 1:
        summary["processes"] = {"count": run.rt.world, "strategy": run.rt.strategy}
    return summary


def _done_note(summary: dict[str, Any], state: RunState) -> str:
    mem = summary["memory"]
    peak = mem.get("peak_cuda_allocated_mb", mem["peak_rss_mb"])
    return (
        f"done: {state.step} steps; outputs in {summary['final_dir']}"
        + ("".join(f", {k} {v:.4f}" for k, v in state.last_eval.items()) if state.last_eval else "")
        + f"\n  memory: peak {'CUDA allocated' if 'peak_cuda_allocated_mb' in mem else 'RSS'} {peak:,.0f} MB; "
        + f"weights {mem['weights_mb']:,.1f} MB ("
        + ", ".join(f"{k} {v:,.1f}" for k, v in mem["weights_mb_by_dtype"].items())
        + f"); {summary['trainable_parameters']:,} trainable parameters"
    )
