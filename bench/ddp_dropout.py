"""How closely N processes x batch b follow 1 process x batch N*b, with and without LoRA dropout.

For each LoRA dropout value, one run in this process (batch 2b) and one ``bittune train --nproc 2`` run (batch b per
process) train the tiny random Llama of tests/tiny.py on the same seeded data; the script reports the largest loss
difference over the steps and the largest difference of the final adapter weights. Without dropout the runs differ
only in the order of float additions; with dropout each process draws its own masks for its own rows, so the masks
(and the trajectory) differ from the one-process run's.

    python bench/ddp_dropout.py [--steps 6] [--batch 4] [--dropouts 0 0.05]

Writes bench/results/ddp_dropout.json and .md. About 1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_pair(work: Path, model: Path, data: Path, dropout: float, steps: int, batch: int) -> dict:
    """One-process (batch 2b) and two-process (b each) runs; their largest loss and weight differences."""
    import torch
    from safetensors.torch import load_file

    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train
    from bittune.training.metrics import read_metrics
    from tiny import run_config

    def raw(out: Path, b: int) -> dict:
        return run_config(
            model,
            data,
            out,
            lora={"dropout": dropout},
            train={"batch_size": b, "max_steps": steps, "lr": 3e-3, "max_grad_norm": None, "mixed_precision": "no"},
        )

    one = train(config_from_dict(raw(work / f"one-{dropout}", 2 * batch)), progress=False)
    two = raw(work / f"two-{dropout}", batch)
    cfg = work / f"two-{dropout}.yaml"
    cfg.write_text(yaml.safe_dump(two))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bittune", "train", str(cfg), "--nproc", "2"]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=900)

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    a, b = losses(one.run_dir), losses(Path(two["output_dir"]))
    wa = load_file(one.final_dir / "adapter_model.safetensors")
    wb = load_file(Path(two["output_dir"]) / "adapter" / "adapter_model.safetensors")
    return {
        "lora_dropout": dropout,
        "losses_1x2b": a,
        "losses_2xb": b,
        "max_abs_dloss": max(abs(x - y) for x, y in zip(a, b, strict=True)),
        "max_abs_dweight": max(float((wa[k] - wb[k]).abs().max()) for k in wa),
        "torch": torch.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="rows per process per step (one process: twice that)")
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    from tiny import color_chat_rows, make_tiny_llama, make_tokenizer, write_jsonl

    with tempfile.TemporaryDirectory(prefix="bittune-ddp-dropout-") as tmp:
        work = Path(tmp)
        model = make_tiny_llama(work / "tiny-llama", make_tokenizer())
        data = write_jsonl(work / "chat.jsonl", color_chat_rows(64))
        rows = [run_pair(work, model, data, d, args.steps, args.batch) for d in args.dropouts]

    command = "python bench/ddp_dropout.py " + " ".join(sys.argv[1:])
    machine = f"{os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}"
    result = {"command": command.strip(), "machine": machine, "steps": args.steps, "batch": args.batch, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddp_dropout.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# 2 processes x batch b vs 1 process x batch 2b, by LoRA dropout",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {machine}; torch {rows[0]['torch']}; gloo, float32, no clipping.",
        "",
        f"Tiny random Llama (tests/tiny.py), LoRA r=8 on all linear layers, {args.steps} steps, "
        f"batch {args.batch} per process vs {2 * args.batch} in one process, lr 3e-3 constant, same seed and data.",
        "",
        "| lora.dropout | max abs loss difference | max abs adapter weight difference |",
        "|---|---|---|",
        *(f"| {r['lora_dropout']} | {r['max_abs_dloss']:.2e} | {r['max_abs_dweight']:.2e} |" for r in rows),
        "",
    ]
    (args.out / "ddp_dropout.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
