"""Checkpoints that are either complete or absent.

A checkpoint is written into a hidden temporary folder beside its final place, flushed to disk, and renamed into
place in one step; a ``COMPLETE`` marker written last guards against copies made by other tools. A run killed at
any moment therefore leaves the previous checkpoint untouched and no folder that looks finished but is not.

Layout of ``checkpoints/step-N/``::

    weights.safetensors   trainable tensors (LoRA: the adapter and saved modules; full: every weight), full-size
                          even when the run was sharded over processes
    optimizer.pt          optimizer state keyed by parameter name (loaded with weights_only=True)
    scheduler.json        learning-rate scheduler state
    rng.pt                python, numpy, torch (and CUDA) generator states (rng-rankN.pt: process N's)
    state.json            step, data position, best eval so far
    COMPLETE
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from bittune.errors import CheckpointError
from bittune.storage import atomic_dir, is_complete, remove_dir

STATE_FILE = "state.json"


class QatStageRecord(BaseModel):
    """One finished QAT stage: its bits, its last step, the loss of that step and the eval at its bits."""

    model_config = ConfigDict(extra="forbid")

    stage: int
    bits: int
    end_step: int
    loss: float | None = None  # the last stage ends with the run: its record has the final eval only
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    eval_accuracy: float | None = None
    eval_f1_macro: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The record as written to ``state.json`` and ``summary.json`` (metrics that were not measured left out)."""
        return self.model_dump(exclude_none=True)


class CheckpointState(BaseModel):
    """``state.json``: where the loop stands, so a resumed run rebuilds the exact remaining batches.

    Files written by earlier versions load as they are: ``global_batch`` (added with multi-process support) and
    ``qat_stages`` (added with QAT) may be missing.
    """

    model_config = ConfigDict(extra="forbid")

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps (groups of grad_accum global micro-batches) done in ``epoch``
    best_eval_loss: float | None = None
    best_step: int | None = None
    # Rows per micro-batch over all processes; the data position means the same rows only for the same value.
    # None: written before multi-process support, by one process, so train.batch_size rows.
    global_batch: int | None = None
    qat_stages: list[QatStageRecord] = []

    def to_json(self) -> str:
        return json.dumps(
            {**self.model_dump(exclude={"qat_stages"}), "qat_stages": [s.as_dict() for s in self.qat_stages]},
            indent=2,
        )


def read_state(path: Path) -> CheckpointState:
    """A checkpoint's ``state.json``, checked against :class:`CheckpointState`.

    Raises:
        CheckpointError: when it is unreadable or holds unknown or mistyped fields.
    """
    file = Path(path) / STATE_FILE
    try:
        # json.loads, not pydantic's parser: a diverged run may have logged NaN, which only Python's JSON reads.
        return CheckpointState.model_validate(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:  # ValidationError and JSONDecodeError are ValueErrors
        if isinstance(exc, ValidationError):
            what = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in exc.errors()[:3])
        else:
            what = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({STATE_FILE}: {what})",
            hint="delete that step folder and resume again: the previous checkpoint is used",
        ) from None


def capture_rng() -> dict[str, Any]:
    """Every random generator the loop touches, in a form ``torch.load(weights_only=True)`` accepts."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    rng: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def trainable_state(model: torch.nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must hold: all weights for full fine-tuning, else only trainable ones."""
    if full:
        return {k: v.detach() for k, v in model.state_dict().items()}
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: Path,
    *,
    tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    state: CheckpointState,
    rng_states: list[dict[str, Any]],
) -> Path:
    """Write a complete checkpoint to ``path`` atomically (see module docstring).

    Args:
        tensors: Full weights to keep (see :func:`trainable_state`; gathered from all shards in a sharded run).
        optimizer_state: Full optimizer state (keyed by parameter name in runs since multi-process support).
        rng_states: :func:`capture_rng` of every process, in rank order; rank 0's is ``rng.pt``.
    """
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        # Tied weights (embeddings shared with lm_head) are stored once per name; clone breaks the sharing that
        # safetensors refuses to serialise. Loading writes into the model's own tensors, so sharing survives.
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, tmp / "weights.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        for rank, rng in enumerate(rng_states):
            torch.save(rng, tmp / ("rng.pt" if rank == 0 else f"rng-rank{rank}.pt"))
        (tmp / STATE_FILE).write_text(state.to_json())

    return atomic_dir(path, write)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written temp folders are ignored (and never trusted)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and is_complete(p, STATE_FILE):
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def verify_checkpoint_files(path: Path) -> None:
    """Cheap integrity check of a checkpoint's files (headers and archive indexes, no tensor data read).

    Run before the model loads, so a truncated or corrupt checkpoint is reported in a second, not after minutes of
    loading weights. :func:`load_checkpoint` still checks everything it reads.
    """
    import zipfile

    from safetensors import SafetensorError, safe_open

    if not is_complete(path, STATE_FILE):
        raise CheckpointError(f"checkpoint {path} is incomplete", hint="delete it; resume uses the previous one")
    try:
        with safe_open(path / "weights.safetensors", framework="pt") as f:
            f.keys()
        for archive in [path / "optimizer.pt", *sorted(path.glob("rng*.pt"))]:
            with zipfile.ZipFile(archive) as z:  # torch.save writes a zip whose index sits at the end
                z.infolist()
        json.loads((path / "scheduler.json").read_text())
    except (OSError, SafetensorError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({type(exc).__name__}: {exc})",
            hint="delete that step folder and resume again: the previous checkpoint is used",
        ) from None
    read_state(path)


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    full: bool,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
) -> CheckpointState:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns its ``state.json``.

    Works for a plain, DDP or FSDP2 model, whatever number of processes wrote the checkpoint: each process reads
    the full tensors and keeps what it holds. Process ``r`` restores ``rng-rank{r}.pt`` when the checkpoint has
    one, else rank 0's generators.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from bittune.training.distributed import load_full_state

    if not is_complete(path, STATE_FILE):
        raise CheckpointError(f"checkpoint {path} is incomplete", hint="delete it; resume uses the previous one")
    state = read_state(path)
    rank = accelerator.process_index
    rng_file = path / f"rng-rank{rank}.pt"
    try:
        tensors = load_file(path / "weights.safetensors")
        opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = torch.load(rng_file if rank and rng_file.is_file() else path / "rng.pt", weights_only=True)
        sched_state = json.loads((path / "scheduler.json").read_text())
    except (OSError, SafetensorError, RuntimeError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({type(exc).__name__}: {exc})",
            hint="delete that step folder and resume again: the previous checkpoint is used",
        ) from None
    unwrapped = accelerator.unwrap_model(model)
    expected = set(unwrapped.state_dict()) if full else {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match this model (missing {missing[:3]}, unexpected {unexpected[:3]})",
            hint="resume with the same model and method as the run that wrote it",
        )
    load_full_state(model, optimizer, tensors, opt_state, accelerator)
    scheduler.load_state_dict(sched_state)
    restore_rng(rng)
    return state


def prune_checkpoints(ckpt_root: Path, keep_last: int, keep: set[str] = frozenset()) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and those named in ``keep``)."""
    ckpts = list_checkpoints(ckpt_root)
    for p in ckpts[:-keep_last] if keep_last else ckpts:
        if p.name not in keep:
            remove_dir(p)
