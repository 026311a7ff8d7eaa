"""bittune vs TRL + PEFT: LoRA tokens/s and peak RSS, side by side, in one invocation.

Both sides fine-tune SmolLM2-135M-Instruct (the demo's folder, converted once from the bundled GGUF) with the same
recipe: LoRA r=16 / alpha 32 / dropout 0.05 on all linear layers, AdamW lr 2e-4 (linear decay, no warmup, no
weight decay, clip 1.0), batch 4 x grad-accum 2, one epoch, seed 42, completion-only loss, on two data sets built at
run time:

* ``pydoc``: 32 chat rows "Explain the Python language topic X" -> the topic's text from CPython's own
  ``pydoc_data.topics`` (the first 32 topics in sorted order), ``max_length`` 256 (long answers);
* ``trec``: the first 96 rows of the demo's TREC question-type data (``bittune.demo.trec.build_trec``),
  ``max_length`` 128 (short prompts, one-word answers).

Each run is its own subprocess (``OMP_NUM_THREADS`` set, default 2), so its peak RSS (``VmHWM``) is its own. The
sides alternate within each repetition (and swap who goes first every repetition), so a shared machine's drifting
load hits both alike. Tokens/s = real (non-padding) tokens fed to the model in the epoch / wall time from the start
of the first optimizer step to the end of the last: TRL's tokens are the ``attention_mask`` sums its collator
returns, bittune's are its tokenized rows (one epoch sees each once); both are printed so they can be compared.

Sides:

* ``trl``: ``trl.SFTTrainer`` + ``SFTConfig`` as the tutorials write it (prompt-completion conversational rows,
  no packing, ``gradient_checkpointing=False``, ``use_cpu=True``); ``bf16=True`` for the bf16 dtype (autocast);
* ``bittune``: ``bittune.recipes.finetune.train`` on the same rows (chat format, the tokenizer's template); dtype
  ``auto`` is bittune's default (bf16 only where its start-up measurement says so), ``fp32`` sets
  ``train.mixed_precision: no`` (the float32 levers only: what a CPU without fast bf16 gets);
* ``bittune-noprefix``: ``bittune`` with ``train.shared_prefix: false`` (each row's prompt prefix computed in
  full, as before that lever);
* ``bittune-perbatch``: ``bittune`` with ``train.max_tokens_per_pass: null`` (one forward pass per micro-batch,
  as before the step pooled its rows into passes of ``CPU_TOKENS_PER_PASS`` tokens);
* ``proto``: the levers harness (``bench/step_levers.py``) with the levers that pay switched on: what bittune's
  step will do once they are wired in (compute dtype chosen by measurement, as bittune will: ``auto``).

bittune and proto run with ``OMP_WAIT_POLICY=PASSIVE`` (``bittune.threads.configure_omp``, what bittune sets for
itself before torch loads; ``--no-passive`` turns it off), TRL with the OpenMP defaults its users get.

    python bench/vs_trl.py                          # 2 repetitions x 2 data sets: TRL fp32, bittune fp32 + auto
    python bench/vs_trl.py --dtypes fp32 auto bf16  # also TRL's bf16=True
    python bench/vs_trl.py --reps 2 --scale 0.25    # quick: a quarter of the rows
    python bench/vs_trl.py --device cuda --model DIR --datasets pydoc --dtypes bf16 auto \
        --rows 320 --max-length 1024 --batch 8 --accum 1   # on a GPU (bench/gpu_check.sh: a random 1.1B Llama)

On a GPU both sides load the model in bf16 (TRL with ``bf16=True``, bittune's ``auto``) and the memory column is
the peak CUDA memory torch allocated in the run's process.

Writes ``bench/results/vs_trl.json`` and ``vs_trl.md``. TRL is a bench-only dependency: ``pip install
'bittune[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DATASETS = {"pydoc": {"rows": 32, "max_length": 256}, "trec": {"rows": 96, "max_length": 128}}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
BATCH, ACCUM, LR, SEED = 4, 2, 2e-4, 42
SIDES = ("trl", "bittune", "bittune-noprefix", "bittune-perbatch", "proto")


# --- data ------------------------------------------------------------------------------------------------------


def pydoc_rows(n: int) -> list[list[dict[str, str]]]:
    """``n`` conversations from the standard library's own pydoc topics (sorted, so every run builds the same)."""
    from pydoc_data.topics import topics

    names = [sorted(topics)[i % len(topics)] for i in range(n)]  # cycled when n exceeds the topics (GPU runs)
    return [
        [
            {"role": "user", "content": f"Explain the Python language topic {name}"},
            {"role": "assistant", "content": topics[name].strip()},
        ]
        for name in names
    ]


