"""Nothing lost under bad numbers, full disks or a second job; nothing secret written."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bittune.config import config_from_dict
from bittune.errors import BittuneError, NonFiniteError, StorageError
from bittune.recipes.finetune import stop_after, train
from bittune.training.metrics import read_metrics
from tiny import color_chat_rows, run_config, write_jsonl

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(64))


def poison_loss_at(monkeypatch, bad_calls: set[int]) -> None:
    """Make the loss NaN on the given forward passes (1-based), as a diverging run would.

    Patches ``micro_batch_loss``, which every training micro-batch goes through, whether the step takes the full
    logits or the head only at label positions (evaluation does not use it).
    """
    import bittune.training.loss as loss_module

    real = loss_module.micro_batch_loss
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        total, task = real(*args, **kwargs)
        return (total * float("nan"), task) if calls["n"] in bad_calls else (total, task)

    monkeypatch.setattr(loss_module, "micro_batch_loss", fake)


def test_nan_loss_stops_with_the_last_good_checkpoint_kept(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, {5})
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 10, "save_every": 2})
    with pytest.raises(NonFiniteError) as err:
        train(config_from_dict(raw), progress=False)
    msg = str(err.value)
    assert "non-finite loss" in msg and "at step 5" in msg and "checkpoints/step-4" in msg
    assert "on_nonfinite: skip" in msg
    assert (tmp_path / "run" / "checkpoints" / "step-4" / "COMPLETE").is_file()
    assert not (tmp_path / "run" / "adapter").exists()
    # The run can be resumed from the good checkpoint once the cause is gone.
    monkeypatch.undo()
    result = train(config_from_dict(raw), resume=True, progress=False)
    assert result.steps == 10 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def poison_grad_at(monkeypatch, bad_calls: set[int]) -> None:
    """Make the gradient (not the loss) NaN on the given forward passes (1-based): the loss value stays finite."""
    import torch

    import bittune.training.loss as loss_module

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    real = loss_module.micro_batch_loss  # both loss paths of the step (see poison_loss_at)
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        total, task = real(*args, **kwargs)
        return (NanGrad.apply(total), task) if calls["n"] in bad_calls else (total, task)

    monkeypatch.setattr(loss_module, "micro_batch_loss", fake)


def checkpoint(run: Path, step: int) -> tuple[dict, dict]:
    """(trainable weights, optimizer state) of ``run``'s checkpoint at ``step``."""
    import torch
    from safetensors.torch import load_file

    folder = run / "checkpoints" / f"step-{step}"
    return load_file(folder / "weights.safetensors"), torch.load(folder / "optimizer.pt", weights_only=True)


def same(a, b) -> bool:
    """Nested dicts/lists of tensors and numbers, equal bit for bit."""
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_nan_loss_skip_drops_only_that_update(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    ckpts = {"max_steps": 6, "save_every": 1, "keep_last": 10}
    reference = train(
        config_from_dict(run_config(tiny_llama_dir, chat_file, tmp_path / "ref", train=ckpts)), progress=False
    )
    poison_loss_at(monkeypatch, {3})
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={**ckpts, "on_nonfinite": "skip"})
    result = train(config_from_dict(raw), progress=False)
    assert result.steps == 6
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {"step": 3, "nonfinite": "loss", "action": "skipped"} in records
    from safetensors.torch import load_file

    weights = load_file(result.final_dir / "adapter_model.safetensors")
    assert all(bool(v.isfinite().all()) for v in weights.values())
    run, ref = tmp_path / "run", reference.run_dir
    # Before the bad step: exactly the clean run. The bad step: weights and optimizer state (Adam moments, step
    # count) unchanged. After it: every step updates again.
    assert all(same(checkpoint(run, s), checkpoint(ref, s)) for s in (1, 2))
    assert same(checkpoint(run, 3), checkpoint(run, 2))
    for before, after in [(1, 2), (3, 4), (4, 5)]:
        assert not same(checkpoint(run, before)[0], checkpoint(run, after)[0]), (before, after)
    assert not same(checkpoint(run, 4)[0], checkpoint(ref, 4)[0])  # step 3's update is really missing


