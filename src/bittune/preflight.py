"""Preflight: every check a run can fail before it loads weights, all run at once, all problems reported together.

``bittune train`` (through :func:`bittune.recipes.finetune.train`), ``bittune validate`` and ``bittune plan`` (the
cheap part) call :func:`preflight`. Config-file problems are already caught by :func:`bittune.config.load_config`;
these are the ones that need the world outside the config:

==========================  ==================================================================================
output_dir                  another live job holds it; it holds files that are not a run; it holds a run and
                            this is no ``--resume``; ``--resume`` of a finished run; the checkpoint to resume
                            from is intact and was written with this run's global batch
device                      ``train.device cuda`` without a GPU; paged optimizers, half-precision autocast or
                            k-bit compute dtypes on the CPU; DeepSpeed off CUDA or not installed
model.path                  exists (or is a hub id), is a model folder or a ``.gguf`` file, is not a ``bittune
                            quantize`` output, has a readable config and tokenizer
data                        reads and tokenizes (every problem names its file and line); rows are left;
                            ``model.num_labels`` matches the data's labels
lora.target_modules         match Linear layers of the model (on a weightless meta-device skeleton); only when
                            the run trains an adapter
qat.schedule                the stages fit the run's steps
distill.teacher             same task, same tokenizer, same labels (before any teacher weight is read)
==========================  ==================================================================================

What it read on the way (tokenizer, tokenized data, device) is handed on in :class:`Checked`, so training does not
read or tokenize the data a second time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bittune.config import RunConfig
from bittune.errors import BittuneError, ConfigError, PreflightError

T = TypeVar("T")

# What a run writes at the top of its output_dir, and which of those mean that a run is there.
RUN_PARTS = ("checkpoints", "adapter", "model", "metrics.jsonl")
RUN_FILES = (*RUN_PARTS, "run_config.yaml", "summary.json", "labels.json", "deepspeed_config.json", "tracking",
             "tracking.json")  # fmt: skip
FINAL_DIRS = ("adapter", "model")


@dataclass(frozen=True)
class Problem:
    """One thing that would stop the run.

    Attributes:
        where: ``file:line`` in the config when known, else the dotted key (or a data file).
        what: The problem, naming the field, file or line it is about.
        fix: How to fix it, in one sentence.
        error: The error a run would have raised for it.
    """

    where: str
    what: str
    fix: str | None = None
    error: BittuneError | None = field(default=None, compare=False, repr=False)

    def line(self) -> str:
        return self.what if self.where in self.what else f"{self.where}: {self.what}"


@dataclass
class Checked:
    """What :func:`preflight` found, and what it prepared on the way.

    Attributes:
        problems: Everything that would stop the run (empty: good to go).
        warnings: Things worth knowing that stop nothing (truncated rows, no eval data, ...).
        tokenizer: The model's tokenizer (None when it could not be loaded, or in a cheap check).
        data: :class:`bittune.data.PreparedData` (None likewise).
        device: The ``torch.device`` the run trains on; ``mixed_precision`` its autocast setting.
        world: Processes the run is launched with.
        resume_from: The checkpoint a resumed run continues from (None: it starts at step 0).
    """

    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tokenizer: Any = None
    data: Any = None
    device: Any = None
    mixed_precision: str | None = None
    world: int = 1
    resume_from: Path | None = None

    def raise_problems(self) -> None:
        """Raise if there is any problem: a single one as its own error, several as one :class:`PreflightError`."""
        if not self.problems:
            return
        if len(self.problems) == 1 and self.problems[0].error is not None:
            raise self.problems[0].error
        lines = [f"  - {p.line()}" + (f"\n    fix: {p.fix}" if p.fix else "") for p in self.problems]
        raise PreflightError(
            f"{len(self.problems)} problems found before training:\n" + "\n".join(lines),
            hint="fix each one above; `bittune validate CONFIG` checks them again without training",
        )


class _Collector:
    """Runs checks, turning each :class:`BittuneError` into a :class:`Problem` so that the next check still runs."""

    def __init__(self, cfg: RunConfig, checked: Checked) -> None:
        self.cfg, self.checked = cfg, checked

    def run(self, key: str, check: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        try:
            return check(*args, **kwargs)
        except BittuneError as exc:
            where = self.cfg.locate(key) or key
            self.checked.problems.append(Problem(where, exc.message, exc.hint, exc))
            return None


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


def preflight(
    cfg: RunConfig, *, resume: bool | None = False, cheap: bool = False, read_data: bool | None = None
) -> Checked:
    """Check everything ``cfg`` needs before weights are loaded, and report all problems at once.

    Args:
        cfg: A validated run config.
        resume: The run will continue from its latest checkpoint (``--resume``). None: only validating, so an
            ``output_dir`` that already holds a run is a warning, not a problem.
        cheap: Only what needs no data, tokenizer or teacher (``bittune plan``): the model path and the LoRA
            targets. Devices are not checked either (a plan may be for another machine).
        read_data: Load the tokenizer and read the data (default: unless ``cheap``); ``bittune plan`` reads them
            when the files are here, to count the rows' own tokens.

    Returns:
        A :class:`Checked`; call :meth:`Checked.raise_problems` to stop on problems.
    """
    from bittune.training.distributed import launched_world_size

    checked = Checked(world=launched_world_size() or 1)
    c = _Collector(cfg, checked)
    if not cheap:
        _check_output_dir(c, cfg, resume)
        _check_device(c, cfg)
    model_ok = c.run("model.path", _check_model_path, cfg) is not None
    if model_ok and (not cheap if read_data is None else read_data):
        from bittune.model import load_tokenizer

        checked.tokenizer = c.run(
            "model.path", load_tokenizer, cfg.model.path, trust_remote_code=cfg.model.trust_remote_code
        )
        model_ok = checked.tokenizer is not None
    model_ok = model_ok and c.run("model.path", _check_model_config, cfg) is not None
    if checked.tokenizer is not None:
        checked.data = c.run("data", prepare_run_data, cfg, checked.tokenizer)
    labels = checked.data.label_names if checked.data is not None else None
    if checked.data is not None:
        c.run("data", _check_rows, cfg, checked.data)
        c.run("model.num_labels", _check_num_labels, cfg, checked.data)
        checked.warnings += _data_warnings(cfg, checked.data)
    if model_ok and cfg.lora is not None:
        from bittune.model import check_lora_targets

        c.run(
            "lora.target_modules",
            check_lora_targets,
            cfg.model.path,
            task=cfg.model.task,
            target_modules=cfg.lora.target_modules,
            num_labels=len(labels or []) or cfg.model.num_labels or 2,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
        )
    if checked.data is not None and cfg.qat is not None:
        from bittune.training.schedule import step_plan

        c.run("qat.schedule", step_plan, cfg, len(checked.data.train), checked.world)
    if cfg.distill is not None and checked.tokenizer is not None:
        from bittune.training.distill import check_teacher

        c.run(
            "distill.teacher",
            check_teacher,
            cfg.distill.teacher,
            student_tokenizer=checked.tokenizer,
            task=cfg.model.task,
            label_names=labels,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    return checked


def _check_output_dir(c: _Collector, cfg: RunConfig, resume: bool | None) -> None:
    """The run directory: one job at a time, never over a user's files, never over a run without --resume."""
    from bittune.storage import check_output_path
    from bittune.training.runlock import RunLock

    run_dir = Path(cfg.output_dir)
    if resume is None:  # validating: a live job or an earlier run there is worth a line, not an error
        try:
            RunLock(run_dir).check()
        except BittuneError as exc:
            c.checked.warnings.append(exc.message)
        held = [n for n in RUN_PARTS if (run_dir / n).exists()]
        if held:
            c.checked.warnings.append(
                f"output_dir {run_dir} already holds a run ({', '.join(held)}): `bittune train` continues it only "
                "with --resume"
            )
        c.run("output_dir", check_output_path, run_dir, flag="output_dir", ours=RUN_FILES, may_replace=True)
        return
    c.run("output_dir", RunLock(run_dir).check)  # another live job: refuse now, before loading anything
    c.run(
        "output_dir",
        check_output_path,
        run_dir,
        flag="output_dir",
        noun="a run",
        ours=RUN_FILES,
        earlier=RUN_PARTS,
        may_replace=resume,
        replace_hint="pass --resume to continue it, or choose a new output_dir (bittune never overwrites a run)",
        error=ConfigError,
    )
    if resume:
        c.run("output_dir", _check_resume, c.checked, run_dir, cfg.train.batch_size)


