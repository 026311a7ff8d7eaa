"""The demo's before/after report: a rich table on the terminal, and JSON + Markdown files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bittune.demo.trec import LABELS


def pick_examples(
    rows: list[dict[str, Any]], base_answers: list[str], tuned_answers: list[str], n: int = 5
) -> list[dict[str, str]]:
    """Up to ``n`` held-out questions for the report: the first of each gold class, in label order.

    Picked by class, not by outcome, so the examples are not cherry-picked.
    """
    picked: list[dict[str, str]] = []
    for label in LABELS:
        for i, row in enumerate(rows):
            if row["label"] == label:
                picked.append(
                    {"question": row["question"], "gold": label, "base": base_answers[i], "tuned": tuned_answers[i]}
                )
                break
        if len(picked) == n:
            break
    return picked


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    base, tuned = report["base"], report["tuned"]
    out = [("overall", str(base["n"]), _pct(base["accuracy"]), _pct(tuned["accuracy"]))]
    for label, count in base["counts"].items():
        out.append((label, str(count), _pct(base["per_class"].get(label)), _pct(tuned["per_class"].get(label))))
    out.append(("answer not a label", "", _pct(base.get("off_label")), _pct(tuned.get("off_label"))))
    return out


def print_report(report: dict[str, Any], console: Any) -> None:
    """Print the accuracy table and the example answers with rich."""
    from rich.table import Table

    table = Table(title="TREC question type: held-out accuracy (greedy, exact first word)")
    table.add_column("class")
    table.add_column("n", justify="right")
    table.add_column("base", justify="right")
    table.add_column("LoRA-tuned", justify="right", style="bold green")
    for row in _rows(report):
        table.add_row(*row)
    console.print(table)

    examples = Table(title="Examples")
    examples.add_column("question", overflow="fold", ratio=3)
    examples.add_column("gold")
    examples.add_column("base answer", overflow="fold", ratio=1)
    examples.add_column("tuned answer")
    for ex in report["examples"]:
        mark = "[green]✓[/]" if ex["tuned_word"] == ex["gold"] else "[red]✗[/]"
        examples.add_row(ex["question"], ex["gold"], repr(ex["base"]), f"{ex['tuned']!r} {mark}")
    console.print(examples)
    t = report["timings_s"]
    console.print(
        f"time: model {t['assets']:.0f}s, base eval {t['base_eval']:.0f}s, training {t['train']:.0f}s "
        f"({report['train']['steps']} steps, {report['train']['seconds_per_step']:.2f}s/step), "
        f"tuned eval {t['tuned_eval']:.0f}s, total {t['total']:.0f}s"
    )


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (``demo_report.md``)."""
    lines = [
        "# bittune demo: SmolLM2-135M-Instruct learns TREC question types",
        "",
        f"LoRA fine-tuning for {report['train']['steps']} steps on {report['data']['n_train_seen']} questions; "
        f"accuracy on {report['base']['n']} held-out questions (greedy decoding, first word of the answer must be "
        "the gold label).",
        "",
        "| class | n | base | LoRA-tuned |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _rows(report)]
    lines += ["", "## Examples", "", "| question | gold | base answer | tuned answer |", "| --- | --- | --- | --- |"]
    for ex in report["examples"]:
        cells = [ex["question"], ex["gold"], ex["base"], ex["tuned"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    t = report["timings_s"]
    lines += [
        "",
        "## Time",
        "",
        f"model {t['assets']:.0f} s, data {t['data']:.1f} s, base eval {t['base_eval']:.0f} s, "
        f"training {t['train']:.0f} s ({report['train']['seconds_per_step']:.2f} s/step), "
        f"tuned eval {t['tuned_eval']:.0f} s, total {t['total']:.0f} s.",
        "",
        f"Run directory: `{report['run_dir']}`; adapter: `{report['adapter']}`.",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``demo_report.json`` and ``demo_report.md`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "demo_report.json", out_dir / "demo_report.md"
    js.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md.write_text(markdown(report), encoding="utf-8")
    return js, md
