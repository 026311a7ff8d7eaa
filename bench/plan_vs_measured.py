"""How close is ``bittune plan``? Estimated vs measured peak memory and step time on a real model.

Each configuration trains SmolLM2-135M-Instruct for a few steps on the same packed chat rows with the same
hyperparameters, in its own process (``ru_maxrss`` is a per-process peak) through ``python -m bittune train``;
the estimate for the same config comes from :func:`bittune.plan.estimate`. Results go to
``bench/results/plan_vs_measured.md`` (and ``.json``).

    python bench/plan_vs_measured.py                      # CPU: ~5-8 minutes on 2 cores
    python bench/plan_vs_measured.py --data trec --batch 8 --seq 128 --only "LoRA fp32" "QLoRA NF4, no grad ckpt"
    python bench/plan_vs_measured.py --device cuda --paged  # GPU: bf16 compute, paged optimizers for k-bit

``--data trec`` trains on the demo's TREC questions instead (short chat rows, unpacked, as ``make demo`` does):
there the rows are far shorter than ``--seq``, and each config is estimated twice, from its config alone (every row
``--seq`` tokens) and from its rows (``bittune plan`` reading the data).

``--model DIR`` uses another local model folder (default: SmolLM2 converted from the bundled GGUF);
``--random-init`` replaces its weights with random ones of the same shape (memory and speed do not depend on the
values), for machines without the GGUF package.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
NF4 = {"bits": 4, "type": "nf4", "double_quant": True}

CONFIGS: dict[str, dict[str, Any]] = {
    "full fp32": {"method": "full", "train": {"lr": 1e-5}},
    "LoRA fp32": {"method": "lora"},
    "LoRA 8-bit base": {"method": "qlora", "quant": {"bits": 8}},
    "QLoRA NF4": {"method": "qlora", "quant": NF4},  # gradient checkpointing: auto, which is on for a k-bit base
    "QLoRA NF4 + grad ckpt": {"method": "qlora", "quant": NF4, "train": {"gradient_checkpointing": True}},
    "QLoRA NF4, no grad ckpt": {"method": "qlora", "quant": NF4, "train": {"gradient_checkpointing": False}},
}
# CPU only: the same runs with glibc's mmap threshold fixed at 1 MiB, so freed activation blocks go back to the
# kernel instead of staying in the heap (bittune plan models both allocator behaviours).
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
CPU_EXTRA: dict[str, dict[str, Any]] = {
    "LoRA fp32, malloc threshold 1 MiB": {"method": "lora", "env": FIXED_MALLOC},
    "QLoRA NF4, malloc threshold 1 MiB": {"method": "qlora", "quant": NF4, "env": FIXED_MALLOC},
}
# With --paged on a GPU, the k-bit configs use bitsandbytes' paged optimizers (as QLoRA does).
PAGED = {
    "LoRA 8-bit base": "paged_adamw_32bit",
    "QLoRA NF4": "paged_adamw_8bit",
    "QLoRA NF4 + grad ckpt": "paged_adamw_8bit",
}

TEXT = (
    "the model reads a short question and answers with one word about what kind of thing is asked for such as "
    "a person a place a number a date an abbreviation or a description of something people often want to know"
)
WORDS = TEXT.split(" ")


def make_chat_data(path: Path, rows: int = 800, seed: int = 0) -> Path:
    """Deterministic chat rows (system, user, assistant) of 40-90 tokens; packing fills every row to max_length."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            messages = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": question.capitalize() + "?"},
                {"role": "assistant", "content": answer.capitalize() + "."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def resolve_model(model: str | None, random_init: bool, work: Path, device: str) -> Path:
    """The model folder to train: the given one, or SmolLM2 from the bundled GGUF; optionally re-initialised."""
    if model is None:
        from bittune.demo.assets import prepare_smollm2

        source = prepare_smollm2()
    else:
        source = Path(model).expanduser()
    if not random_init:
        return source
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = work / f"{source.name}-random"
    if not (target / "config.json").is_file():
        config = AutoConfig.from_pretrained(source)
        torch.manual_seed(0)
        with torch.device("cuda" if device == "cuda" else "cpu"):
            net = AutoModelForCausalLM.from_config(config)
        # Saved in the dtype each run loads (float32 on CPU, bf16 for a GPU base): no conversion while loading.
        net.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(target)
        AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def run_config(model: Path, data: Path, out: Path, overrides: dict[str, Any], args: argparse.Namespace) -> dict:
    """The raw YAML-shaped config of one benchmark run (same data and hyperparameters for every method)."""
    raw: dict[str, Any] = {
        "model": {"path": str(model)},
        "lora": dict(LORA),
        "data": {"train": str(data), "format": "chat", "max_length": args.seq, "packing": args.data != "trec"},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "lr": 2e-4,
            "scheduler": "constant",
            "log_every": 1,
            "device": args.device,
            "seed": 0,
        },
        "output_dir": str(out),
    }
    for key, value in overrides.items():
        if key == "env":
            continue
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    if raw.get("method") not in ("lora", "qlora"):  # full fine-tuning trains no adapter: no lora section
        raw.pop("lora", None)
    return raw