@pytest.mark.parametrize("max_grad_norm", [1.0, None], ids=["clipped", "unclipped"])
def test_nan_gradient_with_a_finite_loss_is_caught(tiny_llama_dir, chat_file, tmp_path, monkeypatch, max_grad_norm):
    poison_grad_at(monkeypatch, {2})
    train_cfg = {"max_steps": 4, "save_every": 1, "keep_last": 5, "max_grad_norm": max_grad_norm}
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "stop", train=train_cfg)
    with pytest.raises(NonFiniteError, match=r"non-finite grad_norm \(nan\) at step 2 .*checkpoints/step-1"):
        train(config_from_dict(raw), progress=False)
    records = read_metrics(tmp_path / "stop" / "metrics.jsonl")
    assert records[-1] == {"step": 2, "nonfinite": "grad_norm", "action": "stop"}

    poison_grad_at(monkeypatch, {2})
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "skip", train={**train_cfg, "on_nonfinite": "skip"})
    result = train(config_from_dict(raw), progress=False)
    records = read_metrics(tmp_path / "skip" / "metrics.jsonl")
    assert {"step": 2, "nonfinite": "grad_norm", "action": "skipped"} in records
    step2 = next(r for r in records if r.get("step") == 2 and "loss" in r)
    assert math.isfinite(step2["loss"])  # the loss itself was fine
    assert same(checkpoint(tmp_path / "skip", 2), checkpoint(tmp_path / "skip", 1))
    weights = result.final_dir / "adapter_model.safetensors"
    from safetensors.torch import load_file

    assert all(bool(v.isfinite().all()) for v in load_file(weights).values())


def test_ten_skips_in_a_row_stop_the_run_and_nine_do_not(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    train_cfg = {"max_steps": 14, "on_nonfinite": "skip", "save_every": 2}
    poison_loss_at(monkeypatch, set(range(2, 11)))  # steps 2..10: nine in a row, then a good step
    result = train(
        config_from_dict(run_config(tiny_llama_dir, chat_file, tmp_path / "nine", train=train_cfg)), progress=False
    )
    assert result.steps == 14 and result.final_dir is not None
    skipped = [r["step"] for r in read_metrics(tmp_path / "nine" / "metrics.jsonl") if r.get("action") == "skipped"]
    assert skipped == list(range(2, 11))

    poison_loss_at(monkeypatch, set(range(2, 12)))  # steps 2..11: the tenth in a row stops
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "ten", train=train_cfg)
    with pytest.raises(NonFiniteError, match=r"at step 11 .*checkpoints/step-10"):
        train(config_from_dict(raw), progress=False)
    records = read_metrics(tmp_path / "ten" / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("action") == "skipped"] == list(range(2, 11))
    assert records[-1] == {"step": 11, "nonfinite": "loss", "action": "stop"}
    assert not (tmp_path / "ten" / "adapter").exists()


def test_disk_full_mid_checkpoint_keeps_the_previous_one(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real(tensors, path, *args, **kwargs)  # half a file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 10, "save_every": 3})
    with pytest.raises(StorageError, match="No space left on device"):
        train(config_from_dict(raw), progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-3"]  # no temp folder left behind
    monkeypatch.undo()
    assert train(config_from_dict(raw), resume=True, progress=False).steps == 10


def test_second_job_on_the_same_output_dir_is_refused(tiny_llama_dir, chat_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename, "started": "now"}))
        raw = run_config(tiny_llama_dir, chat_file, run, train={"max_steps": 2})
        with pytest.raises(BittuneError, match=rf"in use by another bittune job \(pid {other.pid}"):
            train(config_from_dict(raw), progress=False)
    finally:
        other.kill()
        other.wait()
    # The holder is gone: its lock is stale and the next job takes over, and releases it at the end.
    result = train(config_from_dict(raw), progress=False)
    assert result.steps == 2 and not (run / ".lock").exists()


def test_corrupt_checkpoint_is_a_clean_error(tiny_llama_dir, chat_file, tmp_path):
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 6, "save_every": 2})
    with stop_after(4):
        train(config_from_dict(raw), progress=False)
    weights = tmp_path / "run" / "checkpoints" / "step-4" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    from bittune.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"checkpoints/step-4 is corrupt") as err:
        train(config_from_dict(raw), resume=True, progress=False)
    assert "delete that step folder" in str(err.value)


