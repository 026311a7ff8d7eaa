"""Peak memory and speed of full, LoRA, 8-bit LoRA and QLoRA NF4 fine-tuning of SmolLM2-135M, side by side.

Same packed chat rows, same hyperparameters, each configuration in its own process through
``python -m bittune train``; results (with the machine and the command) go to
``bench/results/kbit_memory_speed.md`` (``_cuda`` on a GPU) and ``.json``.

    python bench/kbit_memory_speed.py                        # CPU: ~5 minutes on 2 cores
    python bench/kbit_memory_speed.py --device cuda --paged  # GPU: bf16 compute, paged optimizers for k-bit

Options as in ``bench/plan_vs_measured.py`` (``--model``, ``--random-init``, ``--steps``, ``--batch``, ``--seq``).
"""

from __future__ import annotations

import json
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


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results")
    work, model, data = setup(args)
    results = []
    for i, (name, overrides) in enumerate(selected(args, KBIT).items()):
        raw = run_config(model, data, work / f"kbit-{i}", overrides, args)
        result = train_and_measure(raw, work, name)
        result["optimizer"] = raw["train"].get("optimizer", "adamw")
        results.append(result)
        print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    write_results(args, results, model)


def write_results(args, results: list[dict], model: Path) -> None:
    gpu = args.device == "cuda"
    if gpu:
        names = {"full fp32": "full (fp32 weights, bf16 autocast)", "LoRA fp32": "LoRA (bf16 base)"}
    else:
        names = {}
    peak = "peak CUDA allocated (MB)" if gpu else "peak RSS (MB)"
    lines = [
        f"# k-bit memory and speed ({args.device})",
        "",
        f"Machine: {machine(args.device)}. Model: {model.name}{' (random weights)' if args.random_init else ''}; "
        f"{args.batch} x {args.seq} packed chat tokens per step, {args.steps} steps, LoRA r=16 on all linear "
        "layers, each configuration in its own process.",
        "",
        f"| configuration | optimizer | {peak} | weights (MB) | tokens/s (median) | s/step (median) | trainable |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        label = names.get(r["name"], r["name"])
        if "error" in r:
            lines.append(f"| {label} | | failed | | | | |")
            continue
        lines.append(
            f"| {label} | {r['optimizer']} | {r['peak_mb']:,.0f} | {r['weights_mb']:,.1f} | "
            f"{r['tokens_per_s_median']:,.0f} | {r['s_per_step_median']:.2f} | {r['trainable']:,} |"
        )
    by_name = {r["name"]: r for r in results if "error" not in r}
    if "QLoRA NF4" in by_name and "LoRA fp32" in by_name:
        q, lo = by_name["QLoRA NF4"], by_name["LoRA fp32"]
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
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
