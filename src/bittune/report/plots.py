"""The report's PNGs (matplotlib, files only): training curves, quality per model, confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bittune.errors import BittuneError

BLUE, ORANGE, GREEN, GREY = "#4c72b0", "#dd8452", "#55a868", "#8c8c8c"


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BittuneError("the report's plots need matplotlib", hint="pip install 'bittune[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(records: list[dict[str, Any]], path: Path) -> bool:
    """Train loss (and eval loss) and learning rate against the optimizer step; False when nothing was logged."""
    loss, lr, ev = _series(records, "loss"), _series(records, "lr"), _series(records, "eval_loss")
    if not loss[0]:
        return False
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax1.plot(*loss, color=BLUE, label="train loss")
    if ev[0]:
        ax1.plot(*ev, "o-", color=ORANGE, label="eval loss")
    ax1.set_xlabel("step")
    ax1.set_title("loss (token-level cross-entropy)")
    ax1.legend(frameon=False)
    ax1.grid(alpha=0.3)
    ax2.plot(*lr, color=GREEN)
    ax2.set_xlabel("step")
    ax2.set_title("learning rate")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def quality_bars(panels: list[tuple[str, list[str], list[float | None]]], path: Path) -> bool:
    """One horizontal bar panel per metric ``(title, model names, values)``; False when there is none."""
    panels = [p for p in panels if any(v is not None for v in p[2])]
    if not panels:
        return False
    plt = _plt()
    n = len(panels[0][1])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 0.45 * n + 1.6), squeeze=False)
    for ax, (title, names, values) in zip(axes[0], panels):
        vals = [v or 0.0 for v in values]
        colors = [GREY if nm == "base" else BLUE if nm == "tuned" else ORANGE for nm in names]
        bars = ax.barh(names, vals, color=colors)
        ax.bar_label(bars, labels=["-" if v is None else f"{v:,.3g}" for v in values], padding=2, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.set_xlim(0, (max(vals) or 1.0) * 1.3)  # all-zero panels keep a sane axis
        if ax is not axes[0][0]:
            ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def confusion(labels: list[str], matrix: list[list[int]], title: str, path: Path) -> None:
    """A confusion-matrix heatmap: gold class per row, predicted per column (the last may be "(other)")."""
    plt = _plt()
    rows = labels[: len(matrix)]
    size = 1.0 + 0.55 * max(len(labels), 3)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=10)
    top = max((max(r) for r in matrix), default=0) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > top / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
