"""The model card (README.md) of an export: base model, method, data, hyperparameters, metrics, quantization.

Everything comes from the run directory: ``run_config.yaml`` (what was asked), ``summary.json`` (what came out)
and ``metrics.jsonl`` (the loss curve). Local paths are reduced to file names: a card is meant to be published,
and the layout of the machine it was trained on is nobody's business. A quantization report, when the run has
one (``quantization/report.json``, ``quantization_report.json`` or ``quantization.json`` in the run directory),
is shown as a table of its fields, whatever they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bittune.model import looks_like_hub_id
from bittune.quant.spec import BnbSpec

QUANT_REPORTS = ("quantization/report.json", "quantization_report.json", "quantization.json")
_HYPER_KEYS = (
    "epochs", "max_steps", "batch_size", "grad_accum", "lr", "scheduler", "warmup_steps", "warmup_ratio",
    "weight_decay", "optimizer", "max_grad_norm", "seed", "gradient_checkpointing", "mixed_precision",
)  # fmt: skip


def _name(value: Any) -> str:
    """A path's last part; hub ids (owner/name that are not local paths) stay whole."""
    text = str(value)
    if looks_like_hub_id(text):
        return text
    return Path(text).name or text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value)}`"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    rows = [(k, v) for k, v in rows if v is not None]
    if not rows:
        return []
    return ["| | |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows), ""]


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def read_run(run_dir: Path) -> dict[str, Any]:
    """run_config.yaml (validated: :func:`bittune.config.read_run_config`), summary.json, metrics.jsonl and a
    quantization report of a run, where present."""
    from bittune.config import read_run_config
    from bittune.sidecars import RUN_CONFIG_FILE
    from bittune.training.metrics import read_metrics

    run_dir = Path(run_dir)
    out: dict[str, Any] = {"config": {}, "summary": {}, "metrics": [], "quantization": None}
    if (run_dir / RUN_CONFIG_FILE).is_file():
        out["config"] = read_run_config(run_dir).model_dump(mode="json")
    if (run_dir / "summary.json").is_file():
        out["summary"] = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    if (run_dir / "metrics.jsonl").is_file():
        out["metrics"] = read_metrics(run_dir / "metrics.jsonl")
    for rel in QUANT_REPORTS:
        if (run_dir / rel).is_file():
            out["quantization"] = json.loads((run_dir / rel).read_text(encoding="utf-8"))
            break
    return out


def model_card(
    *,
    name: str,
    base: str,
    task: str,
    run_dir: Path | None,
    kbit: BnbSpec | None = None,
    merged: bool = False,
    quantized: str | None = None,
) -> str:
    """The README.md text for an export.

    Args:
        name: Title (usually the repo or folder name).
        base: The base model (folder or hub id).
        task: ``causal-lm`` or ``classification``.
        run_dir: The bittune run it came from, or None for a plain model folder.
        kbit: The QLoRA base quantization of the run (its ``bittune_quantization.json``), if any.
        merged: Whether a LoRA adapter was merged into the weights.
        quantized: The method label of a ``bittune quantize`` folder whose values were dequantized for export.
    """
    run = read_run(run_dir) if run_dir else {"config": {}, "summary": {}, "metrics": [], "quantization": None}
    cfg, summary = run["config"], run["summary"]
    method = cfg.get("method", "lora" if merged else "export")
    front: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification" if task == "classification" else "text-generation",
        "tags": ["bittune", method, *(["merged-lora"] if merged else [])],
    }
    if looks_like_hub_id(base):
        front["base_model"] = base
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    if run_dir is None:
        what = f"Exported from `{_name(base)}` with bittune" + (
            " (LoRA adapter merged into the weights)." if merged else "."
        )
    else:
        what = f"Fine-tuned from `{_name(base)}` with bittune ({method})"
        what += ", LoRA adapter merged into the weights." if merged else "."
    lines += [what, ""]

    lines += ["## Method", ""]
    lora = cfg.get("lora") or {}
    method_rows: list[tuple[str, Any]] = [("method", method), ("base model", _name(base)), ("task", task)]
    if method in ("lora", "qlora"):
        method_rows += [(f"lora.{k}", lora.get(k)) for k in ("r", "alpha", "dropout", "target_modules")]
    if kbit is None and cfg.get("quant"):
        kbit = BnbSpec.model_validate(cfg["quant"])
    if kbit is not None:
        method_rows.append(("base quantization in training", f"{kbit.bits}-bit {kbit.label()}"))
        if merged:
            method_rows.append(
                ("merge", f"adapter merged into the dequantized {kbit.label()} base it was trained on, in float32")
            )
    if quantized:
        method_rows.append(("weights", f"{quantized} quantized values, stored dequantized in float"))
    lines += _table(method_rows)

    data = cfg.get("data") or {}
    if data:
        lines += ["## Data", ""]
        stats = summary.get("data") or {}
        rows: list[tuple[str, Any]] = [
            ("train", _name(data["train"]) if data.get("train") else None),
            ("eval", _name(data["eval"]) if data.get("eval") else None),
            ("format", data.get("format")),
            ("template", data.get("template")),
            ("max_length", data.get("max_length")),
            ("packing", data.get("packing")),
            ("train rows", summary.get("train_rows")),
            ("eval rows", summary.get("eval_rows")),
        ]
        rows += [(f"{split} tokens", st.get("tokens")) for split, st in stats.items() if isinstance(st, dict)]
        lines += _table(rows)

    train = cfg.get("train") or {}
    if train:
        lines += ["## Hyperparameters", ""]
        lines += _table([(k, train.get(k)) for k in _HYPER_KEYS])

    results = _results(summary, run["metrics"])
    if results:
        lines += ["## Results", "", *_table(results)]

    quant = run["quantization"]
    if quant:
        lines += ["## Quantization", "", "From the run's quantization report:", ""]
        lines += _table(_flatten(quant) if isinstance(quant, dict) else [("report", quant)])

    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if task == "classification":
        lines[-2] = "from transformers import AutoModelForSequenceClassification, AutoTokenizer"
        lines += ['model = AutoModelForSequenceClassification.from_pretrained("REPO")']
    else:
        lines += ['model = AutoModelForCausalLM.from_pretrained("REPO")']
    lines += ['tokenizer = AutoTokenizer.from_pretrained("REPO")', "```", ""]
    return "\n".join(lines).replace("REPO", name)


def _results(summary: dict[str, Any], metrics: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("steps", summary.get("steps"))]
    losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), int | float)]
    if losses:
        rows += [("train loss (first logged)", losses[0]), ("train loss (last logged)", losses[-1])]
    rows += [(k, v) for k, v in summary.items() if k.startswith("eval_") and isinstance(v, int | float)]
    if summary.get("best_eval_loss") is not None:
        rows.append(("best eval loss", f"{summary['best_eval_loss']:.4g} (step {summary.get('best_step')})"))
    return [(k, v) for k, v in rows if v is not None]
