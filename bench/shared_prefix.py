"""One training micro-batch with and without the shared prompt prefix (``train.shared_prefix``), side by side.

SmolLM2-135M-Instruct on the demo's TREC rows (chat template; the rows share the system prompt and the instruction,
41 of ~60 tokens), LoRA r=16/alpha 32/dropout 0.05 on all linear layers. Three set-ups, as ``bittune train`` builds
them on CPU: LoRA in float32 (fused LoRA linears), LoRA under bf16 autocast (frozen base in bf16, float32 attention,
fused LoRA), QLoRA (NF4 + double quant, float32 compute, LoRA fused over the 4-bit layers). For each set-up and
batch size, forward + backward of the same micro-batch through ``causal_lm_target_loss_sum`` with ``share_prefix``
off and on, alternating, ``--reps`` times after one warm-up each; the fastest repetition counts. Peak RSS of each
variant: the process's ``VmHWM`` window reset before its repetitions (after ``malloc_trim``).

    python bench/shared_prefix.py                     # writes bench/results/shared_prefix.{json,md}
    python bench/shared_prefix.py --batches 4 --setups lora-fp32 --reps 2    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SETUPS = ("lora-fp32", "lora-bf16", "qlora-nf4")


def micro_batch(tokenizer: Any, rows: int) -> dict[str, Any]:
    """The first ``rows`` TREC training rows of the demo, collated as ``bittune train`` does (max_length 128)."""
    from bittune.data import make_collator, prepare_data
    from bittune.demo.assets import cache_dir
    from bittune.demo.trec import build_trec

    files = build_trec(cache_dir() / "data" / "bench-shared-prefix", n_train=max(rows, 16))
    data = prepare_data(
        train=str(files.train), eval=None, eval_fraction=0.0, fmt="chat", template="auto", max_length=128,
        packing=False, train_on_prompt=False, system_prompt=None, columns={}, split="train", max_rows=None,
        tokenizer=tokenizer, task="causal-lm", seed=0,
    )  # fmt: skip
    return make_collator("causal-lm", tokenizer.pad_token_id, False)(data.train[:rows])


def build(setup: str, path: str) -> Any:
    """The model a CPU ``bittune train`` run of ``setup`` trains (weights, LoRA, the levers it turns on)."""
    import torch

    from bittune.model import attach_lora, load_model, prepare_kbit_base
    from bittune.training.speedups import apply_speedups

    torch.manual_seed(0)
    if setup == "qlora-nf4":
        from bittune.quant.api import bnb_config
        from bittune.quant.spec import BnbSpec

        cpu = torch.device("cpu")
        quantization = bnb_config(BnbSpec(method="nf4", double_quant=True), cpu)
        model = load_model(path, task="causal-lm", dtype=torch.float32, quantization=quantization, device=cpu)
        model = prepare_kbit_base(model, gradient_checkpointing=False)
    else:
        model = load_model(path, task="causal-lm", dtype=torch.float32)
    model = attach_lora(model, task="causal-lm", r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    # As setup_model does for every LoRA run, QLoRA included (its LoRA is fused over the 4-bit layers on CPU).
    mixed_precision = "bf16" if setup == "lora-bf16" else "no"
    apply_speedups(model, device=torch.device("cpu"), mixed_precision=mixed_precision, lora=True)
    return model.train()


def timed(model: Any, batch: dict[str, Any], share: bool, bf16: bool) -> float:
    """Seconds of one forward + backward of ``batch``."""
    import contextlib

    import torch

    from bittune.training.loss import causal_lm_target_loss_sum

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    with autocast:
        loss = causal_lm_target_loss_sum(model, inputs, batch["labels"], share_prefix=share)
    loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def measure(setup: str, path: str, tokenizer: Any, batches: list[int], reps: int) -> list[dict[str, Any]]:
    import torch

    from bittune.training.memory import peak_memory_mb, release_free_memory, reset_peak_rss
    from bittune.training.shared_prefix import shared_prefix_length

    model = build(setup, path)
    out = []
    for rows in batches:
        batch = micro_batch(tokenizer, rows)
        prefix = shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"])
        times: dict[bool, list[float]] = {False: [], True: []}
        peaks: dict[bool, float] = {}
        for share in (False, True):
            release_free_memory()
            reset_peak_rss()
            timed(model, batch, share, setup == "lora-bf16")  # warm-up, and this variant's memory peak
            peaks[share] = peak_memory_mb(torch.device("cpu"))["peak_rss_mb"]
        for rep in range(reps):
            for share in (False, True) if rep % 2 == 0 else (True, False):
                times[share].append(timed(model, batch, share, setup == "lora-bf16"))
        best = {k: min(v) for k, v in times.items()}
        out.append({
            "setup": setup, "rows": rows, "width": int(batch["input_ids"].shape[1]), "prefix": prefix,
            "real_tokens": int(batch["attention_mask"].sum()),
            "plain_s": round(best[False], 4), "shared_s": round(best[True], 4),
            "speedup": round(best[False] / best[True], 3),
            "plain_peak_rss_mb": peaks[False], "shared_peak_rss_mb": peaks[True],
            "times": {str(k).lower(): [round(t, 4) for t in v] for k, v in times.items()},
        })  # fmt: skip
        print(json.dumps({k: v for k, v in out[-1].items() if k != "times"}), flush=True)
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the machine type."""
    import platform

    return next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")), platform.machine())  # fmt: skip


def markdown(results: list[dict[str, Any]], argv: list[str], wall: float) -> str:
    import torch

    cpu = cpu_model()
    lines = [
        "# Shared prompt prefix: one micro-batch, off vs on (SmolLM2-135M, demo TREC rows, CPU)",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| set-up | rows x width | shared prefix | real tokens | plain s | shared s | speed-up | plain peak RSS MB "
        "| shared peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['setup']} | {r['rows']} x {r['width']} | {r['prefix']} | {r['real_tokens']} | {r['plain_s']:.3f} "
            f"| {r['shared_s']:.3f} | {r['speedup']:.2f}x | {r['plain_peak_rss_mb']:,.0f} "
            f"| {r['shared_peak_rss_mb']:,.0f} |"
        )
    lines += ["", f"Command: `python bench/shared_prefix.py {' '.join(argv)}` ({wall / 60:.1f} min).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setups", nargs="*", default=list(SETUPS), choices=SETUPS)
    p.add_argument("--batches", nargs="*", type=int, default=[4, 8])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer

    from bittune.demo.assets import prepare_smollm2

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.time()
    path = str(prepare_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(path)
    results = [r for setup in args.setups for r in measure(setup, path, tokenizer, args.batches, args.reps)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shared_prefix.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    (out / "shared_prefix.md").write_text(markdown(results, sys.argv[1:], time.time() - t0))
    print(f"wrote {out / 'shared_prefix.md'}")


if __name__ == "__main__":
    main()