def test_hub_token_never_reaches_any_output(tiny_llama_dir, chat_file, tmp_path):
    token = "hf_PLANTEDsecret0123456789abcdefXYZ"
    env = {**os.environ, "HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token, "HF_HUB_OFFLINE": "1"}
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 3})))
    proc = subprocess.run(
        [sys.executable, "-m", "bittune", "train", str(cfg)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert token not in proc.stdout + proc.stderr
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    import bittune.storage as storage
    import bittune.training.checkpoint as ckpt

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        folder = root / f"step-{step}"
        folder.mkdir(parents=True)
        for name in ("weights.safetensors", "optimizer.pt", "state.json", "COMPLETE"):
            (folder / name).write_text("x")

    def killed_midway(path, ignore_errors=False):
        next(Path(path).iterdir()).unlink()  # the delete got as far as one file...
        raise KeyboardInterrupt  # ...when the process died

    monkeypatch.setattr(storage.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(root, keep_last=2)
    monkeypatch.undo()
    names = sorted(p.name for p in root.iterdir())
    assert names[1:] == ["step-2", "step-3"] and names[0].startswith(".del-step-1-")
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-2", "step-3"]
    (root / ".tmp-step-4-999").mkdir()  # and a checkpoint write that was killed
    storage.sweep_stale_temp(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]


def test_peak_rss_of_a_job_excludes_the_process_that_started_it():
    """Linux carries ru_maxrss across fork and exec: a job started by a 1 GB parent must not report 1 GB."""
    code = (
        "import subprocess, sys\n"
        "big = bytearray(1024**3)\n"
        "for i in range(0, len(big), 4096): big[i] = 1\n"
        "child = 'from bittune.training.memory import peak_memory_mb; import torch; "
        'print(peak_memory_mb(torch.device("cpu"))["peak_rss_mb"])\'\n'
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, check=True).stdout)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert float(out.stdout.strip()) < 800, out.stdout


@pytest.mark.parametrize("victim", ["weights.safetensors", "optimizer.pt", "rng.pt", "state.json"])
def test_checkpoint_integrity_check_catches_each_truncated_file(tmp_path, victim):
    import json

    import torch
    from safetensors.torch import save_file

    from bittune.errors import CheckpointError
    from bittune.training.checkpoint import verify_checkpoint_files

    ckpt = tmp_path / "step-2"
    ckpt.mkdir()
    save_file({"w": torch.randn(64, 64)}, ckpt / "weights.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.randn(64, 64)}}}, ckpt / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, ckpt / "rng.pt")
    (ckpt / "scheduler.json").write_text(json.dumps({"last_epoch": 2}))
    (ckpt / "state.json").write_text(json.dumps({"step": 2}))
    (ckpt / "COMPLETE").write_text("")
    verify_checkpoint_files(ckpt)  # intact: accepted

    data = (ckpt / victim).read_bytes()
    (ckpt / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} is corrupt"):
        verify_checkpoint_files(ckpt)


def test_keep_last_also_keeps_the_best_checkpoint_by_eval_loss(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    """``keep_last: 1`` with an eval after every step: the newest checkpoint and the one of the lowest eval loss
    (step 2 here, scripted) survive pruning; the summary names that step."""
    import bittune.training.evaluate as evaluate_module

    losses = iter([3.0, 1.0, 2.0, 2.5, 2.6, 2.7, 2.8])  # step 1, 2, ... then the final eval
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: {"eval_loss": next(losses)})
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", data={"eval": str(chat_file)},
                     train={"max_steps": 6, "eval_every": 1, "save_every": 1, "keep_last": 1})  # fmt: skip
    train(config_from_dict(raw), progress=False)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-2", "step-5"], kept  # the best and the newest (the last step writes the final adapter)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_step"] == 2 and summary["best_eval_loss"] == 1.0


def test_resume_with_other_lora_targets_is_refused(tiny_llama_dir, chat_file, tmp_path):
    """The checkpoint holds adapters for the run's own targets; a resume that adapts other layers would load only
    some of them (the rest untrained, silently): refused, naming the checkpoint, and nothing final is written."""
    from bittune.errors import CheckpointError

    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 6, "save_every": 2})
    with stop_after(4):
        train(config_from_dict(raw), progress=False)
    raw["lora"]["target_modules"] = ["q_proj"]
    with pytest.raises(CheckpointError, match="does not match this model"):
        train(config_from_dict(raw), resume=True, progress=False)
    assert not (tmp_path / "run" / "adapter").exists()
    assert (tmp_path / "run" / "checkpoints" / "step-4").is_dir()  # the finished checkpoint is still there


def test_epochs_set_the_run_length_without_max_steps(tiny_llama_dir, tmp_path):
    """No ``max_steps``: ``epochs`` x steps per epoch (rows / batch, rounded up, / grad_accum, rounded up)."""
    data = write_jsonl(tmp_path / "chat.jsonl", color_chat_rows(20))
    raw = run_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": None, "epochs": 2, "batch_size": 4,
                                                                     "grad_accum": 2})  # fmt: skip
    train(config_from_dict(raw), progress=False)
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps[-1] == 2 * 3  # 20 rows: 5 micro-batches of 4, 3 steps of 2 (the last has one) per epoch
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


def test_resume_says_where_it_continues_from(tiny_llama_dir, chat_file, tmp_path, capsys):
    """``--resume`` names the checkpoint it continues from; on a folder without one it says the run starts at
    step 0 (a resume loop after a crash before the first checkpoint), instead of starting silently."""
    import yaml

    from tiny import run_inproc

    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 4, "save_every": 2})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    with stop_after(2):
        code, err = run_inproc(["train", str(cfg), "--resume"], capsys)
    assert code == 0 and "--resume: no checkpoint here yet, so the run starts at step 0" in err, err
    code, err = run_inproc(["train", str(cfg), "--resume"], capsys)
    assert code == 0 and "resumed from step-2: step 2 of 4 done" in err, err
