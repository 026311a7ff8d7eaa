"""``bittune report``: collect, plot, render, and write ``RUN_DIR/report/`` atomically."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Light (no torch): its heavy imports stay inside its functions.
from bittune.report.collect import ReportOptions, collect

REPORT_DIR = "report"
# What a report folder holds: bittune writes these, and replaces them with the next report.
REPORT_FILES = ("report.md", "report.html", "report.json", "curves.png", "quality.png", "confusion.png")
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _panels(data: dict[str, Any]) -> list[tuple[str, list[str], list[float | None]]]:
    models = data["models"]
    names = [m["name"] for m in models]

    def col(*keys: str) -> list[float | None]:
        out = []
        for m in models:
            cur: Any = m.get("metrics") or {}
            for k in keys:
                cur = cur.get(k) if isinstance(cur, dict) else None
            out.append(cur)
        return out

    if data["task"] == "classification":
        return [("accuracy", names, col("eval_accuracy")), ("macro-F1", names, col("eval_f1_macro"))]
    return [
        ("accuracy, label ranking", names, col("ranking", "accuracy")),
        ("accuracy, generation", names, col("generation", "accuracy")),
        ("token-level perplexity", names, col("eval_perplexity")),
    ]


def _confusion(data: dict[str, Any]) -> tuple[list[str], list[list[int]], str] | None:
    tuned = next((m for m in data["models"] if m["name"] == "tuned"), None)
    metrics = (tuned or {}).get("metrics") or {}
    if "confusion" in metrics:
        c = metrics["confusion"]
        return c["labels"], c["matrix"], "tuned model (classifier head)"
    if "generation" in metrics:
        c = metrics["generation"]["confusion"]
        return c["labels"], c["matrix"], "tuned model, greedy generation"
    return None


def render_report(data: dict[str, Any], folder: Path) -> None:
    """Write the PNGs, ``report.md``, ``report.html`` and ``report.json`` of collected ``data`` into ``folder``."""
    from bittune.report import plots
    from bittune.report.html import to_html
    from bittune.report.render import build_sections, to_markdown

    images: dict[str, str] = {}
    if plots.training_curves(data["metrics"], folder / "curves.png"):
        images["curves"] = "curves.png"
    if plots.quality_bars(_panels(data), folder / "quality.png"):
        images["quality"] = "quality.png"
    conf = _confusion(data)
    if conf is not None:
        plots.confusion(conf[0], conf[1], conf[2], folder / "confusion.png")
        images["confusion"] = "confusion.png"
    sections = build_sections(data, images)
    cfg = data["config"]
    title = f"bittune report: {Path(data['run_dir']).name}"
    subtitle = f"{cfg.get('method')} fine-tuning of `{Path(str((cfg.get('model') or {}).get('path'))).name}`"
    (folder / "report.md").write_text(to_markdown(title, sections), encoding="utf-8")
    (folder / "report.html").write_text(to_html(title, subtitle, sections, folder), encoding="utf-8")
    (folder / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def write_report(run_dir: Path, options: ReportOptions = ReportOptions(), *, log: Log = _quiet) -> Path:
    """Measure and write ``RUN_DIR/report/`` (replacing an earlier report only once the new one is complete).

    ``options`` say what is measured beside the run's base and tuned models, on which data and where
    (:class:`bittune.report.collect.ReportOptions`).

    Returns:
        The report folder.
    """
    from bittune.storage import COMPLETE, atomic_dir, check_output_path

    out = Path(run_dir) / REPORT_DIR
    # An earlier report is replaced; a file of the user's put into the folder is not lost with it.
    ours = (*REPORT_FILES, COMPLETE)  # and atomic_dir's completion marker
    check_output_path(out, flag="the report folder", noun="a report", ours=ours, may_replace=True)
    collected = collect(Path(run_dir), options, log=log)
    atomic_dir(out, lambda tmp: render_report(collected, tmp))
    log(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return out
