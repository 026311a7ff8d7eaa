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
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bittune.errors import CheckpointError, StorageError

COMPLETE = "COMPLETE"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (the rename itself) to disk where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the OS or file system cannot do it.
    """
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_dir(final: Path, write: Callable[[Path], None], *, marker: bool = True) -> Path:
    """Create directory ``final`` atomically: ``write(tmp)`` fills a temp dir that is then renamed into place.

    An existing ``final`` is replaced only after the new one is complete, by an atomic swap where the OS has one
    (:func:`exchange_paths`), so ``final`` is never missing in between. ``marker=False`` leaves out the
    ``COMPLETE`` file, for folders handed to other tools (an HF export uploaded to the Hub).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        if marker:
            (tmp / COMPLETE).write_text("ok\n")
        _fsync_tree(tmp)
        if final.exists() and exchange_paths(tmp, final):
            # One atomic swap: the path always holds the previous or the new complete folder.
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous one; a kill here leaves a hidden .tmp-*
        elif final.exists():  # no atomic swap here: a kill between the renames leaves the previous one as .old-*
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(
            f"could not write {final}: {exc.strerror or exc}",
            hint="free disk space (or fix permissions) and run again; the previous complete state is untouched",
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so readers see the old or the new content, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    state: dict[str, Any],
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
        (tmp / "state.json").write_text(json.dumps(state, indent=2))

    return atomic_dir(path, write)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "state.json").is_file()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written temp folders are ignored (and never trusted)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and is_complete(p):
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def verify_checkpoint_files(path: Path) -> None:
    """Cheap integrity check of a checkpoint's files (headers and archive indexes, no tensor data read).

    Run before the model loads, so a truncated or corrupt checkpoint is reported in a second, not after minutes of
    loading weights. :func:`load_checkpoint` still checks everything it reads.
    """
    import zipfile

    from safetensors import SafetensorError, safe_open

    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete", hint="delete it; resume uses the previous one")
    try:
        with safe_open(path / "weights.safetensors", framework="pt") as f:
            f.keys()
        for archive in [path / "optimizer.pt", *sorted(path.glob("rng*.pt"))]:
            with zipfile.ZipFile(archive) as z:  # torch.save writes a zip whose index sits at the end
                z.infolist()
        for name in ("scheduler.json", "state.json"):
            json.loads((path / name).read_text())
    except (OSError, SafetensorError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({type(exc).__name__}: {exc})",
            hint="delete that step folder and resume again: the previous checkpoint is used",
        ) from None


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    full: bool,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns its ``state.json``.

    Works for a plain, DDP or FSDP2 model, whatever number of processes wrote the checkpoint: each process reads
    the full tensors and keeps what it holds. Process ``r`` restores ``rng-rank{r}.pt`` when the checkpoint has
    one, else rank 0's generators.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from bittune.training.distributed import load_full_state

    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete", hint="delete it; resume uses the previous one")
    rank = accelerator.process_index
    rng_file = path / f"rng-rank{rank}.pt"
    try:
        tensors = load_file(path / "weights.safetensors")
        opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = torch.load(rng_file if rank and rng_file.is_file() else path / "rng.pt", weights_only=True)
        sched_state = json.loads((path / "scheduler.json").read_text())
        state = json.loads((path / "state.json").read_text())
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


def remove_dir(path: Path) -> None:
    """Delete a directory so that a kill midway never leaves a half-deleted folder under its real name.

    The folder is first renamed to a hidden ``.del-*`` name (one atomic step), then deleted; leftovers of a kill
    are swept by :func:`sweep_stale_temp` on the next start.
    """
    doomed = path.parent / f".del-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_stale_temp(folder: Path) -> None:
    """Remove ``.tmp-*``/``.old-*``/``.del-*`` folders left by killed jobs. Call only while holding the run lock."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith((".tmp-", ".old-", ".del-")):
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(ckpt_root: Path, keep_last: int, keep: set[str] = frozenset()) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and those named in ``keep``)."""
    ckpts = list_checkpoints(ckpt_root)
    for p in ckpts[:-keep_last] if keep_last else ckpts:
        if p.name not in keep:
            remove_dir(p)