def _check_resume(checked: Checked, run_dir: Path, batch_size: int) -> None:
    """A resumed run: not finished yet; its latest checkpoint intact and written with this global batch."""
    from bittune.training.checkpoint import list_checkpoints, read_state, verify_checkpoint_files

    if any((run_dir / d).is_dir() for d in FINAL_DIRS):
        raise BittuneError(f"the run in {run_dir} has already finished", hint="start a new run with another output_dir")
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        return
    verify_checkpoint_files(ckpts[-1])
    # The data position counts global micro-batches: it means the same rows only for the same global batch.
    saved = read_state(ckpts[-1]).global_batch or batch_size  # None: one process, train.batch_size rows
    world = checked.world
    if saved != batch_size * world:
        raise ConfigError(
            f"{ckpts[-1]} was written with {saved} rows per micro-batch over all processes, and this run has "
            f"{batch_size} x {world} process(es) = {batch_size * world}",
            hint=f"resume with train.batch_size x processes = {saved} (e.g. --set train.batch_size="
            f"{max(1, saved // world)} with {world} process(es), if it divides)",
        )
    checked.resume_from = ckpts[-1]


def _check_device(c: _Collector, cfg: RunConfig) -> None:
    """Device and precision settings that cannot work (or would be ~50x slow) on the device the run gets."""
    from bittune.model import resolve_compute_dtype, resolve_device, resolve_mixed_precision
    from bittune.training.distributed import check_deepspeed
    from bittune.training.optim import check_optimizer_device

    t = cfg.train
    device = c.run("train.device", resolve_device, t.device)
    if device is None:
        return
    c.run("train.optimizer", check_optimizer_device, t.optimizer, device)
    # bf16 on CPU only where it was measured to pay: LoRA over a float base (not k-bit, QAT or distillation).
    candidate = cfg.lora is not None and cfg.quant is None and cfg.qat is None and cfg.distill is None
    c.checked.mixed_precision = c.run(
        "train.mixed_precision", resolve_mixed_precision, t.mixed_precision, device, cpu_bf16_candidate=candidate
    )
    if cfg.quant is not None:
        c.run("quant.compute_dtype", resolve_compute_dtype, cfg.quant.compute_dtype, device)
    if cfg.distributed.strategy == "deepspeed":
        c.run("distributed.strategy", check_deepspeed, device)
    c.checked.device = device