def trec_rows(n: int, work: Path) -> list[list[dict[str, str]]]:
    """The first ``n`` chat rows of the demo's TREC training file (system, user, assistant)."""
    from bittune.demo.trec import build_trec, read_jsonl

    files = build_trec(work / "trec", n_train=n)
    return [row["messages"] for row in read_jsonl(files.train)][:n]


def write_data(work: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each data set as bittune chat rows and as TRL prompt-completion rows (same conversations), with the
    recipe's device, model folder and batch shape."""
    out = {}
    for name in args.datasets:
        spec = DATASETS[name]
        n = args.rows or max(args.batch * args.accum, round(spec["rows"] * args.scale))
        convs = pydoc_rows(n) if name == "pydoc" else trec_rows(n, work)
        chat, pc = work / f"{name}.chat.jsonl", work / f"{name}.pc.jsonl"
        chat.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
        pc.write_text("".join(json.dumps({"prompt": c[:-1], "completion": c[-1:]}) + "\n" for c in convs))
        out[name] = {
            "chat": str(chat), "pc": str(pc), "rows": n, "max_length": args.max_length or spec["max_length"],
            "device": args.device, "model": args.model, "batch": args.batch, "accum": args.accum,
            "bittune_train": json.loads(args.bittune_train),
        }  # fmt: skip
    return out


# --- measuring inside a child ------------------------------------------------------------------------------------


def vm_kb(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmHWM`` peak RSS, ``VmRSS`` current)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Samples RSS every 50 ms in a thread, so the peak can be split into phases (load vs train)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), vm_kb("VmRSS")))
            self._stop.wait(0.05)

    def peak_mb(self, start: float = 0.0, end: float = float("inf")) -> float:
        vals = [kb for t, kb in self.samples if start <= t <= end]
        return round(max(vals, default=0) / 1024, 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def model_dir() -> str:
    from bittune.demo.assets import prepare_smollm2

    return str(prepare_smollm2())


def child_trl(data: dict[str, Any], dtype: str, out_dir: Path, sampler: RssSampler) -> dict[str, Any]:
    """One TRL SFTTrainer run; returns tokens, seconds and losses."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    path = data["model"] or model_dir()
    cpu = data["device"] == "cpu"
    rows = [json.loads(line) for line in Path(data["pc"]).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if cpu else torch.bfloat16)
    args = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=data["batch"],
        gradient_accumulation_steps=data["accum"],
        learning_rate=LR,
        lr_scheduler_type="linear",
        num_train_epochs=1,
        max_length=data["max_length"],
        packing=False,
        gradient_checkpointing=False,
        bf16=dtype == "bf16",
        use_cpu=cpu,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear"
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    seen = {"tokens": 0}
    collate = trainer.data_collator

    def counting_collate(examples):
        batch = collate(examples)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting_collate
    marks: dict[str, float] = {}
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            marks["end"] = time.perf_counter()

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Clock())
    trainer.train()
    return {"tokens": seen["tokens"], "start": marks["start"], "end": marks["end"], "losses": losses}


def bittune_config(data: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The bittune run config of the shared recipe."""
    cpu = data["device"] == "cpu"
    return {
        "model": {"path": data["model"] or model_dir(), "dtype": "float32" if cpu else "auto"},
        "method": "lora",
        "lora": {**LORA, "target_modules": "all-linear"},
        "data": {"train": data["chat"], "format": "chat", "template": "auto", "max_length": data["max_length"]},
        "train": {
            "epochs": 1,
            "batch_size": data["batch"],
            "grad_accum": data["accum"],
            "lr": LR,
            "scheduler": "linear",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": SEED,
            "log_every": 1,
            "device": data["device"],
        },
        "output_dir": str(out_dir / "run"),
    }


def child_bittune_noprefix(data: dict[str, Any], dtype: str, out_dir: Path, sampler: RssSampler) -> dict[str, Any]:
    """``bittune`` with ``train.shared_prefix: false``: every row's prompt computed in full (the lever's A/B)."""
    return child_bittune(data, dtype, out_dir, sampler, shared_prefix=False)


def child_bittune_perbatch(data: dict[str, Any], dtype: str, out_dir: Path, sampler: RssSampler) -> dict[str, Any]:
    """``bittune`` with ``train.max_tokens_per_pass: null``: one pass per micro-batch (the lever's A/B)."""
    return child_bittune(data, dtype, out_dir, sampler, settings={"max_tokens_per_pass": None})


def child_bittune(
    data: dict[str, Any],
    dtype: str,
    out_dir: Path,
    sampler: RssSampler,
    shared_prefix: bool | str = "auto",
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``bittune train`` run (the library call the CLI makes); returns tokens, seconds and losses."""
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train
    from bittune.training.metrics import MetricsLog

    if dtype not in ("fp32", "auto") or (dtype == "fp32" and data["device"] != "cpu"):
        raise SystemExit("bittune train chooses its compute dtype itself: auto, or on CPU fp32 (mixed_precision no)")
    # When each step record is written: the first one, less its elapsed_s, is when the loop started.
    stamps: list[tuple[float, dict[str, Any]]] = []
    log = MetricsLog.log

    def stamped_log(self, record):
        stamps.append((time.perf_counter(), dict(record)))
        return log(self, record)

    MetricsLog.log = stamped_log
    raw = bittune_config(data, out_dir)
    raw["train"]["shared_prefix"] = shared_prefix
    raw["train"].update({**(settings or {}), **data.get("bittune_train", {})})
    if dtype == "fp32":  # the explicit override: float32 whatever the CPU measured (what an AMD EPYC box gets)
        raw["train"]["mixed_precision"] = "no"
    result = train(config_from_dict(raw), progress=False)
    steps = [(t, r) for t, r in stamps if "elapsed_s" in r]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    return {
        "compute": summary["compute"],
        "tokens": summary["data"]["train"]["tokens"],
        "start": steps[0][0] - steps[0][1]["elapsed_s"],
        "end": steps[-1][0],
        "losses": [r["loss"] for _, r in steps],
    }


def child_proto(data: dict[str, Any], dtype: str, out_dir: Path, sampler: RssSampler) -> dict[str, Any]:
    """The levers harness with the levers that pay (see ``bench/step_levers.py``), compute dtype chosen by
    measurement as bittune will (``--dtypes fp32`` means "bittune's default" here, i.e. auto)."""
    import step_levers

    lv = step_levers.best_levers("auto" if dtype == "fp32" else dtype)
    return {**step_levers.run_epoch(data, lv, seed=SEED), "levers": step_levers.lv_name(lv)}


def child_main(args: argparse.Namespace) -> None:
    sampler = RssSampler()
    t0 = time.perf_counter()
    data = json.loads(args.data)
    run = {"trl": child_trl, "bittune": child_bittune, "bittune-noprefix": child_bittune_noprefix,
           "bittune-perbatch": child_bittune_perbatch, "proto": child_proto}[args.child]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"vs-trl-{args.child}-") as tmp:
        res = run(data, args.dtype, Path(tmp), sampler)
    sampler.stop()
    seconds = res["end"] - res["start"]
    out = {
        "tokens": res["tokens"],
        "seconds": round(seconds, 3),
        "tokens_per_s": round(res["tokens"] / seconds, 2),
        "peak_rss_mb": round(vm_kb("VmHWM") / 1024, 1),
        "peak_rss_load_mb": sampler.peak_mb(end=res["start"]),
        "peak_rss_train_mb": sampler.peak_mb(start=res["start"], end=res["end"]),
        "setup_s": round(res["start"] - t0, 1),
        **(cuda_peak() if data["device"] == "cuda" else {}),
        "losses": [round(x, 4) for x in res["losses"]],
        **{k: v for k, v in res.items() if k not in ("tokens", "start", "end", "losses")},
    }
    Path(args.result).write_text(json.dumps(out))


def cuda_peak() -> dict[str, float]:
    import torch

    return {"peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


# --- the parent ------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, the flags that decide bf16 speed, and library versions."""
    import platform

    import psutil
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            versions[pkg] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30),
        "flags": [f for f in wanted if f in flags],
        "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads(),
        "versions": versions,
    }


