"""``bittune ladder CONFIG --target "accuracy>=0.85"``: QLoRA, then LoRA, then full fine-tuning on the same data,
stopping at the first rung that meets the target.

Each rung is a normal ``bittune train`` run in its own process (so its peak memory and time are its own), written
to ``OUTPUT_DIR/<rung>``, then measured with :mod:`bittune.evaluation` on the config's eval file. ``ladder.json``
and ``ladder.md`` in ``OUTPUT_DIR`` put every rung's quality, peak memory and time side by side.
"""

from __future__ import annotations

import json
import operator
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError, ConfigError
from bittune.storage import read_json

RUNGS = ("qlora", "lora", "full")
LADDER_FILE = "ladder.json"
# metric name -> (where it is in an evaluation result, for causal LMs / for classifiers)
METRICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "accuracy": (("generation", "accuracy"), ("eval_accuracy",)),
    "ranking_accuracy": (("ranking", "accuracy"), ("eval_accuracy",)),
    "f1": (("generation", "f1_macro"), ("eval_f1_macro",)),
    "loss": (("eval_loss",), ("eval_loss",)),
    "perplexity": (("eval_perplexity",), ()),
}
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Target:
    metric: str
    op: str
    value: float

    def met(self, measured: float | None) -> bool:
        return measured is not None and _OPS[self.op](measured, self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_target(text: str) -> Target:
    """``"accuracy>=0.85"`` -> Target; a clear error naming the metrics and operators otherwise."""
    m = re.fullmatch(r"\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*", text)
    if not m or m.group(1) not in METRICS:
        raise ConfigError(
            f"--target {text!r}: expected METRIC OP VALUE",
            hint=f"e.g. --target 'accuracy>=0.85'; metrics: {', '.join(METRICS)}; operators: >=, >, <=, <",
        )
    try:
        return Target(m.group(1), m.group(2), float(m.group(3)))
    except ValueError:
        raise ConfigError(f"--target {text!r}: {m.group(3)!r} is not a number") from None


def rung_raw(raw: dict[str, Any], method: str, out: Path) -> dict[str, Any]:
    """The config of one rung: the user's, with ``method`` (and its sections) changed and its own output_dir."""
    cfg = json.loads(json.dumps(raw))  # a deep copy
    cfg["method"] = method
    cfg["output_dir"] = str(out / method)
    if method == "qlora":
        cfg["quant"] = cfg.get("quant") or {"bits": 4}
    else:
        cfg.pop("quant", None)
    if method == "full":
        cfg.pop("lora", None)
    return cfg


def _value(result: dict[str, Any], target: Target, task: str) -> float | None:
    cur: Any = result
    for key in METRICS[target.metric][1 if task == "classification" else 0]:
        cur = cur.get(key) if isinstance(cur, dict) else None
    return cur if isinstance(cur, int | float) else None


def _train_rung(config_file: Path, log: Log) -> float:
    """``bittune train`` in a child process (its memory and time are the rung's own); returns wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bittune", "train", str(config_file)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BittuneError(f"ladder rung {config_file.stem} failed to train: " + " / ".join(tail))
    return time.perf_counter() - t0


def _check(cfg: Any, target: Target, rungs: tuple[str, ...]) -> None:
    if not cfg.data.eval:
        raise ConfigError(
            "the ladder measures each rung on data.eval, and the config has none",
            hint="set data.eval to a held-out file (eval_fraction rows are not kept as a file)",
        )
    if target.metric == "perplexity" and cfg.model.task == "classification":
        raise ConfigError("--target perplexity applies to causal LMs", hint="use accuracy, f1 or loss")
    for r in rungs:
        if r not in RUNGS:
            raise ConfigError(f"--rungs: unknown rung {r!r}", hint=f"choose from {', '.join(RUNGS)}")


def run_ladder(
    config: Path, target: str, *, overrides: list[str] | None = None, rungs: tuple[str, ...] = RUNGS, log: Log = _quiet
) -> dict[str, Any]:
    """Train the rungs in order until one meets ``target``; writes ``ladder.json`` / ``ladder.md`` in output_dir."""
    import yaml

    from bittune.config import config_from_dict, load_config
    from bittune.evaluation.core import evaluate_path
    from bittune.storage import atomic_write_text

    cfg = load_config(config, overrides or [])
    goal = parse_target(target)
    _check(cfg, goal, rungs)
    raw = json.loads(json.dumps(cfg.model_dump(mode="json")))
    out = Path(cfg.output_dir)
    configs = {r: config_from_dict(rung_raw(raw, r, out), source=f"{config} (rung {r})") for r in rungs}  # all now
    out.mkdir(parents=True, exist_ok=True)
    labels = "auto" if goal.metric in ("accuracy", "ranking_accuracy", "f1") else None
    result: dict[str, Any] = {"config": str(config), "target": asdict(goal), "rungs": [], "met": None}
    for rung in rungs:
        file = out / f"{rung}.yaml"
        atomic_write_text(file, yaml.safe_dump(configs[rung].model_dump(mode="json"), sort_keys=False))
        log(f"ladder: {rung} ...")
        seconds = _train_rung(file, log)
        run_dir = Path(configs[rung].output_dir)
        metrics = evaluate_path(str(run_dir), labels=labels, device=configs[rung].train.device)
        value = _value(metrics, goal, cfg.model.task)
        summary = read_json(run_dir / "summary.json")
        mem = summary.get("memory") or {}
        entry = {
            "rung": rung,
            "run_dir": str(run_dir),
            goal.metric: value,
            "met": goal.met(value),
            "peak_memory_mb": mem.get("peak_cuda_allocated_mb", mem.get("peak_rss_mb")),
            "memory_kind": "CUDA allocated" if "peak_cuda_allocated_mb" in mem else "process RSS",
            "weights_mb": mem.get("weights_mb"),
            "trainable_parameters": summary.get("trainable_parameters"),
            "train_s": round(seconds, 1),
            "eval_loss": metrics.get("eval_loss"),
        }
        result["rungs"].append(entry)
        log(f"ladder: {rung}: {goal.metric} {value if value is None else round(value, 4)} -> "
            + ("meets" if entry["met"] else "misses") + f" {goal}")  # fmt: skip
        if entry["met"]:
            result["met"] = rung
            break
    atomic_write_text(out / LADDER_FILE, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "ladder.md", ladder_markdown(result))
    return result


def ladder_markdown(result: dict[str, Any]) -> str:
    """The ladder's table: one row per rung that ran."""
    goal = Target(**result["target"])
    lines = [
        f"# Method ladder: target {goal}",
        "",
        f"Stopped at: **{result['met']}**." if result["met"] else "No rung met the target.",
        "",
        f"| rung | {goal.metric} | meets target | peak memory (MB) | weights (MB) | trainable parameters | train (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rungs"]:
        value = "-" if r[goal.metric] is None else f"{r[goal.metric]:.4g}"
        lines.append(
            f"| {r['rung']} | {value} | {'yes' if r['met'] else 'no'} | {r['peak_memory_mb']} ({r['memory_kind']}) "
            f"| {r['weights_mb']} | {r['trainable_parameters']:,} | {r['train_s']} |"
        )
    return "\n".join(lines) + "\n"
