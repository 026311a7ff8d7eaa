"""The model card (README.md) of an export: base model, method, data, hyperparameters, metrics, quantization.

Everything comes from the run directory: ``run_config.yaml`` (what was asked), ``summary.json`` (what came out)
and ``metrics.jsonl`` (the loss curve), and ``report/report.json`` (the measured evidence). Local paths are reduced
to file names: a card is meant to be published, and the layout of the machine it was trained on is nobody's
business. An export of a ``bittune quantize`` or ``bittune merge`` folder also shows the report that command wrote
there (``quant_report.json`` / ``merge_report.json``): each model's size and measured quality change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bittune.model import looks_like_hub_id
from bittune.quant.spec import BnbSpec
from bittune.storage import read_json

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


def read_run(run_dir: Path) -> dict[str, Any]:
    """run_config.yaml (validated: :func:`bittune.config.read_run_config`), summary.json and metrics.jsonl of a
    run, where present."""
    from bittune.config import read_run_config
    from bittune.sidecars import RUN_CONFIG_FILE
    from bittune.training.metrics import read_metrics

    run_dir = Path(run_dir)
    out: dict[str, Any] = {"config": {}, "summary": {}, "metrics": []}
    if (run_dir / RUN_CONFIG_FILE).is_file():
        out["config"] = read_run_config(run_dir).model_dump(mode="json")
    if (run_dir / "summary.json").is_file():
        out["summary"] = read_json(run_dir / "summary.json")
    if (run_dir / "metrics.jsonl").is_file():
        out["metrics"] = read_metrics(run_dir / "metrics.jsonl")
    return out


def gguf_names(path: str | Path) -> dict[str, str]:
    """What a ``.gguf`` file says about the model it holds: ``repo`` (a hub id, when the file records one),
    ``name``, ``organization``, ``license``. Reads only the metadata; ``{}`` when the file cannot be read."""
    try:
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
    except Exception:  # a card is still written without these
        return {}

    def get(key: str) -> str | None:
        try:
            value = fields[key].contents() if key in fields else None
        except Exception:
            return None
        return str(value) if value else None

    out = {k: v for k, v in (("name", get("general.name")), ("organization", get("general.organization")),
                             ("license", get("general.license"))) if v}  # fmt: skip
    for key in ("general.base_model.0.repo_url", "general.source.repo_url", "general.source.huggingface.repository"):
        url = get(key) or ""
        repo = url.split("huggingface.co/", 1)[-1].strip("/")
        if looks_like_hub_id(repo):
            out["repo"] = repo
            break
    return out


def headline(run_dir: Path | None) -> dict[str, Any] | None:
    """The report's measured numbers (``RUN_DIR/report/report.json``): per model, its name and metrics."""
    f = Path(run_dir) / "report" / "report.json" if run_dir else None
    if f is None or not f.is_file():
        return None
    data = read_json(f)
    return {"data": data.get("data"), "task": data.get("task"), "models": data.get("models") or []}


# (metric key path in an evaluation result, Hub metric type, label)
_HEADLINE = (
    (("ranking", "accuracy"), "accuracy", "accuracy, label ranking"),
    (("generation", "accuracy"), "accuracy", "accuracy, greedy generation"),
    (("generation", "f1_macro"), "f1", "macro-F1, greedy generation"),
    (("eval_accuracy",), "accuracy", "accuracy"),
    (("eval_f1_macro",), "f1", "macro-F1"),
    (("eval_perplexity",), "perplexity", "token-level perplexity"),
    (("eval_loss",), "loss", "token-level loss"),
)


