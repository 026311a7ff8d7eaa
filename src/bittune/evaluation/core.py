"""Evaluate one model on one data set: the function ``eval``, ``compare``, ``report``, the ladder and the demo share.

What is measured, and how it is labelled in the result:

- ``eval_loss`` / ``eval_perplexity``: token-level cross-entropy over the reply / completion tokens (the tokens the
  model was trained on), averaged per token, and its exp. Not a per-answer score.
- classifiers: ``eval_accuracy``, ``eval_f1_macro`` and a confusion matrix from the head's argmax.
- label tasks of a causal LM (``labels``: the answers come from a small set): ``generation`` (greedy reply, matched
  to a label; decoding settings recorded) and ``ranking`` (the likeliest label as the reply, the fair baseline
  for a base model that answers in its own words). Both carry accuracy, macro-F1, per-class accuracy and a
  confusion matrix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bittune.errors import BittuneError, DataError
from bittune.evaluation.generation import Decoding, Prompt

TOKEN_METRIC_NOTE = "token-level cross-entropy over reply/completion tokens (mean per token) and its exp"
RANKING_NOTE = "likeliest label as the reply (summed token log-probability), no generation"
# A causal task whose distinct answers are at most this many short strings is scored as a label task (auto).
MAX_AUTO_LABELS = 20
MAX_LABEL_WORDS = 4
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class DataSettings:
    """Which data and how to read it; unset fields come from the run config when the model is a run directory."""

    data: str
    fmt: str | None = None
    template: str | None = None
    max_length: int | None = None
    max_rows: int | None = None
    system_prompt: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    train_on_prompt: bool = False


def data_settings(model_path: str, data: str | None = None, *, recorded: Any = None, **given: Any) -> DataSettings:
    """``data`` (else the run's eval file) with the run's format, template, ... for every option not ``given``.

    Args:
        recorded: The run's ``data:`` section (a validated ``DataConfig``); default: read from ``model_path``
            when it is a run directory. Given, a run's settings are known before it has trained.

    Raises:
        BittuneError: neither ``data`` nor a run eval file.
    """
    from bittune.inference import run_data

    if recorded is None:
        recorded = run_data(model_path)  # the run's validated data: section, None for anything but a run directory
    data = data or (recorded.eval if recorded is not None else None)
    if not data:
        raise BittuneError(
            f"no evaluation data for {model_path}", hint="pass --data FILE (the run had no separate eval file)"
        )
    opts = {k: v for k, v in given.items() if v is not None}
    for key in ("fmt", "template", "max_length", "system_prompt", "columns", "split", "train_on_prompt"):
        src = "format" if key == "fmt" else key
        if key not in opts and recorded is not None and getattr(recorded, src) is not None:
            opts[key] = getattr(recorded, src)
    return DataSettings(data=str(data), **opts)


def _fmt(settings: DataSettings, task: str) -> str:
    return settings.fmt or ("classification" if task == "classification" else "chat")


def read_examples(settings: DataSettings, task: str) -> list[Any]:
    """Read and validate every row of the data (no tokenizer, no weights): bad data fails before a model loads."""
    from bittune.data.formats import FieldReader, parse_example
    from bittune.data.records import read_records

    reader = FieldReader(_fmt(settings, task), settings.columns)
    records = read_records(settings.data, settings.split, max_rows=settings.max_rows)
    if not records:
        raise DataError(f"{settings.data} has no rows", hint="point --data at a file with at least one example")
    return [parse_example(rec, reader) for rec in records]


def label_pairs(examples: Sequence[Any]) -> tuple[list[Prompt], list[str]]:
    """``(prompts, gold answers)``: each conversation up to its last assistant reply, or a completion's prompt."""
    from bittune.data.formats import ChatExample, CompletionExample

    prompts: list[Prompt] = []
    golds: list[str] = []
    for ex in examples:
        if isinstance(ex, ChatExample):
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            prompts.append([{"role": m["role"], "content": m["content"]} for m in ex.messages[:last]])
            golds.append(ex.messages[last]["content"])
        elif isinstance(ex, CompletionExample):
            prompts.append(ex.prompt)
            golds.append(ex.completion)
        else:
            raise DataError(f"{ex.where}: a label task needs chat, alpaca or completion rows")
    return prompts, golds


def detect_labels(golds: Sequence[str]) -> list[str] | None:
    """The label set when the answers look like labels (few, short, each repeated), else None."""
    distinct = sorted(set(golds))
    few = 2 <= len(distinct) <= MAX_AUTO_LABELS and len(golds) >= 2 * len(distinct)
    return distinct if few and all(len(g.split()) <= MAX_LABEL_WORDS for g in distinct) else None


def token_metrics(model: Any, tokenizer: Any, task: str, rows: list[dict[str, Any]], *, batch_size: int = 8) -> dict:
    """``eval_loss`` + ``eval_perplexity`` (causal) or ``eval_loss``, ``eval_accuracy``, ``eval_f1_macro`` and
    ``confusion`` (classifier) over tokenized ``rows``; the one forward pass every command uses."""
    from bittune.inference import eval_batches
    from bittune.training.evaluate import evaluate

    device = next(model.parameters()).device
    pairs: list[tuple[int, int]] = []
    out: dict[str, Any] = dict(
        evaluate(model, eval_batches(rows, task, tokenizer, batch_size), task=task, device=device, predictions=pairs)
    )
    if task == "classification" and pairs:
        from bittune.evaluation.metrics import confusion_matrix

        id2label = getattr(model.config, "id2label", None) or {}
        names = [str(id2label.get(i, i)) for i in range(int(getattr(model.config, "num_labels", 0)) or 1)]
        preds, golds = [names[p] for p, _ in pairs], [names[g] for _, g in pairs]
        out["confusion"] = {"labels": names, "matrix": [r[:-1] for r in confusion_matrix(preds, golds, names)]}
    elif "eval_loss" in out:
        out["eval_metric_note"] = TOKEN_METRIC_NOTE
    return out


def tokenized_rows(loaded: Any, settings: DataSettings) -> list[dict[str, Any]]:
    """The data tokenized as ``bittune eval`` reads it (a classifier's label order from the model's config)."""
    from bittune.inference import prepare_eval_rows

    return prepare_eval_rows(
        loaded.artifact or loaded.path,
        loaded.tokenizer,
        loaded.task,
        data=settings.data,
        fmt=_fmt(settings, loaded.task),
        template=settings.template,
        max_length=settings.max_length,
        max_rows=settings.max_rows,
        model=loaded.model,
    )


def progress_lines(log: Log, label: str, every: float = 0.25) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that logs a line about every ``every`` of the way."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        if total and (done == total or done / total - last[0] >= every):
            last[0] = done / total
            log(f"{label}: {done}/{total}")

    return report


def label_task_metrics(
    loaded: Any,
    prompts: Sequence[Prompt],
    golds: Sequence[str],
    labels: Sequence[str],
    *,
    decoding: Decoding,
    generation: bool = True,
    ranking: bool = True,
    batch_size: int = 16,
    log: Log = _quiet,
) -> dict[str, Any]:
    """``generation`` and/or ``ranking`` metrics of a causal LM on a label task (with answers kept per row)."""
    from bittune.evaluation.generation import generate_replies, rank_labels
    from bittune.evaluation.metrics import label_metrics, match_label

    out: dict[str, Any] = {}
    if generation:
        t0 = time.perf_counter()
        raw = generate_replies(
            loaded.model,
            loaded.tokenizer,
            prompts,
            decoding,
            batch_size=batch_size,
            progress=progress_lines(log, "generation"),
        )
        preds = [match_label(r, labels) for r in raw]
        out["generation"] = {
            **label_metrics(preds, list(golds), labels),
            "decoding": decoding.to_dict(),
            "answers": raw,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log(f"generation: accuracy {out['generation']['accuracy']:.3f} on {len(golds)} rows")
    if ranking:
        t0 = time.perf_counter()
        ranked = rank_labels(
            loaded.model,
            loaded.tokenizer,
            prompts,
            labels,
            template=decoding.template,
            system_prompt=decoding.system_prompt,
            batch_size=batch_size,
            progress=progress_lines(log, "label ranking"),
        )
        out["ranking"] = {
            **label_metrics(ranked, list(golds), labels),
            "method": RANKING_NOTE,
            "answers": ranked,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log(f"label ranking: accuracy {out['ranking']['accuracy']:.3f}")
    return out


def evaluate_loaded(
    loaded: Any,
    settings: DataSettings,
    *,
    examples: list[Any] | None = None,
    batch_size: int = 8,
    labels: Sequence[str] | str | None = None,
    decoding: Decoding | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Every metric of ``loaded`` on ``settings.data``.

    Args:
        examples: The rows already read by :func:`read_examples` (read again when not given).
        labels: For a causal LM: ``"auto"`` (a label set when the answers look like one), a list of labels, or
            None (token-level metrics only).
        decoding: Generation settings for label tasks (default greedy, 16 new tokens, the run's template).
    """
    t0 = time.perf_counter()
    rows = tokenized_rows(loaded, settings)
    result: dict[str, Any] = {"model": loaded.path, "task": loaded.task, "data": settings.data, "rows": len(rows)}
    result.update(token_metrics(loaded.model, loaded.tokenizer, loaded.task, rows, batch_size=batch_size))
    result["tokens"] = sum(len(r["input_ids"]) for r in rows)
    result["eval_s"] = round(time.perf_counter() - t0, 2)
    if loaded.task == "classification" or labels is None:
        return result
    if examples is None:
        examples = read_examples(settings, loaded.task)
    result.update(label_results(loaded, examples, labels, settings, decoding=decoding, log=log))
    return result


def label_results(
    loaded: Any,
    examples: list[Any],
    labels: Sequence[str] | str,
    settings: DataSettings,
    *,
    decoding: Decoding | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """``labels`` and the label-task metrics of a causal LM on ``examples`` (``{}`` when ``"auto"`` finds none)."""
    prompts, golds = label_pairs(examples)
    label_set = detect_labels(golds) if labels == "auto" else list(labels)
    if not label_set:
        return {}
    if decoding is None:
        # Room for the longest label and a few tokens more: enough to see a label, no time spent on essays.
        longest = max(len(loaded.tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in label_set)
        decoding = Decoding(
            max_new_tokens=longest + 4, template=settings.template or "auto", system_prompt=settings.system_prompt
        )
    if settings.template and decoding.template != settings.template:
        decoding = replace(decoding, template=settings.template)
    return {"labels": label_set, **label_task_metrics(loaded, prompts, golds, label_set, decoding=decoding, log=log)}


def evaluate_path(
    path: str,
    *,
    adapter: str | None = None,
    data: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
    labels: Sequence[str] | str | None = None,
    decoding: Decoding | None = None,
    log: Log = _quiet,
    **data_opts: Any,
) -> dict[str, Any]:
    """Check the data, then load ``path`` and evaluate it (see :func:`evaluate_loaded`); ``bittune eval``'s core."""
    from bittune.evaluation.loading import describe, load_model

    task = describe(path, adapter).task
    settings = data_settings(path, data, **data_opts)
    examples = read_examples(settings, task)  # before any weights: a malformed file fails in a second
    log(f"{path}: loading ...")
    loaded = load_model(path, adapter=adapter, device=device)
    log(f"{path}: loaded in {loaded.load_s:.1f}s; evaluating on {len(examples)} rows ...")
    result = evaluate_loaded(
        loaded, settings, examples=examples, batch_size=batch_size, labels=labels, decoding=decoding, log=log
    )
    result["load_s"] = loaded.load_s
    return result
