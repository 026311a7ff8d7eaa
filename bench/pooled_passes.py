"""One optimizer step's forward + backward with its rows pooled into passes of a token budget, side by side.

``train.max_tokens_per_pass`` (``auto``: ``CPU_TOKENS_PER_PASS`` on CPU) pools the rows of a step's micro-batches
and regroups them by length into passes of at most that many padded tokens (``bittune.data.collate.step_passes``).
This script times the forward + backward of one step (2 micro-batches x 4 rows, as ``bench/vs_trl.py``'s recipe)
for each budget, in one process, on the same rows, alternating the order each repetition; the fastest repetition
counts. ``none`` is one pass per micro-batch (the step before pooling). Rows: the vs_trl data sets (``pydoc``:
long answers, ``max_length`` 256; ``trec``: short questions, 128). SmolLM2-135M-Instruct, LoRA r=16 / alpha 32 /
dropout 0.05 on all linears, as ``bittune train`` builds it on CPU (``bench/shared_prefix.py``'s ``build``), with
the shared prompt prefix on (the CPU default).

    python bench/pooled_passes.py                                   # both data sets, fp32, none vs 640 vs 1024
    python bench/pooled_passes.py --datasets trec --setups lora-bf16 --reps 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MAX_LENGTH = {"pydoc": 256, "trec": 128}


def step_batches(tokenizer: Any, dataset: str, work: Path) -> list[dict[str, Any]]:
    """The first 8 rows of ``dataset`` as two collated micro-batches of 4 (chat template, as bittune trains)."""
    import vs_trl

    from bittune.data import make_collator, prepare_data

    convs = vs_trl.pydoc_rows(8) if dataset == "pydoc" else vs_trl.trec_rows(8, work)
    path = work / f"{dataset}.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    data = prepare_data(
        train=str(path), eval=None, eval_fraction=0.0, fmt="chat", template="auto", max_length=MAX_LENGTH[dataset],
        packing=False, train_on_prompt=False, system_prompt=None, columns={}, split="train", max_rows=None,
        tokenizer=tokenizer, task="causal-lm", seed=0,
    )  # fmt: skip
    collate = make_collator("causal-lm", tokenizer.pad_token_id, False)
    return [collate(data.train[:4]), collate(data.train[4:8])]


def timed_step(model: Any, batches: list[dict[str, Any]], budget: int | None, bf16: bool) -> float:
    """Seconds of forward + backward over the step's passes for ``budget`` (None: one pass per micro-batch)."""
    import torch

    from bittune.data.collate import step_passes
    from bittune.training.loss import causal_lm_target_loss_sum

    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    passes = step_passes(batches, budget)
    t0 = time.perf_counter()
    for p in passes:
        with autocast():
            loss = causal_lm_target_loss_sum(model, {k: p[k] for k in ("input_ids", "attention_mask")}, p["labels"],
                                             share_prefix=True)  # fmt: skip
        loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def measure(setup: str, dataset: str, budgets: list[int | None], reps: int, work: Path) -> list[dict[str, Any]]:
    import shared_prefix
    import vs_trl
    from transformers import AutoTokenizer

    from bittune.data.collate import step_passes

    path = vs_trl.model_dir()
    batches = step_batches(AutoTokenizer.from_pretrained(path), dataset, work)
    model = shared_prefix.build(setup, path)
    bf16 = setup == "lora-bf16"
    times: dict[int | None, list[float]] = {b: [] for b in budgets}
    for b in budgets:
        timed_step(model, batches, b, bf16)  # warm-up
    for rep in range(reps):
        for b in budgets if rep % 2 == 0 else list(reversed(budgets)):
            times[b].append(timed_step(model, batches, b, bf16))
    base = min(times[budgets[0]])
    out = []
    for b in budgets:
        shapes = [list(p["input_ids"].shape) for p in step_passes(batches, b)]
        out.append({
            "setup": setup, "dataset": dataset, "budget": b, "passes": shapes,
            "best_s": round(min(times[b]), 3), "vs_first": round(base / min(times[b]), 3),
            "times": [round(t, 3) for t in times[b]],
        })  # fmt: skip
        print(json.dumps(out[-1]), flush=True)
    return out


def markdown(results: list[dict[str, Any]], argv: list[str], wall: float) -> str:
    import shared_prefix
    import torch

    lines = [
        "# Pooled passes: one step's forward + backward by pass budget (SmolLM2-135M LoRA, CPU)",
        "",
        f"Machine: {shared_prefix.cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}.",
        "2 micro-batches x 4 rows; fastest of the repetitions, alternating order; speed-up against the first budget.",
        "",
        "| set-up | data | budget | passes (rows x width) | best s | speed-up |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in results:
        passes = ", ".join(f"{a}x{b}" for a, b in r["passes"])
        budget = "none (per micro-batch)" if r["budget"] is None else str(r["budget"])
        lines.append(f"| {r['setup']} | {r['dataset']} | {budget} | {passes} | {r['best_s']} | {r['vs_first']}x |")
    lines += ["", f"Command: `python bench/pooled_passes.py {' '.join(argv)}` ({wall / 60:.1f} min)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*", default=["trec", "pydoc"], choices=list(MAX_LENGTH))
    p.add_argument("--setups", nargs="*", default=["lora-fp32"], choices=["lora-fp32", "lora-bf16", "qlora-nf4"])
    p.add_argument("--budgets", nargs="*", default=["none", "640", "1024"])
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--work", default="/tmp/bittune-pooled-passes")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    budgets = [None if b == "none" else int(b) for b in args.budgets]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = [r for s in args.setups for d in args.datasets for r in measure(s, d, budgets, args.reps, work)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pooled_passes.json").write_text(json.dumps(results, indent=2))
    (out / "pooled_passes.md").write_text(markdown(results, sys.argv[1:], time.time() - t0))
    print((out / "pooled_passes.md").read_text())


if __name__ == "__main__":
    main()
