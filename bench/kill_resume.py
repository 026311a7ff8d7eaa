"""Kill safety: SIGKILL `bittune train` at random moments, resume each time, and demand a bit-identical result.

For each method (LoRA, full) on a tiny random Llama built in-process (tests/tiny.py, offline):

1. one uninterrupted run gives the reference weights and metrics;
2. a second run in a fresh output_dir is killed with SIGKILL at ``--kills`` points drawn with a seeded RNG across
   the run (a step and a fraction of a step's time after that step is logged, so a kill can land in the forward,
   the backward, the checkpoint write, the pruning or the final save), and restarted with ``--resume`` after
   every kill (a kill before the first checkpoint restarts from scratch; a kill after the final save makes
   ``--resume`` answer "already finished", exit 2, which counts as done);
3. after every kill: the killed job's ``.lock`` is left behind (the next job must find it stale and go on),
   the newest complete checkpoint loads, every other ``checkpoints/step-N`` is complete (a half-deleted one left
   by a kill during pruning is reported on its own), leftover ``.tmp-*`` folders are never listed by
   ``list_checkpoints``, and ``metrics.jsonl`` parses (a torn last line, which a real kill can leave and which is
   also appended on purpose here, must be ignored by ``read_metrics`` and dropped by the resume);
4. at the end: every tensor of the final safetensors file is ``torch.equal`` to the reference, and the metrics
   read like the uninterrupted run (steps 1..N once each, same losses, lrs and gradient norms).

The named checks and their results go to a markdown report (``CHECKS`` below lists them), with one table row per
kill: when it came, what it hit, what it left.

    python bench/kill_resume.py [--kills 10] [--seed 1] [--steps 40] [--save-every 1] [--methods lora full]
                                [--out bench/results/kill_resume.md] [--sabotage rng|data] [--launcher fork]

Exits 1 on any mismatch. ``--sabotage rng`` (resumed jobs skip restoring the RNG state) and ``--sabotage data``
(resumed jobs restart their epoch from its first batch) break resume on purpose, to show the check fails.
``--launcher fork`` starts jobs by forking a process that has already imported torch/transformers/peft (about
1 s instead of about 10 s per start on 2 cores); tests/test_kill_resume.py uses it to stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # the tiny offline model and data builders the tests use
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LOOP_START = "bittune: "  # the recipe's first progress note, printed after resume loading, just before the loop
FINAL_FILE = {"lora": "adapter/adapter_model.safetensors", "full": "model/model.safetensors"}
CHECKPOINT_FILES = ("weights.safetensors", "optimizer.pt", "scheduler.json", "rng.pt", "state.json", "COMPLETE")
KEEP_LAST = 2  # train.keep_last of the runs
TEMP_PREFIXES = (".tmp-", ".old-", ".del-")  # folders bittune writes or deletes under a hidden name (pid at the end)
TORN_TAIL = '{"step": 999999, "loss": 1.2'  # an unterminated record, as a kill in the middle of a write leaves it

# Code run in a resumed job before bittune's CLI, to break resume on purpose (--sabotage).
SABOTAGE = {
    "rng": "import bittune.training.checkpoint as c\nc.restore_rng = lambda rng: None\n",
    "data": (
        "import bittune.training.checkpoint as c\n"
        "_load = c.load_checkpoint\n"
        "def _lose_position(*a, **k):\n"
        "    state = _load(*a, **k)\n"
        "    state.step_in_epoch = 0\n"
        "    return state\n"
        "c.load_checkpoint = _lose_position\n"
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Launching jobs


class Job:
    """One `bittune train` process whose stdout/stderr go to files (so they can be read while it runs)."""

    def __init__(self, pid: int, log: Path, started: float, waiter: Callable[[float | None], int | None]) -> None:
        self.pid, self.log, self.started = pid, log, started
        self._wait = waiter
        self.returncode: int | None = None
        self.loop_started_at: float | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._wait(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            self.returncode = self._wait(timeout)
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own a moment ago
            os.kill(self.pid, signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def loop_started(self) -> bool:
        """Whether the training loop has begun (resume loading and metrics truncation are done by then)."""
        if self.loop_started_at is None and any(line.startswith(LOOP_START) for line in self.output().splitlines()):
            self.loop_started_at = time.perf_counter()
        return self.loop_started_at is not None


def _argv(config: Path, resume: bool) -> list[str]:
    return ["train", str(config), *(["--resume"] if resume else [])]


class SubprocessLauncher:
    """``python -m bittune train CONFIG [--resume]``: exactly what a user runs."""

    name = "subprocess"

    def start(self, config: Path, resume: bool, log: Path, sabotage: str | None = None) -> Job:
        cmd = [sys.executable, "-m", "bittune", *_argv(config, resume)]
        if sabotage:
            cmd = [sys.executable, "-c", SABOTAGE[sabotage] + "from bittune.cli import main\nmain()", *cmd[3:]]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def wait(timeout: float | None) -> int | None:
            if timeout == 0:
                return proc.poll()
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None

        return Job(proc.pid, log, time.perf_counter(), wait)

    def close(self) -> None:
        pass


# The fork server imports everything once, then forks one child per job. It never runs a torch op itself, so
# the children start with no OpenMP thread pool to inherit. Children are reaped only when asked ("wait"), so a
# killed job's pid stays a zombie -- alive to os.kill(pid, 0) -- until the harness has seen it die.
_FORK_SERVER = r"""
import json, os, sys, traceback
out = os.fdopen(os.dup(1), "w")  # the reply channel; anything else printed to stdout goes to stderr (discarded)
os.dup2(2, 1)
import torch, transformers, peft, accelerate, safetensors.torch
import bittune.cli, bittune.recipes.finetune, bittune.data, bittune.model
import bittune.training.checkpoint, bittune.training.evaluate, bittune.training.optim, bittune.training.metrics
print(json.dumps({"ready": True}), file=out, flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        flags = 0 if req.get("block") else os.WNOHANG
        pid, status = os.waitpid(req["wait"], flags)
        rc = None if pid == 0 else (os.waitstatus_to_exitcode(status))
        print(json.dumps({"rc": rc}), file=out, flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        code = 0
        try:
            if req.get("sabotage"):
                exec(req["sabotage"], {})
            bittune.cli.main(req["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), file=out, flush=True)
"""


class ForkLauncher:
    """Forks jobs from a warm process: each start costs about a second instead of a full Python + torch import."""

    name = "fork"

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._ask(None)  # wait for "ready"

    def _ask(self, request: dict[str, Any] | None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def start(self, config: Path, resume: bool, log: Path, sabotage: str | None = None) -> Job:
        request = {"argv": _argv(config, resume), "log": str(log), "sabotage": SABOTAGE[sabotage] if sabotage else ""}
        pid = self._ask(request)["pid"]

        def wait(timeout: float | None) -> int | None:
            if timeout == 0:
                return self._ask({"wait": pid})["rc"]
            deadline = None if timeout is None else time.perf_counter() + timeout
            while deadline is None or time.perf_counter() < deadline:
                rc = self._ask({"wait": pid})["rc"]
                if rc is not None:
                    return rc
                time.sleep(0.02)
            return None

        return Job(pid, log, time.perf_counter(), wait)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# The run under test


def build_assets(work: Path, rows: int = 64) -> tuple[Path, Path]:
    """A tiny random Llama with its tokenizer, and a learnable chat data file (both offline, in ``work``)."""
    from tiny import color_chat_rows, make_tiny_llama, make_tokenizer, write_jsonl

    model = work / "tiny-llama"
    if not (model / "config.json").is_file():
        make_tiny_llama(model, make_tokenizer())
    return model, write_jsonl(work / "chat.jsonl", color_chat_rows(rows))


def write_config(path: Path, *, model: Path, data: Path, method: str, steps: int, save_every: int, out: Path) -> Path:
    """A config whose result depends on everything resume must restore: RNG (dropout), data order, optimizer,
    schedule (warmup + cosine), best eval (checkpoint pruning keeps it)."""
    cfg = {
        "model": {"path": str(model)},
        "method": method,
        **({"lora": {"r": 8, "alpha": 16, "dropout": 0.1}} if method == "lora" else {}),
        "data": {"train": str(data), "format": "chat", "max_length": 64, "eval_fraction": 0.1},
        "train": {
            "batch_size": 8,
            "lr": 1e-2 if method == "lora" else 3e-3,
            "max_steps": steps,
            "seed": 1,
            "scheduler": "cosine",
            "warmup_steps": 3,
            "save_every": save_every,
            "eval_every": 5,
            "keep_last": KEEP_LAST,
        },
        "output_dir": str(out),
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def metrics_lines(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(complete records, torn tail or None); raises ValueError if a *terminated* line does not parse."""
    if not path.is_file():
        return [], None
    text = path.read_text(encoding="utf-8")
    *complete, tail = text.split("\n")
    records = []
    for n, line in enumerate(complete, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"metrics.jsonl line {n} is complete but not JSON: {line[:80]!r}") from None
    return records, (tail or None)


def logged_step(path: Path) -> int:
    """Highest training step in ``metrics.jsonl`` (0 when none)."""
    from bittune.training.metrics import read_metrics

    try:
        return max((r["step"] for r in read_metrics(path) if "loss" in r), default=0)
    except OSError:
        return 0


# What is verified, by name; a method passes when no check recorded a failure.
CHECKS = {
    "weights": "final weights bit-identical to the uninterrupted run (torch.equal on every tensor)",
    "metrics": "metrics.jsonl reads like the uninterrupted run: steps 1..N once each, same loss/lr/grad_norm, "
    "same eval records",
    "jobs": "every job was killed, ran to the end, or answered 'already finished' (exit 2); nothing else",
    "stale lock": "the killed job's .lock stays behind and the next job takes it over as stale",
    "resume point": "after every kill the newest complete checkpoint (what --resume loads) has all its files and loads",
    "temp folders": ".tmp-*/.old-*/.del-* folders come only from killed jobs and list_checkpoints never returns "
    "them (also a planted .tmp-* one holding COMPLETE and state.json)",
    "temp sweep": "the temp folders of killed jobs are gone once a later job has started (none at the end)",
    "torn metrics line": "every terminated line of metrics.jsonl parses; read_metrics ignores the torn last line",
    "checkpoint folders": "every other checkpoints/step-N folder has all its files (COMPLETE included) and loads",
    "atomic pruning": "no checkpoint being pruned is left half-deleted (a step-N folder missing some of its files)",
}


@dataclass
class Kill:
    """One SIGKILL and what it left behind."""

    index: int
    target_step: int
    target_frac: float
    pid: int = 0
    at_s: float = 0.0  # seconds after the job was launched
    in_loop_s: float | None = None  # seconds after its training loop started (None: killed before)
    logged_step: int = 0
    phase: str = ""
    checkpoint: str = "none"  # newest complete checkpoint after the kill: where the next job resumes
    lock_left: str = ""
    temp_dirs: int = 0
    torn_by_kill: bool = False  # the kill itself left an unterminated last line in metrics.jsonl
    next_job: str = ""


@dataclass
class MethodResult:
    """Everything one method's kill-and-resume experiment measured."""

    method: str
    failures: dict[str, list[str]] = field(default_factory=lambda: {name: [] for name in CHECKS})
    kills: list[Kill] = field(default_factory=list)
    launches: int = 0
    reference_wall_s: float = 0.0
    killed_wall_s: float = 0.0
    step_time_s: float = 0.0
    tensors_compared: int = 0
    leftover_temp_dirs: list[str] = field(default_factory=list)
    half_deleted: set[str] = field(default_factory=set)
    finished_by: str = ""

    def fail(self, check: str, text: str) -> None:
        self.failures[check].append(text)

    @property
    def ok(self) -> bool:
        return not any(self.failures.values())


def draw_kills(n: int, seed: int, steps: int) -> list[tuple[int, float]]:
    """``n`` sorted kill points over the run: (step after whose log record to wait, fraction of a step's time).

    Step 0 means "right after the loop starts" (before the first checkpoint); step ``steps`` lands in the final
    eval and save.
    """
    rng = random.Random(seed)
    points = sorted(rng.uniform(0, steps + 1) for _ in range(n))
    return [(int(p), p - int(p)) for p in points]


def _loadable(path: Path) -> str | None:
    """None if the checkpoint folder has every file and they load, else what is wrong."""
    from safetensors.torch import load_file

    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        return f"lacks {', '.join(missing)}"
    try:
        load_file(path / "weights.safetensors")
        json.loads((path / "state.json").read_text())
        json.loads((path / "scheduler.json").read_text())
    except Exception as exc:  # anything unreadable in a folder marked complete is a failure
        return f"is marked COMPLETE but unreadable ({type(exc).__name__}: {exc})"
    return None


def _check_checkpoints(run_dir: Path, killed_pids: set[int], res: MethodResult, when: str) -> list[str]:
    """Check every entry of ``checkpoints/`` (see CHECKS); returns the temp folders found."""
    from bittune.training.checkpoint import list_checkpoints

    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    listed = list_checkpoints(root)
    steps = sorted((p for p in root.iterdir() if p.name.startswith("step-")), key=lambda p: int(p.name[5:]))
    broken = {p: why for p in steps if (why := _loadable(p))}
    intact = [p for p in steps if p not in broken]
    temps = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(TEMP_PREFIXES):
            temps.append(p.name)
            pid = p.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) not in killed_pids:
                res.fail("temp folders", f"{when}: {p.name} belongs to no killed job")
            if p in listed:
                res.fail("temp folders", f"{when}: list_checkpoints returned the temp folder {p.name}")
        elif not p.name.startswith("step-"):
            res.fail("checkpoint folders", f"{when}: unexpected entry checkpoints/{p.name}")
    if listed and listed[-1] in broken:
        res.fail("resume point", f"{when}: the newest complete checkpoint {listed[-1].name} {broken[listed[-1]]}")
    for p, why in broken.items():
        if listed and p == listed[-1]:
            continue
        # Older than the keep_last newest intact ones: prune_checkpoints was deleting it when the job died.
        if sum(int(q.name[5:]) > int(p.name[5:]) for q in intact) >= KEEP_LAST:
            if p.name not in res.half_deleted:
                res.fail("atomic pruning", f"{when}: {p.name} {why}")
                res.half_deleted.add(p.name)
        else:
            res.fail("checkpoint folders", f"{when}: {p.name} {why}")
    return temps


def _phase(job: Job, run_dir: Path, method: str, half_deleted_before: set[str], res: MethodResult) -> str:
    final = run_dir / ("adapter" if method == "lora" else "model")
    ckpts = run_dir / "checkpoints"
    ckpt_temps = list(ckpts.glob(f".tmp-*-{job.pid}")) if ckpts.is_dir() else []
    if ckpt_temps:
        return f"checkpoint write (step {ckpt_temps[0].name.split('-')[2]})"
    if new := sorted(res.half_deleted - half_deleted_before):
        return f"checkpoint pruning ({', '.join(new)}, deleted in place)"
    if doomed := (list(ckpts.glob(f".del-*-{job.pid}")) if ckpts.is_dir() else []):
        return f"checkpoint pruning ({doomed[0].name.split('-')[1]}-{doomed[0].name.split('-')[2]}, renamed away)"
    if list(run_dir.glob(f".tmp-{final.name}-{job.pid}")):
        return "final save"
    if final.is_dir():
        return "after final save"
    if job.loop_started_at is None:
        return "startup (before the loop)"
    return "training step"


def _kill_at(job: Job, metrics: Path, step: int, frac: float, step_time: float, timeout: float) -> bool:
    """SIGKILL ``job`` ``frac`` of a step after it logs ``step`` (0: after its loop starts); False if it ended."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if job.poll() is not None:
            return False
        # Records from before this job's loop started may belong to the previous job (resume cuts them back).
        if job.loop_started() and (step == 0 or logged_step(metrics) >= step):
            time.sleep(frac * step_time)
            if job.poll() is not None:
                return False
            job.kill()
            return True
        time.sleep(0.005)
    job.kill()
    raise TimeoutError(f"job {job.pid} did not reach step {step} within {timeout:.0f} s")


def _inspect_kill(
    index: int, step: int, frac: float, job: Job, run_dir: Path, method: str, killed: set[int], res: MethodResult
) -> Kill:
    """What a kill left: checkpoints, lock, temp folders, metrics (appending a torn record to it)."""
    from bittune.training.checkpoint import list_checkpoints
    from bittune.training.metrics import read_metrics

    now = time.perf_counter()
    k = Kill(index, step, round(frac, 3), pid=job.pid, at_s=round(now - job.started, 2))
    k.in_loop_s = round(now - job.loop_started_at, 2) if job.loop_started_at else None
    metrics = run_dir / "metrics.jsonl"
    k.logged_step = logged_step(metrics)
    when = f"after kill {index}"
    half_deleted_before = set(res.half_deleted)
    k.temp_dirs = len(_check_checkpoints(run_dir, killed, res, when))
    k.phase = _phase(job, run_dir, method, half_deleted_before, res)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    k.checkpoint = ckpts[-1].name if ckpts else "none"
    if (run_dir / ("adapter" if method == "lora" else "model")).is_dir():
        k.next_job = "already finished (exit 2)"
    else:
        k.next_job = f"resumes from {k.checkpoint}" if ckpts else "starts over (no checkpoint yet)"
    lock = run_dir / ".lock"
    if lock.is_file():
        try:
            holder = json.loads(lock.read_text()).get("pid")
        except ValueError:
            holder = "unreadable"  # killed between creating the lock and writing it: also stale
        k.lock_left = f"pid {holder}" + (" (the killed job)" if holder == job.pid else "")
        if holder not in (job.pid, "unreadable"):
            res.fail("stale lock", f"{when}: .lock names pid {holder}, not the killed job {job.pid}")
    else:
        k.lock_left = "none"
    try:
        records, tail = metrics_lines(metrics)
    except ValueError as exc:
        res.fail("torn metrics line", f"{when}: {exc}")
        return k
    if metrics.is_file():
        k.torn_by_kill = tail is not None
        if tail is None:
            # A real kill rarely tears a 200-byte append: add a torn record so that every resume must cope with one.
            with open(metrics, "a", encoding="utf-8") as f:
                f.write(TORN_TAIL)
        if read_metrics(metrics) != records:
            res.fail("torn metrics line", f"{when}: read_metrics did not return exactly the complete records")
    return k


def _train_records(path: Path) -> tuple[list[tuple], list[tuple]]:
    from bittune.training.metrics import read_metrics

    recs = read_metrics(path)
    train = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in recs if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    return train, evals


def _job_failed(res: MethodResult, what: str, job: Job, rc: int | None) -> None:
    job.kill()
    out = job.output()
    check = "stale lock" if "in use by another bittune job" in out else "jobs"
    res.fail(check, f"{what} (pid {job.pid}) ended with exit {rc}: {out[-1500:]}")


def run_method(
    method: str,
    *,
    work: Path,
    launcher: SubprocessLauncher | ForkLauncher,
    kills: int,
    seed: int,
    steps: int,
    save_every: int,
    sabotage: str | None = None,
    job_timeout: float = 300.0,
    log: Callable[[str], None] = print,
) -> MethodResult:
    """Reference run, then a run killed ``kills`` times and resumed; compare. See the module docstring."""
    import torch
    from safetensors.torch import load_file

    from bittune.training.checkpoint import list_checkpoints
    from bittune.training.metrics import read_metrics

    res = MethodResult(method)
    model, data = build_assets(work)
    ref_dir, run_dir = work / f"{method}-reference", work / f"{method}-killed"
    for d in (ref_dir, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    common = {"model": model, "data": data, "method": method, "steps": steps, "save_every": save_every}
    ref_cfg = write_config(work / f"{method}-reference.yaml", out=ref_dir, **common)
    cfg = write_config(work / f"{method}-killed.yaml", out=run_dir, **common)

    # 1. The uninterrupted reference.
    t0 = time.perf_counter()
    job = launcher.start(ref_cfg, False, work / f"{method}-reference.log")
    rc = job.wait(job_timeout)
    res.reference_wall_s = time.perf_counter() - t0
    if rc != 0:
        _job_failed(res, "the reference run", job, rc)
        return res
    ref_train, ref_evals = _train_records(ref_dir / "metrics.jsonl")
    last = [r for r in read_metrics(ref_dir / "metrics.jsonl") if "loss" in r][-1]
    res.step_time_s = last["elapsed_s"] / last["step"]
    log(f"[{method}] reference: {res.reference_wall_s:.1f} s, {res.step_time_s * 1000:.0f} ms/step")

    # 2. The same run, killed at random points and resumed after each kill.
    killed_pids: set[int] = set()
    t0 = time.perf_counter()
    resume = False
    for i, (step, frac) in enumerate(draw_kills(kills, seed, steps), start=1):
        job = launcher.start(cfg, resume, work / f"{method}-job{i}.log", sabotage if resume else None)
        res.launches += 1
        killed = _kill_at(job, run_dir / "metrics.jsonl", step, frac, res.step_time_s, job_timeout)
        rc = job.wait(job_timeout)  # reap it: only then is its pid really gone
        if not killed or rc != -signal.SIGKILL:
            if rc == 0:
                res.finished_by = f"job {i} ran to the end before kill point {i}"
                break
            if rc == 2 and "already finished" in job.output():
                res.finished_by = f"job {i}: --resume said the run had already finished (exit 2)"
                break
            _job_failed(res, f"job {i}", job, rc)
            return res
        killed_pids.add(job.pid)
        resume = True
        res.kills.append(k := _inspect_kill(i, step, frac, job, run_dir, method, killed_pids, res))
        log(f"[{method}] kill {i}: pid {job.pid} at {k.at_s:.2f} s, step {k.logged_step}, {k.phase}; {k.next_job}")
    else:
        # Every kill point was used: let the last job run to the end.
        job = launcher.start(cfg, True, work / f"{method}-final.log", sabotage)
        res.launches += 1
        rc = job.wait(job_timeout)
        if rc == 0:
            res.finished_by = "the job after the last kill ran to the end"
        elif rc == 2 and "already finished" in job.output():
            res.finished_by = "the last kill came after the final save: --resume said 'already finished' (exit 2)"
        else:
            _job_failed(res, "the final job", job, rc)
            return res
    res.killed_wall_s = time.perf_counter() - t0

    # 3. Compare with the reference.
    final, ref_final = run_dir / FINAL_FILE[method], ref_dir / FINAL_FILE[method]
    if not final.is_file():
        res.fail("weights", f"no {FINAL_FILE[method]} after the last job")
    else:
        a, b = load_file(ref_final), load_file(final)
        if a.keys() != b.keys():
            res.fail("weights", f"tensor names differ: {sorted(a.keys() ^ b.keys())[:5]}")
        differ = sorted(name for name in a.keys() & b.keys() if not torch.equal(a[name], b[name]))
        res.tensors_compared = len(a.keys() & b.keys())
        if differ:
            res.fail("weights", f"{len(differ)} of {len(a)} tensors differ from the reference, e.g. {differ[0]}")
    got_train, got_evals = _train_records(run_dir / "metrics.jsonl")
    if [r[0] for r in got_train] != list(range(1, steps + 1)):
        res.fail("metrics", f"train steps logged are not 1..{steps} once each: {[r[0] for r in got_train]}")
    elif got_train != ref_train:
        first = next(i for i, (x, y) in enumerate(zip(got_train, ref_train)) if x != y)
        res.fail("metrics", f"logged loss/lr/grad_norm differ from the reference from step {first + 1} on")
    if got_evals != ref_evals:
        res.fail("metrics", f"eval records differ from the reference: {got_evals} vs {ref_evals}")
    res.leftover_temp_dirs = _check_checkpoints(run_dir, killed_pids, res, "at the end")
    res.leftover_temp_dirs += sorted(p.name for p in run_dir.iterdir() if p.name.startswith(TEMP_PREFIXES))
    # A job that starts sweeps what killed jobs left; only a job refused as "already finished" never starts, so
    # the folders of the last killed job may stay then.
    spared = f"-{res.kills[-1].pid}" if res.kills and "already finished" in res.finished_by else "-none"
    stale = [t for t in res.leftover_temp_dirs if not t.endswith(spared)]
    if stale:
        res.fail("temp sweep", f"left at the end: {', '.join(stale)}")
    # A folder that looks complete but sits under a temp name must still never be listed.
    fake = run_dir / "checkpoints" / ".tmp-step-999999-1"
    shutil.copytree(list_checkpoints(ref_dir / "checkpoints")[-1], fake)
    if fake in list_checkpoints(run_dir / "checkpoints"):
        res.fail("temp folders", "list_checkpoints returns a .tmp-* folder that holds COMPLETE and state.json")
    shutil.rmtree(fake)
    return res


# ---------------------------------------------------------------------------------------------------------------
# Report


def render_report(results: list[MethodResult], args: argparse.Namespace, command: str, wall_s: float) -> str:
    """The markdown written to ``--out``."""
    import torch

    ok = all(r.ok for r in results)
    lines = [
        "# Kill safety: SIGKILL at random moments, resume, compare",
        "",
        f"Result: **{'PASS' if ok else 'FAIL'}** — total wall time {wall_s:.0f} s.",
        "",
        *(
            [
                "Failed checks: "
                + "; ".join(f"{name} ({r.method})" for r in results for name, fails in r.failures.items() if fails)
                + ".",
                "",
            ]
            if not ok
            else []
        ),
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}; jobs started by {args.launcher}"
        + (" (`python -m bittune train CONFIG [--resume]`)" if args.launcher == "subprocess" else "")
        + (f"; SABOTAGE: resumed jobs run with `--sabotage {args.sabotage}`" if args.sabotage else "")
        + ".",
        "",
        f"Run: tiny random Llama (2 layers, hidden 32, tests/tiny.py), 64 chat rows (10% held out for eval), "
        f"{args.steps} steps of batch 8, `save_every: {args.save_every}`, `eval_every: 5`, `keep_last: {KEEP_LAST}`, "
        "cosine schedule with 3 warmup steps, LoRA dropout 0.1 (so the RNG state matters). "
        f"{args.kills} kill points drawn with `random.Random({args.seed})` uniformly over steps 0..{args.steps}+1; "
        "each kill waits for the target step's metrics record, then that fraction of the reference run's mean step "
        "time. After every kill a torn record is appended to metrics.jsonl unless the kill left one.",
        "",
    ]
    for r in results:
        hits = sum(k.phase.startswith("checkpoint write") for k in r.kills)
        lines += [
            f"## {r.method}: {'PASS' if r.ok else 'FAIL'}",
            "",
            f"Reference run {r.reference_wall_s:.1f} s ({r.step_time_s * 1000:.0f} ms/step in the loop); killed "
            f"run {r.killed_wall_s:.1f} s over {r.launches} jobs; {len(r.kills)} kills ({hits} during a checkpoint "
            f"write); finished: {r.finished_by or 'no'}; {r.tensors_compared} tensors compared.",
            "",
            "| check | result |",
            "|---|---|",
            *(
                f"| {text} | {'ok' if not r.failures[name] else 'FAIL: ' + '; '.join(r.failures[name])} |"
                for name, text in CHECKS.items()
            ),
            "",
            "| kill | target: step + fraction | pid | killed at, s (after launch / in loop) | last logged step | "
            "what it hit | newest complete checkpoint | .lock left | temp dirs | torn metrics line | next job |",
            "|---:|---|---:|---|---:|---|---|---|---:|---|---|",
        ]
        for k in r.kills:
            in_loop = f"{k.in_loop_s:.2f}" if k.in_loop_s is not None else "before loop"
            lines.append(
                f"| {k.index} | {k.target_step} + {k.target_frac:.3f} | {k.pid} | {k.at_s:.2f} / {in_loop} | "
                f"{k.logged_step} | {k.phase} | {k.checkpoint} | {k.lock_left} | {k.temp_dirs} | "
                f"{'by the kill' if k.torn_by_kill else 'appended'} | {k.next_job} |"
            )
        if r.leftover_temp_dirs:
            lines += [
                "",
                f"Temp folders of killed jobs still on disk at the end: {', '.join(r.leftover_temp_dirs)}.",
            ]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kill_resume.md")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temp dir, removed)")
    parser.add_argument("--sabotage", choices=sorted(SABOTAGE), default=None)
    parser.add_argument("--launcher", choices=["subprocess", "fork"], default="subprocess")
    args = parser.parse_args(argv)

    command = "python bench/kill_resume.py " + " ".join(sys.argv[1:] if argv is None else argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bittune-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    launcher = ForkLauncher() if args.launcher == "fork" else SubprocessLauncher()
    t0 = time.perf_counter()
    try:
        results = [
            run_method(
                m, work=work, launcher=launcher, kills=args.kills, seed=args.seed, steps=args.steps,
                save_every=args.save_every, sabotage=args.sabotage,
            )
            for m in args.methods
        ]  # fmt: skip
    finally:
        launcher.close()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report = render_report(results, args, command.strip(), time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    print(report)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