def train_and_measure(raw: dict[str, Any], work: Path, name: str, env: dict | None = None) -> dict[str, Any]:
    """Train ``raw`` in a fresh ``python -m bittune train`` process (``env`` added) and read what it measured."""
    out = Path(raw["output_dir"])
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg_file = work / f"{out.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "bittune", "train", str(cfg_file)], capture_output=True, text=True, env=env
    )
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"name": name, "error": proc.stderr[-3000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "elapsed_s" in r]
    summary = json.loads((out / "summary.json").read_text())
    mem = summary["memory"]
    # elapsed_s is cumulative from the loop's start; the first step also pays one-off costs (allocations,
    # first-touch page faults, kernel selection), so it is left out.
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(rows)]
    tps = [r["tokens_per_s"] for r in rows[1:]]
    return {
        "name": name,
        "peak_mb": mem.get("peak_cuda_allocated_mb", mem["peak_rss_mb"]),
        "peak_rss_mb": mem["peak_rss_mb"],
        "peak_cuda_allocated_mb": mem.get("peak_cuda_allocated_mb"),
        "weights_mb": mem["weights_mb"],
        "weights_mb_by_dtype": mem["weights_mb_by_dtype"],
        "trainable": summary["trainable_parameters"],
        "s_per_step_median": statistics.median(times) if times else None,
        "s_per_step_min": min(times) if times else None,
        "tokens_per_s_median": statistics.median(tps) if tps else None,
        "steps": len(rows),
        "wall_s": round(wall, 1),
    }


def machine(device: str) -> str:
    """One line about the machine, for the results file."""
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = psutil.virtual_memory().total / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, torch {torch.__version__} (CPU)"


def parse_args(description: str, default_out: str, *, repeat: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if repeat:
        parser.add_argument("--repeat", type=int, default=1, help="runs of each config (round-robin)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", help="local model folder (default: SmolLM2-135M-Instruct from the bundled GGUF)")
    parser.add_argument("--random-init", action="store_true", help="random weights of the model's shape")
    parser.add_argument("--steps", type=int, help="optimizer steps per config (default: 6 on CPU, 20 on GPU)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--paged", action="store_true", help="GPU: paged AdamW (8-bit for NF4, 32-bit for int8)")
    parser.add_argument("--only", nargs="*", help="run only these config names")
    parser.add_argument(
        "--data",
        choices=("synthetic", "trec"),
        default="synthetic",
        help="synthetic packed chat rows (default), or the demo's TREC questions, unpacked",
    )
    parser.add_argument("--work", default="/tmp/bittune-bench")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()
    args.steps = args.steps or (20 if args.device == "cuda" else 6)
    return args


def command_line() -> str:
    import shlex

    return "python " + shlex.join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])


def setup(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(work dir, model folder, data file) shared by every config of one invocation."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model, args.random_init, work, args.device)
    if args.data == "trec":
        from bittune.demo.trec import build_trec

        return work, model, build_trec(work / "trec", n_train=args.batch * args.steps * 4).train
    data = make_chat_data(work / "chat.jsonl")
    return work, model, data


def selected(args: argparse.Namespace, configs: dict[str, dict]) -> dict[str, dict]:
    chosen = {k: v for k, v in configs.items() if not args.only or k in args.only}
    if args.device == "cuda" and args.paged:
        for name, opt in PAGED.items():
            if name in chosen:
                chosen[name] = {**chosen[name], "train": {**chosen[name].get("train", {}), "optimizer": opt}}
    return chosen


def pct(est: float | None, meas: float | None) -> str:
    if not est or not meas:
        return "n/a"
    return f"{100 * (est - meas) / meas:+.1f}%"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "bench/results")
    from bittune.config import config_from_dict
    from bittune.plan import device as probe
    from bittune.plan import estimate
    from bittune.preflight import preflight

    work, model, data = setup(args)
    rows = []
    configs = {**CONFIGS, **(CPU_EXTRA if args.device == "cpu" else {})}
    for i, (name, overrides) in enumerate(selected(args, configs).items()):
        raw = run_config(model, data, work / f"plan-{i}", overrides, args)
        env = overrides.get("env", {})
        probe.matmul_flops.cache_clear()  # re-measure next to each run: a shared CPU's load drifts
        saved = dict(os.environ)
        os.environ.update(env)  # the estimate reads the allocator setting from the environment, as the run will
        try:
            cfg = config_from_dict(json.loads(json.dumps(raw)))
            report = estimate(cfg, device=args.device)
            if args.data == "trec":  # and from the rows themselves, as `bittune plan` does when the data is here
                rows_read = preflight(cfg, cheap=True, read_data=True).data
                probe.matmul_flops.cache_clear()
                with_data = estimate(cfg, device=args.device, data=rows_read)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        measured = train_and_measure(raw, work, name, env)
        rows.append({"name": name, "estimate": report.as_dict(), "measured": measured})
        if args.data == "trec":
            rows[-1]["estimate_from_rows"] = with_data.as_dict()
        est_s, meas_s = report.seconds_per_step, measured.get("s_per_step_median")
        print(
            f"{name}: est {report.peak_mb:,.0f} MB / measured {measured.get('peak_mb', float('nan')):,.0f} MB; "
            f"est {est_s or float('nan'):.2f} s/step / measured {meas_s or float('nan'):.2f}",
            file=sys.stderr,
            flush=True,
        )
    write_results(args, rows, model)


