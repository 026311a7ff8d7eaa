"""Peak memory and speed of full, LoRA, 8-bit LoRA and QLoRA NF4 fine-tuning of SmolLM2-135M, side by side.

Same packed chat rows, same hyperparameters, each configuration in its own process through
``python -m bittune train``; results (with the machine and the command) go to
``bench/results/kbit_memory_speed.md`` (``_cuda`` on a GPU) and ``.json``.

    python bench/kbit_memory_speed.py                        # CPU: ~5 minutes on 2 cores
    python bench/kbit_memory_speed.py --repeat 3             # each configuration 3 times, round-robin
    python bench/kbit_memory_speed.py --device cuda --paged  # GPU: bf16 compute, paged optimizers for k-bit

On CPU the peak RSS of one configuration differs from run to run by up to ~1.5 GB (how much freed memory glibc
keeps in the heap, and whether the checkpoint's pages are still mapped at the peak), so ``--repeat`` shows every
run's peak and the table gives their median.

Options as in ``bench/plan_vs_measured.py`` (``--model``, ``--random-init``, ``--steps``, ``--batch``, ``--seq``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plan_vs_measured import (  # the sibling script, importable once its folder is on sys.path
    CONFIGS,
    command_line,
    machine,
    parse_args,
    run_config,
    selected,
    setup,
    train_and_measure,
)

KBIT = {name: CONFIGS[name] for name in ("full fp32", "LoRA fp32", "LoRA 8-bit base", "QLoRA NF4")}
# On CPU, LoRA's default compute dtype is measured (bf16 on AMX / AVX512-BF16 CPUs): "LoRA fp32" pins float32
# (train.mixed_precision: no) so it is what its name says, and "LoRA auto" is the default run.
KBIT["LoRA fp32"] = {**CONFIGS["LoRA fp32"], "train": {"mixed_precision": "no"}}
KBIT["LoRA auto"] = dict(CONFIGS["LoRA fp32"])
KBIT["QLoRA NF4 + grad ckpt"] = CONFIGS["QLoRA NF4 + grad ckpt"]
KBIT["QLoRA NF4, no grad ckpt"] = CONFIGS["QLoRA NF4, no grad ckpt"]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results", repeat=True)
    work, model, data = setup(args)
    results, load = [], [os.getloadavg()[0]]
    for rep in range(args.repeat):  # round-robin: a drifting machine load touches every configuration alike
        for i, (name, overrides) in enumerate(selected(args, KBIT).items()):
            raw = run_config(model, data, work / f"kbit-{i}", overrides, args)
            result = train_and_measure(raw, work, name)
            result["optimizer"] = raw["train"].get("optimizer", "adamw")
            result["run"] = rep + 1
            results.append(result)
            load.append(os.getloadavg()[0])
            print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    write_results(args, results, model, load)


def write_results(args, results: list[dict], model: Path, load: list[float]) -> None:
    gpu = args.device == "cuda"
    if gpu:
        names = {"full fp32": "full (fp32 weights, bf16 autocast)", "LoRA fp32": "LoRA (bf16 base)"}
    else:
        names = {}
    peak = "peak CUDA allocated (MB)" if gpu else "peak RSS (MB)"
    runs = f", each configuration {args.repeat} times (round-robin; the table gives medians)" if args.repeat > 1 else ""
    lines = [
        f"# k-bit memory and speed ({args.device})",
        "",
        f"Machine: {machine(args.device)}. Model: {model.name}{' (random weights)' if args.random_init else ''}; "
        f"{args.batch} x {args.seq} packed chat tokens per step, {args.steps} steps, LoRA r=16 on all linear "
        f"layers, each run in its own process{runs}. 1-minute load average during the runs: "
        f"{min(load):.1f}-{max(load):.1f}.",
        "",
        f"| configuration | optimizer | {peak} | {peak[:-5]} of each run | weights (MB) | tokens/s (median) "
        "| s/step (median) | trainable |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    summary = {}
    for name, rs in by_name.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {names.get(name, name)} | | failed | | | | | |")
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in ("peak_mb", "tokens_per_s_median", "s_per_step_median")}
        summary[name] = {**ok[0], **med}
        each = ", ".join(f"{r['peak_mb']:,.0f}" for r in ok)
        each += f" ({len(rs) - len(ok)} failed)" if len(ok) < len(rs) else ""
        lines.append(
            f"| {names.get(name, name)} | {ok[0]['optimizer']} | {med['peak_mb']:,.0f} | {each} | "
            f"{ok[0]['weights_mb']:,.1f} | {med['tokens_per_s_median']:,.0f} | {med['s_per_step_median']:.2f} | "
            f"{ok[0]['trainable']:,} |"
        )
    if "QLoRA NF4" in summary and "LoRA fp32" in summary:
        q, lo = summary["QLoRA NF4"], summary["LoRA fp32"]
        lines += [
            "",
            f"QLoRA NF4 peak / LoRA peak: {q['peak_mb'] / lo['peak_mb']:.2f}; "
            f"weights {q['weights_mb'] / lo['weights_mb']:.2f}.",
        ]
    lines += ["", f"Command: `{command_line()}`", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kbit_memory_speed" + ("_cuda" if gpu else "")
    (out / f"{stem}.md").write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps({"load_average": load, "runs": results}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
