"""Several processes (gloo on CPU): parity with one process, sharded checkpoints that load anywhere, rank-0 writes.

Each 2-process run is a real ``bittune train --nproc 2`` (torchrun underneath); runs are tiny and few.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bittune.config import config_from_dict
from bittune.recipes.finetune import stop_after, train
from bittune.training.metrics import read_metrics
from bittune.training.schedule import epoch_batches
from tiny import color_chat_rows, run_config, write_jsonl

pytestmark = pytest.mark.e2e

STEPS = 6


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(44))  # 44: a short last batch


def config(model_dir: Path, data: Path, out: Path, *, method: str, batch: int, strategy: str = "ddp", **train_) -> dict:
    return run_config(
        model_dir,
        data,
        out,
        method=method,
        lora={"dropout": 0.0},
        # float32 and no clipping: the only difference between the runs is the order of float additions.
        train={"batch_size": batch, "max_steps": STEPS, "lr": 3e-3, "max_grad_norm": None, "mixed_precision": "no",
               "epochs": 1, **train_},
        distributed={"strategy": strategy},
    )  # fmt: skip


def launch(raw: dict, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cfg = tmp / f"{Path(raw['output_dir']).name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bittune", "train", str(cfg), "--nproc", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def step_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), (x, y)


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=2e-5, rtol=1e-4)


def test_data_is_split_across_processes_without_duplicates():
    for n_rows, batch, world in [(44, 4, 2), (45, 4, 2), (10, 3, 4), (3, 2, 4)]:
        shares = [epoch_batches(n_rows, batch, seed=3, epoch=1, rank=r, world=world) for r in range(world)]
        one = epoch_batches(n_rows, batch * world, seed=3, epoch=1)
        assert all(len(s) == len(one) for s in shares)
        for i, rows in enumerate(one):  # global micro-batch i = the ranks' parts, in rank order
            assert [row for s in shares for row in s[i]] == rows
        assert all(len(s[i]) == batch for s in shares for i in range(n_rows // (batch * world)))


def test_ddp_two_processes_match_one_process_with_twice_the_batch(tiny_llama_dir, chat_file, tmp_path):
    one = train(config_from_dict(config(tiny_llama_dir, chat_file, tmp_path / "one", method="lora", batch=8)))
    raw = config(tiny_llama_dir, chat_file, tmp_path / "ddp", method="lora", batch=4)
    raw["tracking"] = {"backends": ["tensorboard"]}
    launch(raw, tmp_path)
    run = tmp_path / "ddp"
    assert_same_curve(step_records(one.run_dir), step_records(run))
    assert_same_weights(one.final_dir / "adapter_model.safetensors", run / "adapter" / "adapter_model.safetensors")
    # Rank 0 alone wrote: one record per step, one summary, one set of event files, no lock left.
    assert [r["step"] for r in step_records(run)] == list(range(1, STEPS + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == {"count": 2, "strategy": "ddp"}
    events = list((run / "tracking" / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 2, events  # scalars + hparams, both from rank 0
    assert not (run / ".lock").exists()


def test_fsdp_resumes_one_process_run_and_its_sharded_checkpoint_loads_in_one_process(
    tiny_llama_dir, chat_file, tmp_path
):
    """1 process (batch 8) -> stop at 2 -> FSDP2 on 2 processes (batch 4) to the end, saving sharded checkpoints
    -> one process resumes from the FSDP2 checkpoint. Every leg follows the uninterrupted one-process run."""
    ref = train(
        config_from_dict(config(tiny_llama_dir, chat_file, tmp_path / "ref", method="full", batch=8, save_every=2)),
        progress=False,
    )
    run = tmp_path / "fsdp"
    leg1 = config(tiny_llama_dir, chat_file, run, method="full", batch=8, strategy="fsdp", save_every=2)
    with stop_after(2):
        train(config_from_dict(leg1), progress=False)
    leg2 = config(tiny_llama_dir, chat_file, run, method="full", batch=4, strategy="fsdp", save_every=2)
    launch(leg2, tmp_path, "--resume")
    assert_same_curve(step_records(ref.run_dir), step_records(run))
    assert_same_weights(ref.final_dir / "model.safetensors", run / "model" / "model.safetensors")

    # The checkpoint written by the sharded run holds full tensors, keyed like the one-process model.
    ckpt = run / "checkpoints" / "step-4"
    assert {p.name for p in ckpt.iterdir()} >= {"weights.safetensors", "optimizer.pt", "rng.pt", "rng-rank1.pt"}
    assert_same_weights(ref.run_dir / "checkpoints" / "step-4" / "weights.safetensors", ckpt / "weights.safetensors")

    # A single process resumes from it (same global batch of 8 rows) and ends where the reference ended.
    again = tmp_path / "again"
    again.mkdir()
    shutil.copytree(ckpt, again / "checkpoints" / "step-4")
    shutil.copy(run / "metrics.jsonl", again / "metrics.jsonl")
    leg3 = config(tiny_llama_dir, chat_file, again, method="full", batch=8, strategy="fsdp")
    result = train(config_from_dict(leg3), resume=True, progress=False)
    assert_same_curve(step_records(ref.run_dir), step_records(again))
    assert_same_weights(ref.final_dir / "model.safetensors", result.final_dir / "model.safetensors")

    # A different global batch would replay other rows: refused with the batch size that fits.
    shutil.rmtree(result.final_dir)
    from bittune.errors import ConfigError

    leg4 = config(tiny_llama_dir, chat_file, again, method="full", batch=4)
    with pytest.raises(ConfigError, match=r"(?s)8 rows per micro-batch .* train.batch_size=8"):
        train(config_from_dict(leg4), resume=True, progress=False)


def eval_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]


def one_and_two(tmp: Path, one: dict, two: dict, *args: str) -> tuple[Path, Path]:
    """Run ``one`` in this process and ``two`` on 2 processes; their run directories."""
    first = train(config_from_dict(one), progress=False).run_dir
    launch(two, tmp, *args)
    return first, Path(two["output_dir"])


def test_fsdp_lora_with_eval_across_processes_matches_one_process(tiny_llama_dir, chat_file, tmp_path):
    """FSDP2 on a LoRA model, with evals on a held-out file during and after training (every process evaluates)."""
    held_out = write_jsonl(tmp_path / "eval.jsonl", color_chat_rows(11, seed=7))  # 11: uneven across processes
    raws = [
        config(tiny_llama_dir, chat_file, tmp_path / name, method="lora", batch=batch, strategy="fsdp", eval_every=3)
        for name, batch in (("one", 8), ("two", 4))
    ]
    for raw in raws:
        raw["data"]["eval"] = str(held_out)
    one, two = one_and_two(tmp_path, *raws)
    assert_same_curve(step_records(one), step_records(two))
    assert_same_weights(one / "adapter" / "adapter_model.safetensors", two / "adapter" / "adapter_model.safetensors")
    evals_one, evals_two = eval_records(one), eval_records(two)
    assert [r["step"] for r in evals_two] == [r["step"] for r in evals_one] == [3, STEPS]
    for a, b in zip(evals_one, evals_two):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5), (a, b)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == {"count": 2, "strategy": "fsdp"}
    assert summary["eval_loss"] == pytest.approx(evals_one[-1]["eval_loss"], rel=1e-5)


def test_fsdp_qlora_matches_one_process(tiny_llama_dir, chat_file, tmp_path):
    """FSDP2 shards bitsandbytes' packed NF4 weights like any tensor; the adapter trains as in one process."""
    raws = [
        config(tiny_llama_dir, chat_file, tmp_path / name, method="qlora", batch=batch, strategy="fsdp", device="cpu")
        for name, batch in (("one", 8), ("two", 4))
    ]
    for raw in raws:
        raw["quant"] = {"bits": 4, "type": "nf4"}
    one, two = one_and_two(tmp_path, *raws)
    assert_same_curve(step_records(one), step_records(two))
    assert_same_weights(one / "adapter" / "adapter_model.safetensors", two / "adapter" / "adapter_model.safetensors")
    assert json.loads((two / "adapter" / "bittune_quantization.json").read_text())["type"] == "nf4"