def rows_table(rows: list[dict]) -> list[str]:
    """``--data trec``: each config's estimate from its config alone and from its rows, against the run."""
    lines = [
        "| config | measured peak RSS (MB) | est. from config | est. from rows | measured s/step (median) "
        "| est. from config | est. from rows |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        meas, plain, data = row["measured"], row["estimate"], row.get("estimate_from_rows")
        if "error" in meas or data is None:
            continue
        mem, sec = meas["peak_mb"], meas["s_per_step_median"]
        lines.append(
            f"| {row['name']} | {mem:,.0f} | {plain['peak_mb']:,.0f} ({pct(plain['peak_mb'], mem)}) "
            f"| {data['peak_mb']:,.0f} ({pct(data['peak_mb'], mem)}) | {sec:.2f} "
            f"| {plain['seconds_per_step']:.2f} ({pct(plain['seconds_per_step'], sec)}) "
            f"| {data['seconds_per_step']:.2f} ({pct(data['seconds_per_step'], sec)}) |"
        )
    w = next((r["estimate_from_rows"]["workload"] for r in rows if r.get("estimate_from_rows")), None)
    if w:
        lines += ["", f"The rows: {w['real_tokens']:,.0f} real tokens per step on average; the passes compute "
                      f"{w['computed_tokens']:,.0f} of them (prompt prefixes once, rows packed); largest pass "
                      f"{w['max_pass_tokens']:,.0f} tokens."]  # fmt: skip
    return lines


def write_results(args: argparse.Namespace, rows: list[dict], model: Path) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = "peak RSS" if args.device == "cpu" else "peak CUDA allocated"
    lines = [
        f"# bittune plan vs measured ({args.device})",
        "",
        f"Machine: {machine(args.device)}. Model: {model.name}"
        f"{' (random weights)' if args.random_init else ''}; "
        + (
            f"{args.batch} x {args.seq} packed chat tokens per step"
            if args.data != "trec"
            else f"{args.batch} TREC questions per step (max_length {args.seq}, unpacked)"
        )
        + f", {args.steps} steps per config, LoRA r=16 on all linear layers, each config in its own process.",
        "",
        *([*rows_table(rows), "", "From the config alone:", ""] if args.data == "trec" else []),
        f"| config | est. {peak} (MB) | measured (MB) | error | est. s/step | measured s/step (median; min) "
        "| error (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        est, meas = row["estimate"], row["measured"]
        if "error" in meas:
            lines.append(f"| {row['name']} | {est['peak_mb']:,.0f} | failed | | | | |")
            continue
        s_est = est["seconds_per_step"]
        mem_err = pct(est["peak_mb"], meas["peak_mb"])
        lines.append(
            f"| {row['name']} | {est['peak_mb']:,.0f} | {meas['peak_mb']:,.0f} | {mem_err} "
            f"| {s_est:.2f} | {meas['s_per_step_median']:.2f}; {meas['s_per_step_min']:.2f} "
            f"| {pct(s_est, meas['s_per_step_median'])} |"
        )
    lines += ["", "Estimated components (MB) at the peak phase:", ""]
    names = [c["name"] for c in rows[0]["estimate"]["components"]] if rows else []
    for row in rows[1:]:
        names += [c["name"] for c in row["estimate"]["components"] if c["name"] not in names]
    lines.append("| config | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for row in rows:
        comps = {c["name"]: c["mb"] for c in row["estimate"]["components"]}
        lines.append(f"| {row['name']} | " + " | ".join(f"{comps.get(n, 0):,.0f}" for n in names) + " |")
    lines += ["", f"Command: `{command_line()}`", ""]
    stem = "plan_vs_measured" + ("_cuda" if args.device == "cuda" else "") + ("_trec" if args.data == "trec" else "")
    (out / f"{stem}.md").write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
