"""Use a trained model: evaluate it on data, or generate text with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bittune.errors import BittuneError

if TYPE_CHECKING:
    from bittune.artifacts import Artifact
    from bittune.config import DataConfig


def run_data(source: str | Path | Artifact) -> DataConfig | None:
    """The ``data:`` section of the run ``source`` is (validated), or None when it is not a run directory."""
    from bittune.artifacts import as_artifact

    cfg = as_artifact(source).run_config
    return cfg.data if cfg is not None else None


def evaluate_on_data(
    model_path: str,
    *,
    data: str | None = None,
    adapter: str | None = None,
    fmt: str | None = None,
    template: str | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    labels: list[str] | str | None = None,
) -> dict[str, Any]:
    """Evaluate a model (folder, hub id, adapter, run dir or quantized folder) on a data file.

    Settings not given here (data file, format, template, max length) come from the run's config when
    ``model_path`` is a bittune run directory. The data is read and checked before any weights load. Thin
    wrapper of :func:`bittune.evaluation.core.evaluate_path`.

    Returns:
        ``eval_loss`` and ``eval_perplexity`` (causal LM, token-level) or ``eval_loss``, ``eval_accuracy``,
        ``eval_f1_macro`` and ``confusion`` (classifier), plus ``rows``; label-task metrics with ``labels``.
    """
    from bittune.evaluation.core import evaluate_path

    return evaluate_path(
        model_path,
        adapter=adapter,
        data=data,
        batch_size=batch_size,
        labels=labels,
        fmt=fmt,
        template=template,
        max_length=max_length,
    )


def prepare_eval_rows(
    source: str | Path | Artifact,
    tokenizer: Any,
    task: str,
    *,
    data: str,
    fmt: str | None = None,
    template: str | None = None,
    max_length: int | None = None,
    max_rows: int | None = None,
    model: Any = None,
) -> list[dict[str, Any]]:
    """Tokenized rows of ``data`` as ``bittune eval`` reads them (defaults from the run config, when ``source`` is a
    run directory).

    Args:
        source: The model measured (an artifact from :func:`bittune.artifacts.resolve`, or its path).
        model: The loaded model; a classifier's label order is taken from its config.
    """
    from bittune.data import prepare_data

    recorded = run_data(source)
    label_names = None
    if task == "classification" and model is not None:
        id2label = model.config.id2label
        label_names = [id2label[i] for i in range(len(id2label))]
    prepared = prepare_data(
        train=data,
        eval=None,
        eval_fraction=0.0,
        fmt=fmt or (recorded.format if recorded else ("classification" if task == "classification" else "chat")),
        template=template or (recorded.template if recorded else "auto"),
        max_length=max_length or (recorded.max_length if recorded else 1024),
        packing=False,
        train_on_prompt=recorded.train_on_prompt if recorded else False,
        system_prompt=recorded.system_prompt if recorded else None,
        columns=recorded.columns if recorded else {},
        split=recorded.split if recorded else "train",
        max_rows=max_rows,
        tokenizer=tokenizer,
        task=task,
        seed=0,
        label_names=label_names,
    )
    return prepared.train


def eval_batches(rows: list[dict[str, Any]], task: str, tokenizer: Any, batch_size: int) -> Iterator[dict[str, Any]]:
    """Collated batches of ``rows`` in order."""
    from bittune.data import make_collator

    collate = make_collator(task, tokenizer.pad_token_id, False)
    return (collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size))


def generate_text(
    model_path: str,
    prompt: str,
    *,
    adapter: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    template: str = "auto",
    system_prompt: str | None = None,
    raw: bool = False,
    seed: int = 0,
) -> str:
    """Generate a reply to ``prompt`` (rendered with the chat template unless ``raw``); returns the new text."""
    import torch

    from bittune.artifacts import load, resolve
    from bittune.data import render_prompt

    artifact = resolve(model_path, adapter)
    if artifact.task != "causal-lm":  # before loading any weights
        raise BittuneError(
            f"{model_path} is a classifier (sequence classification); generate needs a causal LM",
            hint="use `bittune eval MODEL --data FILE` for classifiers",
        )
    model, tokenizer, _ = load(artifact)
    if raw:
        text = prompt
    else:
        text = render_prompt([{"role": "user", "content": prompt}], tokenizer, template, system_prompt)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=raw)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            **{k: v.to(device) for k, v in enc.items()},
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