def test_qat_on_two_processes_matches_one_process(tiny_llama_dir, chat_file, tmp_path):
    """QAT's bit-width schedule follows the global step, so both processes switch stage together."""
    raws = [
        config(tiny_llama_dir, chat_file, tmp_path / name, method="qat", batch=batch)
        for name, batch in (("one", 8), ("two", 4))
    ]
    for raw in raws:
        raw["qat"] = {"schedule": [8, 4], "steps_per_stage": STEPS // 2, "group_size": 16}
    one, two = one_and_two(tmp_path, *raws)
    assert_same_curve(step_records(one), step_records(two))
    assert [r["qat_bits"] for r in step_records(two)] == [8] * (STEPS // 2) + [4] * (STEPS // 2)
    assert_same_weights(one / "model" / "model.safetensors", two / "model" / "model.safetensors")
    assert json.loads((two / "model" / "qat.json").read_text())["bits"] == 4


def test_deepspeed_is_refused_on_cpu_with_a_clear_message(tiny_llama_dir, chat_file, tmp_path):
    from bittune.errors import ConfigError

    raw = config(tiny_llama_dir, chat_file, tmp_path / "ds", method="lora", batch=4, strategy="deepspeed")
    with pytest.raises(ConfigError, match="deepspeed needs CUDA GPUs") as err:
        train(config_from_dict(raw), progress=False)
    assert "fsdp" in str(err.value)
    assert not (tmp_path / "ds").exists()


def test_deepspeed_config_for_zero_2_and_3():
    from bittune.training.distributed import deepspeed_config

    two = deepspeed_config(
        zero_stage=2, grad_accum=4, micro_batch=2, max_grad_norm=1.0, mixed_precision="bf16", offload=True
    )
    assert two["zero_optimization"]["stage"] == 2 and two["gradient_accumulation_steps"] == 4
    assert two["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in two["zero_optimization"]  # stage 2 does not partition weights
    assert two["bf16"]["enabled"] and not two["fp16"]["enabled"] and two["gradient_clipping"] == 1.0
    three = deepspeed_config(
        zero_stage=3, grad_accum=1, micro_batch=8, max_grad_norm=None, mixed_precision="no", offload=False
    )
    assert three["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "offload_optimizer" not in three["zero_optimization"] and three["gradient_clipping"] == 0.0