def _check_model_path(cfg: RunConfig) -> str:
    """``model.path`` is a model bittune can train from (a ``.gguf`` file is converted once, here)."""
    from bittune.model import model_source, refuse_quantized_folder

    source = model_source(cfg.model.path)
    refuse_quantized_folder(source)
    return source


def _check_model_config(cfg: RunConfig) -> bool:
    """The model's config.json reads (the LoRA check builds the model from it)."""
    from transformers import AutoConfig

    from bittune.errors import ModelLoadError
    from bittune.model import model_source

    m = cfg.model
    try:
        AutoConfig.from_pretrained(model_source(m.path), trust_remote_code=m.trust_remote_code, revision=m.revision)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model.path {m.path}: cannot read its config ({exc})",
            hint="point model.path at a folder with config.json (or a hub id already in the local cache)",
        ) from None
    return True


def _check_rows(cfg: RunConfig, data: Any) -> None:
    if not data.train:
        raise BittuneError(
            f"no training rows left in {cfg.data.train} after tokenization",
            hint="check data.train (and data.max_rows / data.eval_fraction): training needs at least one row",
        )


def _check_num_labels(cfg: RunConfig, data: Any) -> None:
    names = data.label_names or []
    if cfg.model.task == "classification" and cfg.model.num_labels and cfg.model.num_labels != len(names):
        raise ConfigError(
            f"model.num_labels is {cfg.model.num_labels} but the data has {len(names)} labels ({', '.join(names)})",
            hint="remove model.num_labels (it is read from the data) or fix the labels",
        )


def _data_warnings(cfg: RunConfig, data: Any) -> list[str]:
    out = []
    for split, st in data.stats.items():
        if st.truncated:
            out.append(f"{split}: {st.truncated} rows are longer than data.max_length={cfg.data.max_length}")
        if st.dropped:
            out.append(f"{split}: {st.dropped} rows have nothing left to train on after truncation")
    if not data.eval:
        out.append("no eval data: set data.eval or data.eval_fraction to track overfitting")
    return out
