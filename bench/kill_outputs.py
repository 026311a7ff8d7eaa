"""Kill safety of the commands that write models: SIGKILL quantize, merge and export at random moments.

On a tiny random Llama and a short LoRA run built in-process (offline), for each command:

1. one uninterrupted run gives the reference output (a folder or a .gguf file) and its duration;
2. then, ``--kills`` times, the same command is started into a fresh output path and killed with SIGKILL after a
   seeded random fraction of the reference duration (so kills land in start-up, loading, quantizing, writing the
   temp output, or just around the rename);
3. after each kill the output path must be either absent (the previous state) or byte-identical to the
   reference (the new, complete state) -- never a partial file or folder under the real name; and a re-run of the
   command into the same path must then either succeed with the reference bytes (absent before) or refuse with
   exit 2 because the path is taken (complete before), never trust or trip over a killed job's leftovers.

    python bench/kill_outputs.py [--kills 5] [--seed 1] [--out bench/results/kill_outputs.md]

Exits 1 on any violation. tests/test_kill_outputs.py kills the same commands at fixed points instead (half-way
through writing the weights, at the rename into place).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (argv after `bittune` with {run} and {out} placeholders, output suffix)
COMMANDS: dict[str, tuple[list[str], str]] = {
    "quantize int4": (
        ["quantize", "{run}", "--bits", "4", "--method", "int", "--group-size", "16", "--out", "{out}"],
        "",
    ),
    "merge": (["merge", "{run}", "--out", "{out}"], ""),
    "export gguf q8_0": (["export", "{run}", "--format", "gguf", "--type", "q8_0", "--out", "{out}"], ".gguf"),
    "export hf": (["export", "{run}", "--format", "hf", "--out", "{out}"], ""),
}


@dataclass
class Result:
    name: str
    ref_s: float = 0.0
    rows: list[tuple[float, str, str]] = field(default_factory=list)  # (kill after s, left behind, re-run)
    failures: list[str] = field(default_factory=list)


def comparable(path: Path) -> str | None:
    """A hash of a file's bytes or a folder's names and bytes (None when absent).

    Quality reports are left out: their timings differ from run to run (they are written in the same atomic step).
    """
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if f.name.startswith(("quant_report", "merge_report")):
            continue
        h.update(str(f.relative_to(path)).encode())
        h.update(_canonical_bytes(f))
    return h.hexdigest()


def _canonical_bytes(f: Path) -> bytes:
    """A file's bytes; for safetensors its tensors by name (the header's key order is not fixed from run to run)."""
    if f.suffix != ".safetensors":
        return f.read_bytes()
    from safetensors.torch import load_file

    tensors = load_file(f)
    return b"".join(
        name.encode() + tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        for name in sorted(tensors)
    )


def run(argv: list[str], timeout: float = 600) -> tuple[int, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bittune", *argv], capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in (0, 2):
        sys.stderr.write(proc.stderr[-2000:])
    return proc.returncode, time.perf_counter() - t0


def build_run(work: Path) -> Path:
    """A finished tiny LoRA run (adapter/ + run_config.yaml)."""
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train
    from tiny import color_chat_rows, make_tiny_llama, make_tokenizer, write_jsonl

    model = make_tiny_llama(work / "tiny-llama", make_tokenizer(), hidden=64)
    data = write_jsonl(work / "chat.jsonl", color_chat_rows(32))
    cfg = {
        "model": {"path": str(model)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "format": "chat", "max_length": 64, "eval_fraction": 0.25},
        "train": {"max_steps": 3, "batch_size": 4, "seed": 1},
        "output_dir": str(work / "run"),
    }
    return train(config_from_dict(cfg), progress=False).run_dir


def check_command(name: str, run_dir: Path, work: Path, kills: int, rng: random.Random) -> Result:
    template, suffix = COMMANDS[name]
    res = Result(name)

    def argv(out: Path) -> list[str]:
        return [a.format(run=run_dir, out=out) for a in template]

    # Every output gets the same file name (in its own folder): names end up inside outputs (model card title).
    leaf = f"{name.replace(' ', '-')}{suffix}"
    ref = work / "ref" / leaf
    ref.parent.mkdir(exist_ok=True)
    rc, res.ref_s = run(argv(ref))
    if rc != 0:
        res.failures.append(f"reference run exited {rc}")
        return res
    want = comparable(ref)
    for k in range(kills):
        out = work / f"kill{k}" / leaf
        out.parent.mkdir(exist_ok=True)
        delay = rng.uniform(0.3, 1.05) * res.ref_s
        proc = subprocess.Popen(
            [sys.executable, "-m", "bittune", *argv(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            proc.wait(timeout=delay)
            finished = True
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            finished = False
        got = comparable(out)
        left = "finished before the kill" if finished else ("nothing" if got is None else "complete output")
        if got is not None and got != want:
            res.failures.append(f"kill {k} after {delay:.1f}s left a partial or different {out.name}")
            left = "PARTIAL OUTPUT"
        rc, _ = run(argv(out))
        if got is None:
            again = "re-run wrote it" if rc == 0 and comparable(out) == want else f"RE-RUN FAILED (exit {rc})"
        else:
            # A complete output stays as it was: refused (exit 2), or replaced atomically by the same bytes (export hf).
            kept = comparable(out) == want
            again = {0: "re-run replaced it", 2: "re-run refused (exit 2)"}.get(rc) if kept else None
            again = again or f"RE-RUN WRONG (exit {rc})"
        if again.startswith("RE-RUN"):
            res.failures.append(f"kill {k}: {again}")
        res.rows.append((delay, left, again))
    return res


def render(results: list[Result], args: argparse.Namespace, wall_s: float) -> str:
    lines = [
        "# Kill safety of quantize, merge and export",
        "",
        f"`python bench/kill_outputs.py --kills {args.kills} --seed {args.seed}` ({wall_s:.0f} s). Each command is",
        "SIGKILLed after a random fraction (0.3-1.05) of its uninterrupted duration; the output path must then hold",
        "nothing or exactly the reference output, and a re-run must finish it (or refuse a complete one).",
        "",
        "| command | uninterrupted | kill after | left behind | re-run |",
        "|---|---:|---:|---|---|",
    ]
    for r in results:
        for delay, left, again in r.rows:
            lines.append(f"| {r.name} | {r.ref_s:.1f} s | {delay:.1f} s | {left} | {again} |")
    bad = [f"{r.name}: {f}" for r in results for f in r.failures]
    lines += ["", "Result: " + ("PASS" if not bad else "FAIL"), *[f"- {b}" for b in bad], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--commands", nargs="*", default=list(COMMANDS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bittune-kill-outputs-") as tmp:
        work = Path(tmp)
        run_dir = build_run(work)
        results = [check_command(name, run_dir, work, args.kills, rng) for name in args.commands]
    report = render(results, args, time.perf_counter() - t0)
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0 if all(not r.failures for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