def run_child(
    side: str, data: dict[str, Any], dtype: str, threads: int, work: Path, passive: bool = True
) -> dict[str, Any]:
    result = work / f"result-{side}-{time.time_ns()}.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("OMP_WAIT_POLICY", None)
    if passive and side != "trl":
        # What bittune's CLI sets for itself before torch loads (bittune.threads.configure_omp); TRL runs with the
        # OpenMP defaults its users get.
        from bittune.threads import DEFAULTS

        env.update(DEFAULTS)
    cmd = [sys.executable, __file__, "--child", side, "--dtype", dtype, "--data", json.dumps(data)]
    t0 = time.time()
    proc = subprocess.run([*cmd, "--result", str(result)], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not result.exists():
        return {"error": (proc.stderr or proc.stdout)[-2000:], "wall_s": round(time.time() - t0, 1)}
    return {**json.loads(result.read_text()), "wall_s": round(time.time() - t0, 1)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "no runs"}
    tps = [r["tokens_per_s"] for r in ok]
    rss = [r["peak_rss_mb"] for r in ok]
    return {
        "runs": len(ok),
        "tokens": ok[0]["tokens"],
        "tokens_per_s": {"median": statistics.median(tps), "min": min(tps), "max": max(tps), "all": tps},
        "peak_rss_mb": {"median": statistics.median(rss), "min": min(rss), "max": max(rss), "all": rss},
        "peak_rss_train_mb": statistics.median(r["peak_rss_train_mb"] for r in ok),
        "peak_rss_load_mb": statistics.median(r["peak_rss_load_mb"] for r in ok),
        **({"levers": ok[0]["levers"]} if "levers" in ok[0] else {}),
        **({"peak_cuda_mb": statistics.median(r["peak_cuda_mb"] for r in ok)} if "peak_cuda_mb" in ok[0] else {}),
        **({"compute": ok[0]["compute"]} if "compute" in ok[0] else {}),
    }


def markdown(results: dict[str, Any], mach: dict[str, Any], args: argparse.Namespace, wall: float) -> str:
    cuda = args.device == "cuda"
    model = f"the model in {args.model}" if args.model else "SmolLM2-135M-Instruct"
    lines = [
        f"# bittune vs TRL + PEFT (LoRA, {'GPU' if cuda else 'CPU'})",
        "",
        (f"GPU: {mach['gpu']}; " if cuda else "")
        + f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']} GiB RAM; CPU flags: "
        f"{', '.join(mach['flags']) or 'none of avx512_bf16/amx'}; OMP_NUM_THREADS={args.threads}; "
        + ", ".join(f"{k} {v}" for k, v in mach["versions"].items() if v),
        "",
        f"{model}, LoRA r=16/alpha 32/dropout 0.05 all-linear, AdamW lr 2e-4, batch {args.batch} x "
        f"grad-accum {args.accum}, one epoch; {args.reps} repetitions per side, alternating, each run its own process. "
        "Tokens/s: real (non-padding) tokens of the epoch / time of the optimizer steps. Peak RSS: VmHWM of the "
        "run's process (load + train); train: the highest RSS sampled during the steps. "
        + (
            ""
            if args.no_passive
            else "bittune and proto run with OMP_WAIT_POLICY=PASSIVE (what bittune's CLI "
            "sets before torch loads), TRL with the OpenMP defaults."
        ),
        "",
        "| data | dtype | side | real tokens | tokens/s median (min-max) | peak RSS MB median (min-max) "
        "| RSS in train | vs TRL speed | vs TRL memory |" + (" peak CUDA MB |" if cuda else ""),
        "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    base_dtype = "fp32" if any(k.endswith("/fp32/trl") for k in results) else "bf16"
    memory = "peak_cuda_mb" if cuda else "peak_rss_mb"
    for key, agg in results.items():
        ds, dtype, side = key.split("/")
        if "error" in agg:
            lines.append(f"| {ds} | {dtype} | {side} | failed: {agg['error'].splitlines()[-1][:80]} | | | | | |")
            continue
        base = results.get(f"{ds}/{base_dtype}/trl", {})
        t, m = agg["tokens_per_s"], agg["peak_rss_mb"]
        speed = mem = ""
        if "error" not in base and base:
            speed = f"{t['median'] / base['tokens_per_s']['median']:.2f}x"
            mem_of = (lambda a: a[memory]["median"]) if not cuda else (lambda a: a[memory])
            mem = f"{mem_of(agg) / mem_of(base):.2f}x"
        label = f"{side} ({agg['levers']})" if "levers" in agg else side
        if "compute" in agg:
            c = agg["compute"]
            label += f" (mixed_precision {c['mixed_precision']}, {c['chosen_by']})"
        lines.append(
            f"| {ds} | {dtype} | {label} | {agg['tokens']:,} | {t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) "
            f"| {m['median']:,.0f} ({m['min']:,.0f}-{m['max']:,.0f}) | {agg['peak_rss_train_mb']:,.0f} "
            f"| {speed} | {mem} |" + (f" {agg.get('peak_cuda_mb', 0):,.0f} |" if cuda else "")
        )
    lines += [
        "",
        f"Ratios are against TRL {base_dtype} on the same data (medians); memory: "
        + ("peak CUDA memory allocated." if cuda else "peak RSS."),
        "",
        f"Command: `python bench/vs_trl.py {' '.join(sys.argv[1:])}` ({wall / 60:.1f} min).",
        "",
    ]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--sides", nargs="*", default=["trl", "bittune"], choices=SIDES)
    p.add_argument("--dtypes", nargs="*", default=["fp32", "auto"], choices=["fp32", "bf16", "auto"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-passive", action="store_true", help="bittune sides without OMP_WAIT_POLICY=PASSIVE")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of each data set's rows (quick runs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", help="a model folder (default: the demo's SmolLM2-135M-Instruct)")
    p.add_argument("--rows", type=int, help="rows per data set (default: each set's own, times --scale)")
    p.add_argument("--max-length", type=int, help="default: each data set's own")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--accum", type=int, default=ACCUM)
    p.add_argument("--bittune-train", default="{}",
                   help='bittune sides: train settings as JSON, e.g. \'{"max_tokens_per_pass": 512}\'')  # fmt: skip
    p.add_argument("--work", default="/tmp/bittune-vs-trl")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args)
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    t_all = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.model:
        model_dir()  # convert once, before any timed child
    data = write_data(work, args)
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.reps):
        order = args.sides if rep % 2 == 0 else list(reversed(args.sides))
        for ds in args.datasets:
            for dtype in args.dtypes:
                for side in order:
                    if side.startswith("bittune") != (dtype == "auto") and dtype != "fp32":
                        continue  # TRL: fp32 or bf16=True; bittune: fp32 (mixed_precision no) or its auto choice
                    r = run_child(side, data[ds], dtype, args.threads, work, passive=not args.no_passive)
                    runs.setdefault(f"{ds}/{dtype}/{side}", []).append(r)
                    brief = r.get("error", "").splitlines()[-1:] or [
                        f"{r['tokens']} tokens, {r['tokens_per_s']:.1f} tok/s, peak {r['peak_rss_mb']:,.0f} MB"
                    ]
                    print(f"rep {rep} {ds} {dtype} {side}: {brief[0]} ({r['wall_s']} s)", file=sys.stderr, flush=True)
    results = {k: aggregate(v) for k, v in runs.items()}
    mach = machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": mach, "args": vars(args), "results": results, "runs": runs}
    (out / "vs_trl.json").write_text(json.dumps(payload, indent=2))
    text = markdown(results, mach, args, time.time() - t_all)
    (out / "vs_trl.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