def _metric(entry: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    cur: Any = entry.get("metrics") or {}
    for k in keys:
        cur = cur.get(k) if isinstance(cur, dict) else None
    return cur if isinstance(cur, int | float) else None


def _evidence(head: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The card's evaluation table (base vs tuned vs the others, with deltas) and the tuned model's Hub metrics."""
    models = head["models"]
    tuned = next((m for m in models if m.get("name") == "tuned"), None)
    if tuned is None:
        return [], []
    lines = ["| metric | " + " | ".join(m["name"] for m in models) + " |", "|---" * (len(models) + 1) + "|"]
    hub = []
    for keys, kind, label in _HEADLINE:
        values = [_metric(m, keys) for m in models]
        if all(v is None for v in values):
            continue
        ref = _metric(tuned, keys)
        cells = []
        for m, v in zip(models, values):
            cell = "-" if v is None else f"{v:.4g}"
            if v is not None and ref is not None and m is not tuned:
                cell += f" ({v - ref:+.3g} vs tuned)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if ref is not None:
            hub.append({"type": kind, "value": round(float(ref), 6), "name": label})
    return lines, hub


def model_card(
    *,
    name: str,
    base: str,
    task: str,
    run_dir: Path | None,
    kbit: BnbSpec | None = None,
    merged: bool = False,
    quantized: str | None = None,
    base_model: str | None = None,
    quant_report: dict[str, Any] | None = None,
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
        base_model: The Hub id of the base, when ``base`` is not one (a local folder or a ``.gguf`` file).
        quant_report: The report of the exported ``bittune quantize`` / ``merge`` folder
            (:func:`bittune.quant.report.read_folder_report`), if any.
    """
    run = read_run(run_dir) if run_dir else {"config": {}, "summary": {}, "metrics": []}
    cfg, summary = run["config"], run["summary"]
    method = cfg.get("method", "lora" if merged else "export")
    source = str((cfg.get("model") or {}).get("path") or base)
    gguf_meta = gguf_names(Path(source).expanduser()) if source.lower().endswith(".gguf") else {}
    hub_base = base_model or (base if looks_like_hub_id(base) else None) or gguf_meta.get("repo")
    head = headline(run_dir)
    evidence, hub_metrics = _evidence(head) if head else ([], [])
    front = _front_matter(name, task, method, cfg, merged=merged, gguf_meta=gguf_meta, hub_base=hub_base)
    if hub_metrics:
        data_name = _name(head["data"]) if head.get("data") else "eval"
        result = {"task": {"type": front["pipeline_tag"]}, "dataset": {"name": data_name, "type": data_name}}
        front["model-index"] = [{"name": name, "results": [{**result, "metrics": hub_metrics}]}]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    if run_dir is None:
        what = f"Exported from `{_name(base)}` with bittune" + (
            " (LoRA adapter merged into the weights)." if merged else "."
        )
    else:
        what = f"Fine-tuned from `{_name(source)}` with bittune ({method})"
        what += ", LoRA adapter merged into the weights." if merged else "."
    lines += [what, ""]
    if gguf_meta:
        named = " by ".join(v for v in (gguf_meta.get("name"), gguf_meta.get("organization")) if v)
        lines += [f"The base came from a GGUF file that names its model '{named}'"
                  + (f" ({gguf_meta['license']} license)." if gguf_meta.get("license") else "."), ""]  # fmt: skip
    if evidence:
        lines += ["## Evaluation", "", f"Measured by `bittune report` on `{_name(head.get('data') or 'eval')}` "
                  "(every model on the same rows; token-level perplexity over reply tokens; accuracy by greedy "
                  "generation and by ranking the labels by likelihood).", "", *evidence, ""]  # fmt: skip

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

    if quant_report:
        lines += _quantization(quant_report, task)

    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if task == "classification":
        lines[-2] = "from transformers import AutoModelForSequenceClassification, AutoTokenizer"
        lines += ['model = AutoModelForSequenceClassification.from_pretrained("REPO")']
    else:
        lines += ['model = AutoModelForCausalLM.from_pretrained("REPO")']
    lines += ['tokenizer = AutoTokenizer.from_pretrained("REPO")', "```", ""]
    return "\n".join(lines).replace("REPO", name)


def _front_matter(
    name: str, task: str, method: str, cfg: dict[str, Any], *, merged: bool, gguf_meta: dict[str, str], hub_base: Any
) -> dict[str, Any]:
    """The card's Hub metadata: library, pipeline, tags, base_model, license, datasets."""
    front: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification" if task == "classification" else "text-generation",
        "tags": ["bittune", method, *(["merged-lora"] if merged else []), *(["gguf-base"] if gguf_meta else [])],
    }
    if hub_base:
        front["base_model"] = hub_base
    if gguf_meta.get("license"):
        front["license"] = gguf_meta["license"]
    data_cfg = cfg.get("data") or {}
    hub_data = [str(d).split(":")[0] for d in (data_cfg.get("train"), data_cfg.get("eval")) if d and _hub_data(d)]
    if hub_data:
        front["datasets"] = sorted(set(hub_data))
    return front


def _hub_data(source: str) -> bool:
    from bittune.data.records import looks_like_hub_id as data_hub_id

    return data_hub_id(str(source)) and not Path(str(source).split(":")[0]).expanduser().exists()


def _results(summary: dict[str, Any], metrics: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("steps", summary.get("steps"))]
    losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), int | float)]
    if losses:
        rows += [("train loss (first logged)", losses[0]), ("train loss (last logged)", losses[-1])]
    rows += [(k, v) for k, v in summary.items() if k.startswith("eval_") and isinstance(v, int | float)]
    if summary.get("best_eval_loss") is not None:
        rows.append(("best eval loss", f"{summary['best_eval_loss']:.4g} (step {summary.get('best_step')})"))
    return [(k, v) for k, v in rows if v is not None]


def _quantization(report: dict[str, Any], task: str) -> list[str]:
    """The card's section for the report a ``bittune quantize`` / ``merge`` folder carries: what was done, each
    model's size and measured quality change, and the report's notes."""
    from bittune.quant.report import table

    lines = ["## Quantization", "", f"{_local_names(str(report.get('title') or 'quantization'))}, as measured by "
             "bittune:", "", table(report.get("models") or [], task), ""]  # fmt: skip
    if report.get("data"):
        lines += [f"Quality measured on `{_name(report['data'])}`.", ""]
    notes = [f"- {_local_names(str(note))}" for note in report.get("notes") or []]
    return [*lines, *notes, ""] if notes else lines


def _local_names(text: str) -> str:
    """``text`` with each local absolute path reduced to its last part (a card is published; the machine's layout
    is nobody's business)."""
    import re

    return re.sub(r"(?<![\w.])(?:~|/)[^\s'\"`,;()]*", lambda m: Path(m.group(0)).name or m.group(0), text)
