"""``bittune compare``: several models, adapters or quantized folders measured on the same data.

Each model is loaded the way ``bittune eval`` loads it, timed, measured (:func:`bittune.quant.report.measure`)
and freed before the next, so the comparison needs the memory of one model at a time. The results are one table
(markdown, JSON) and one bar chart (PNG).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bittune.errors import BittuneError, DataError

if TYPE_CHECKING:
    from bittune.artifacts import Artifact


def _name(path: str, taken: set[str]) -> str:
    p = Path(path)
    name = p.name or path
    if p.name in ("adapter", "model") and p.parent.name:
        name = f"{p.parent.name}/{p.name}"
    while name in taken:  # same folder name in two places: keep the table unambiguous
        name = f"{Path(path).parent.name}/{name}"
        if name in taken:
            name = path
            break
    taken.add(name)
    return name


def artifact_kind(artifact: Artifact) -> str:
    """How ``artifact`` stores weights: ``adapter``, a quantize method label, ``bitsandbytes``, ``full precision``."""
    from bittune.artifacts import QuantizedDir

    if artifact.adapter is not None:
        return "adapter"
    if isinstance(artifact, QuantizedDir):
        return artifact.manifest.spec.label()
    cfg = Path(artifact.base) / "config.json"
    q = json.loads(cfg.read_text()).get("quantization_config") if cfg.is_file() else None
    return "bitsandbytes" if q else "full precision"


def compare_models(
    paths: list[str],
    *,
    data: str,
    out: Path,
    data_opts: dict[str, Any] | None = None,
    batch_size: int = 8,
    device: str = "auto",
    labels: list[str] | str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Measure every model in ``paths`` on ``data``; write ``compare.json``, ``compare.md`` and ``compare.png``.

    Args:
        paths: Model folders, run directories, adapter folders, quantized folders or hub ids.
        data: The data file all models are measured on.
        out: New folder for the results (must not exist, or be empty).
        labels: Also score a causal label task by generation and by label ranking (``"auto"`` or a list; see
            :func:`bittune.evaluation.core.evaluate_loaded`), with the same numbers ``bittune eval`` prints.

    Returns:
        ``{"task", "data", "models": [...]}`` with one entry per path, in order.
    """
    from bittune.evaluation.core import data_settings, label_results, read_examples, tokenized_rows
    from bittune.evaluation.loading import describe, load_model
    from bittune.quant.flows import check_out_dir, source_size_mb
    from bittune.quant.report import measure, table, warm_imports
    from bittune.storage import atomic_dir

    if not paths:
        raise BittuneError("compare needs at least one model", hint="bittune compare MODEL_A MODEL_B --data FILE")
    out = Path(out)
    check_out_dir(out)
    artifacts = [(p, describe(p)) for p in paths]  # reads no weights: fail before the slow part
    tasks = {p: a.task for p, a in artifacts}
    if len(set(tasks.values())) > 1:
        raise DataError(
            f"cannot compare causal LMs with classifiers on one data file ({tasks})",
            hint="compare models of one task at a time",
        )
    task = next(iter(tasks.values()))
    examples = read_examples(data_settings(paths[0], data, **_opts(data_opts)), task)  # every row checked first
    entries: list[dict[str, Any]] = []
    taken: set[str] = set()
    for path, artifact in artifacts:
        log(f"{path}: loading ...")
        warm_imports(artifact)
        loaded = load_model(artifact, device=device)
        model, tokenizer, load_s = loaded.model, loaded.tokenizer, loaded.load_s
        settings = data_settings(path, data, **_opts(data_opts))
        rows = tokenized_rows(loaded, settings)
        entry: dict[str, Any] = {
            "name": _name(path, taken),
            "path": path,
            "kind": artifact_kind(artifact),
            "size_mb": source_size_mb(artifact),
            "load_s": load_s,
        }
        log(f"{path}: measuring on {len(rows)} rows ...")
        entry.update(measure(model, tokenizer, task, rows, batch_size=batch_size))
        if labels is not None and task != "classification":
            entry.update(label_results(loaded, examples, labels, settings, log=log))
        entries.append(entry)
        del model, loaded
        gc.collect()
    result = {"task": task, "data": data, "models": entries}

    def write(tmp: Path) -> None:
        (tmp / "compare.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        md = f"# Comparison on {data}\n\n{table(entries, task)}\n{label_table(entries)}"
        (tmp / "compare.md").write_text(md, encoding="utf-8")
        plot(entries, task, tmp / "compare.png")

    atomic_dir(out, write)
    return result


def label_table(entries: list[dict[str, Any]]) -> str:
    """Label-task accuracy by generation and by label ranking, one row per model ("" when not measured)."""
    if not any("ranking" in e or "generation" in e for e in entries):
        return ""

    def pct(e: dict[str, Any], key: str, metric: str) -> str:
        return f"{100 * e[key][metric]:.1f}%" if key in e else "-"

    lines = ["", "| model | accuracy, generation | macro-F1, generation | not a label | accuracy, label ranking |"]
    lines.append("|---|---|---|---|---|")
    for e in entries:
        f1 = f"{e['generation']['f1_macro']:.3f}" if "generation" in e else "-"
        lines.append(
            f"| {e['name']} | {pct(e, 'generation', 'accuracy')} | {f1} | {pct(e, 'generation', 'off_label')} "
            f"| {pct(e, 'ranking', 'accuracy')} |"
        )
    return "\n".join(lines) + "\n"


def _opts(data_opts: dict[str, Any] | None) -> dict[str, Any]:
    """``compare``'s data options under :class:`bittune.evaluation.core.DataSettings`' names."""
    return {k: v for k, v in (data_opts or {}).items() if v is not None}


def plot(entries: list[dict[str, Any]], task: str, path: Path) -> None:
    """Bar charts of size, throughput, load time and quality, one bar per model."""
    try:
        import matplotlib
    except ImportError:
        raise BittuneError(
            "the comparison chart needs matplotlib, which is not installed", hint="pip install 'bittune[plot]'"
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    quality = ("eval_accuracy", "accuracy") if task == "classification" else ("eval_perplexity", "perplexity")
    panels = [
        ("size_mb", "size on disk (MB)"),
        ("tokens_per_s", "eval tokens/s"),
        ("load_s", "load time (s)"),
        quality,
    ]
    names = [e["name"] for e in entries]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.5 * len(names) + 2.2))
    for ax, (key, title) in zip(axes, panels):
        values = [e.get(key) or 0 for e in entries]
        bars = ax.barh(names, values, color="#4c72b0")
        ax.bar_label(bars, labels=[f"{v:,.3g}" for v in values], padding=2, fontsize=8)
        ax.set_title(title)
        ax.invert_yaxis()  # first model on top, as in the table
        ax.margins(x=0.25)
        if ax is not axes[0]:
            ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
