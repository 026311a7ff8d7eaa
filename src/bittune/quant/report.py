"""Measure a model and report what quantization changed: size, memory, speed and quality, as JSON and a table.

Every number is measured on the model as a user reloads it (from its folder), on the same tokenized rows as the
reference. Quality is loss and perplexity for a causal LM, loss and accuracy for a classifier.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from bittune.storage import read_json

MB = 1024**2
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Above these the change is called out as large (about 2% perplexity, or one point of accuracy).
LARGE_LOSS_DELTA = 0.02
LARGE_ACCURACY_DROP = 0.01
_LATENCY_TOKENS = 128


def weights_size(folder: str | Path | None) -> int | None:
    """Bytes of the weight files in a local model/adapter folder, or of a ``.gguf`` file (``None`` for a hub id)."""
    if folder is not None and Path(folder).is_file() and Path(folder).suffix.lower() == ".gguf":
        return Path(folder).stat().st_size
    if folder is None or not Path(folder).is_dir():
        return None
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def warm_imports(artifact: Any) -> None:
    """Import what loading ``artifact`` (:func:`bittune.artifacts.resolve`) needs -- transformers, its model class,
    PEFT, bitsandbytes -- before timing a load.

    Otherwise the first model measured in a process pays seconds of one-off imports in its load time.
    """
    import contextlib

    base, task = artifact.base, artifact.task
    with contextlib.suppress(Exception):  # only a warm-up: the timed load reports any real problem
        from transformers import AutoConfig
        from transformers.models.auto import modeling_auto

        mapping = (
            modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
            if task == "classification"
            else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
        )
        mapping[type(AutoConfig.from_pretrained(base))]
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401


def measure(
    model: Any, tokenizer: Any, task: str, rows: list[dict[str, Any]] | None, *, batch_size: int = 8
) -> dict[str, Any]:
    """Memory, forward latency, throughput and (given rows) quality of a loaded model.

    Returns:
        ``weights_in_memory_mb``; ``latency_ms`` (one forward of a 1 x 128-token batch, best of 3 after a warm-up);
        with ``rows``: ``tokens_per_s`` over the evaluation pass, ``eval_*`` metrics, ``rows`` and ``tokens``.
    """
    import torch

    from bittune.evaluation.core import token_metrics
    from bittune.training.memory import weights_footprint

    device = next(model.parameters()).device
    out: dict[str, Any] = {"weights_in_memory_mb": round(sum(weights_footprint(model).values()) / MB, 2)}
    vocab = min(int(getattr(model.config, "vocab_size", 0) or 0) or len(tokenizer), len(tokenizer))
    n_pos = getattr(model.config, "max_position_embeddings", None) or _LATENCY_TOKENS
    ids = torch.randint(0, vocab, (1, min(_LATENCY_TOKENS, n_pos)), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    times = []
    with torch.inference_mode():
        for _ in range(4):
            _sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids)
            _sync(device)
            times.append(time.perf_counter() - t0)
    out["latency_ms"] = round(min(times[1:]) * 1000, 2)
    if rows:
        _sync(device)
        t0 = time.perf_counter()
        metrics = token_metrics(model, tokenizer, task, rows, batch_size=batch_size)
        _sync(device)
        elapsed = time.perf_counter() - t0
        tokens = sum(len(r["input_ids"]) for r in rows)
        out.update(metrics)
        out.update(rows=len(rows), tokens=tokens, tokens_per_s=round(tokens / elapsed, 1))
    return out


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def quality_delta(reference: dict[str, Any], other: dict[str, Any], task: str) -> dict[str, Any]:
    """Change of ``other`` against ``reference`` (empty when either was not evaluated) and whether it is large."""
    if "eval_loss" not in reference or "eval_loss" not in other:
        return {}
    delta: dict[str, Any] = {"loss": other["eval_loss"] - reference["eval_loss"]}
    large = delta["loss"] > LARGE_LOSS_DELTA
    if task == "classification":
        delta["accuracy"] = other["eval_accuracy"] - reference["eval_accuracy"]
        large = large or delta["accuracy"] < -LARGE_ACCURACY_DROP
    else:
        delta["perplexity"] = other["eval_perplexity"] - reference["eval_perplexity"]
        delta["perplexity_pct"] = 100 * delta["perplexity"] / reference["eval_perplexity"]
    delta["large"] = bool(large or not math.isfinite(delta["loss"]))
    return delta


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"
    return str(value)


FOLDER_REPORTS = ("quant_report.json", "merge_report.json")  # what `bittune quantize` / `bittune merge` write


def read_folder_report(path: str | Path) -> dict[str, Any] | None:
    """The report ``bittune quantize`` or ``bittune merge`` wrote into its output folder ``path`` (None: none)."""
    for name in FOLDER_REPORTS:
        f = Path(path).expanduser() / name
        if f.is_file():
            return {"path": str(path), **read_json(f)}
    return None


def table(entries: list[dict[str, Any]], task: str) -> str:
    """A markdown table: one row per measured model (``name``, ``size_mb`` and :func:`measure`'s keys)."""
    quality = ["eval_accuracy", "eval_loss"] if task == "classification" else ["eval_perplexity", "eval_loss"]
    cols = ["name", "size_mb", "weights_in_memory_mb", "load_s", "latency_ms", "tokens_per_s", *quality, "delta"]
    heads = {
        "name": "model",
        "size_mb": "size on disk (MB)",
        "weights_in_memory_mb": "weights in memory (MB)",
        "load_s": "load (s)",
        "latency_ms": "forward 1x128 (ms)",
        "tokens_per_s": "eval tokens/s",
        "eval_perplexity": "perplexity",
        "eval_accuracy": "accuracy",
        "eval_loss": "loss",
        "delta": "Δ vs reference",
    }
    lines = ["| " + " | ".join(heads[c] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for e in entries:
        cells = []
        for c in cols:
            if c == "delta":
                d = e.get("delta") or {}
                if not d:
                    cells.append("-")
                elif task == "classification":
                    cells.append(f"{100 * d['accuracy']:+.2f} pt acc, {d['loss']:+.4f} loss")
                else:
                    cells.append(f"{d['perplexity_pct']:+.2f}% ppl, {d['loss']:+.4f} loss")
            else:
                cells.append(_fmt(e.get(c), 4 if c == "eval_loss" else 2 if c != "eval_perplexity" else 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(folder: Path, report: dict[str, Any], name: str = "quant_report") -> None:
    """``<name>.json`` and ``<name>.md`` (the table and notes) in ``folder``."""
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = [f"# {report.get('title', 'Quantization report')}", "", table(report["models"], report["task"]), ""]
    md += [f"- {note}" for note in report.get("notes", [])]
    (folder / f"{name}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
