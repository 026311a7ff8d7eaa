"""The demo's ending: a five-line summary of the models the report measured, and ``demo.json`` (the run's record)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

# The report's model names -> the summary's, in the summary's order.
SUMMARY_NAMES = {
    "base": "base SmolLM2-135M",
    "tuned": "QLoRA-tuned (= merged fp32)",
    "int4": "merged, 4-bit int (RTN)",
    "gptq-3bit": "merged, 3-bit GPTQ",
    "smollm2-trec.gguf": "GGUF",
}


# A summary's own columns of one model, from its report entry and that entry's metrics (in demo.json's key order).
Columns = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


def model_rows(models: list[dict[str, Any]], names: dict[str, str], columns: Columns) -> list[dict[str, Any]]:
    """One summary row per report (or report-shaped) model entry: its name as ``names`` has it (else its own), its
    path, then ``columns(entry, metrics)`` (``metrics``: the entry's, ``{}`` where it has none)."""
    return [
        {"name": names.get(m["name"], m["name"]), "path": m.get("path"), **columns(m, m.get("metrics") or {})}
        for m in models
    ]


def per_second(count: float | None, seconds: float | None) -> float | None:
    """``count / seconds`` to one decimal; None where either is missing or zero."""
    return round(count / seconds, 1) if count and seconds else None


def summary_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per measured model: accuracy (ranking, generation), token-level perplexity, size, eval speed."""
    return model_rows(models, SUMMARY_NAMES, _columns)


def _columns(entry: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    generation = metrics.get("generation") or {}
    return {
        "ranking_accuracy": (metrics.get("ranking") or {}).get("accuracy"),
        "generation_accuracy": generation.get("accuracy"),
        "perplexity": metrics.get("eval_perplexity"),
        "size_mb": entry.get("size_mb"),
        "tokens_per_s": per_second(metrics.get("tokens"), metrics.get("eval_s")),
        "answer_s": generation.get("seconds"),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def summary_table(rows: list[dict[str, Any]], n_eval: int) -> Any:
    """The summary as a rich table."""
    from rich.table import Table

    table = Table(title=f"{n_eval} held-out TREC questions, every model measured the same way")
    for col in ("model", "ranking acc.", "generation acc.", "perplexity", "size MB", "tokens/s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(
            r["name"],
            _pct(r["ranking_accuracy"]),
            _pct(r["generation_accuracy"]),
            _num(r["perplexity"], ".3f"),
            _num(r["size_mb"], ".0f"),
            _num(r["tokens_per_s"], ".0f"),
        )
    return table


def machine() -> dict[str, Any]:
    """CPU model, core count, torch threads and the load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_end": load}


def git_commit() -> str | None:
    """The source checkout's commit (with ``-dirty`` when it has local changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def compute(cfg: Any) -> dict[str, Any]:
    """The dtype training computed in: the config's and what ``auto`` resolved to on this device."""
    import torch

    from bittune.model import resolve_mixed_precision

    pref = cfg.train.mixed_precision
    return {
        "model_dtype": cfg.model.dtype,
        "mixed_precision": pref,
        "resolved": resolve_mixed_precision(pref, torch.device("cpu")),
    }


def finish(
    story: Any,
    report: dict[str, Any],
    *,
    out_dir: Path,
    results_file: Path | None,
    cfg: Any,
    sizes: Any,
    evals: dict[str, Any],
    classifier: dict[str, Any] | None,
    quick: bool,
) -> dict[str, Any]:
    """Print the summary and where the report is; write ``demo.json`` (and ``results_file``); return the record."""
    rows = summary_rows(report["models"])
    story.console.rule("[bold]result")
    story.console.print(summary_table(rows, sizes.n_eval))
    folder = Path(report["folder"])
    story.console.print(f"report: [bold]{folder / 'report.html'}[/] (and report.md)")
    if classifier is not None:
        from bittune.demo.sentiment import summary_table as classifier_table

        story.console.print(classifier_table(classifier))
        story.console.print(f"classifier report (with its confusion matrix): [bold]{classifier['report']}[/]")
    record = {
        "command": "make demo-quick" if quick else "make demo",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_commit": story.commit,
        "machine": {**machine(), "load_avg_start": story.load_start},
        "compute": compute(cfg),
        "sizes": asdict(sizes),
        "phases": story.timings,
        "total_wall_s": round(story.elapsed(), 1),
        "total_cpu_s": round(sum(t["cpu_s"] for t in story.timings.values()), 1),
        "heldout_eval": evals,
        "models": rows,
        "run_dir": report["run_dir"],
        "report": str(folder / "report.html"),
        "classifier": classifier,
    }
    story.console.print(
        f"total {record['total_wall_s']:.0f}s (CPU {record['total_cpu_s']:.0f}s); "
        f"load average {record['machine']['load_avg_start']} at the start, "
        f"{record['machine']['load_avg_end']} at the end"
    )
    text = json.dumps(record, indent=2, default=str) + "\n"
    for path in (Path(out_dir) / "demo.json", results_file):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if results_file is not None:
        story.console.print(f"recorded in {results_file}")
    return record
