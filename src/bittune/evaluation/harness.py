"""Standard benchmarks through lm-evaluation-harness, run in-process on the model bittune loaded.

The model is whatever :func:`bittune.evaluation.loading.load_model` returns (an adapter on its base, a merged model,
a ``bittune quantize`` folder), wrapped in lm-eval's own ``HFLM``; lm-eval builds the prompts, scores and
aggregates. bittune adds the offline task files (:mod:`bittune.evaluation.tasks`), its own progress lines instead
of lm-eval's bars, and the results file ``RUN_DIR/eval/lm_eval.json``.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError, ConfigError

LM_EVAL_FILE = "lm_eval.json"
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise BittuneError(
            "--tasks needs lm-evaluation-harness, which is not installed", hint="pip install 'bittune[eval]'"
        ) from None


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(k, "0") not in ("0", "", "false", "False") for k in flags)


def task_manager(tasks: list[str], log: Log = _quiet) -> Any:
    """An lm-eval ``TaskManager`` that knows ``tasks``: bittune's offline ones, plus lm-eval's own when asked for.

    Raises:
        ConfigError: an unknown task name (with the closest names), or a hub task on an offline machine.
    """
    from lm_eval.tasks import TaskManager

    from bittune.evaluation.tasks import OFFLINE_TASKS, prepare_tasks

    ours = [t for t in tasks if t in OFFLINE_TASKS]
    folder = prepare_tasks(ours)
    others = [t for t in tasks if t not in OFFLINE_TASKS]
    if not others:  # indexing lm-eval's ~15k bundled task files takes ~15 s: only when needed
        return TaskManager(include_path=str(folder), include_defaults=False)
    if _offline():
        close = difflib.get_close_matches(others[0], list(OFFLINE_TASKS), n=1)
        raise ConfigError(
            f"--tasks {', '.join(others)}: not one of bittune's offline tasks"
            + (f" (did you mean {close[0]}?)" if close else "")
            + "; lm-eval's own tasks download their data, and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set",
            hint=f"offline tasks: {', '.join(OFFLINE_TASKS)}; or run with a network",
        )
    log(f"lm-eval: looking up {', '.join(others)} among lm-eval's tasks ...")
    manager = TaskManager(include_path=str(folder))
    for name in others:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, [*OFFLINE_TASKS, *manager.all_tasks], n=3)
            raise ConfigError(
                f"--tasks: unknown task '{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""),
                hint=f"offline tasks: {', '.join(OFFLINE_TASKS)}; or any lm-eval task name (`lm_eval ls tasks`)",
            )
    return manager


def _lm(loaded: Any, *, batch_size: int, log: Log, quiet: bool) -> Any:
    """lm-eval's ``HFLM`` around the already-loaded model, with bittune's progress lines instead of tqdm bars."""
    from lm_eval.models.huggingface import HFLM

    class BittuneLM(HFLM):
        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            log(f"lm-eval: scoring {len(requests)} (context, continuation) pairs ...")
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
            log(f"lm-eval: scoring {len(requests)} texts ...")
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or quiet)

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
            log(f"lm-eval: generating {len(requests)} answers ...")
            return super().generate_until(requests, disable_tqdm=disable_tqdm or quiet)

    return BittuneLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)


def _summary(raw: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """Per task: its metrics (``acc``, ``acc_stderr``, ...), examples scored and few-shot count."""
    out: dict[str, Any] = {}
    for name in tasks:
        res = raw.get("results", {}).get(name, {})
        metrics = {}
        for key, value in res.items():
            if "," in key and isinstance(value, int | float):
                metric, _, filt = key.partition(",")
                metrics[metric if filt == "none" else f"{metric}[{filt}]"] = value
        n = raw.get("n-samples", {}).get(name, {})
        out[name] = {
            "metrics": metrics,
            "n": n.get("effective", res.get("sample_len")),
            "num_fewshot": raw.get("n-shot", {}).get(name),
            "output_type": (raw.get("configs", {}).get(name) or {}).get("output_type"),
        }
    return out


def evaluate_tasks(
    loaded: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    chat_template: bool | None = None,
    system_instruction: str | None = None,
    batch_size: int = 8,
    manager: Any = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on an already-loaded model; returns ``{"summary", "raw"}``.

    Args:
        chat_template: Render prompts with the tokenizer's chat template (default: when it has one; answers are then
            scored as the assistant's reply).
        system_instruction: A system message for every prompt (lm-eval's ``system_instruction``).
    """
    _require_lm_eval()
    import lm_eval

    from bittune.quiet import is_quiet

    if loaded.task != "causal-lm":
        raise ConfigError("--tasks needs a causal LM; this model is a classifier", hint="use --data for classifiers")
    manager = manager or task_manager(tasks, log)
    use_chat = bool(getattr(loaded.tokenizer, "chat_template", None)) if chat_template is None else chat_template
    t0 = time.perf_counter()
    raw = lm_eval.simple_evaluate(
        model=_lm(loaded, batch_size=batch_size, log=log, quiet=is_quiet()),
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=use_chat,
        fewshot_as_multiturn=use_chat,
        system_instruction=system_instruction,
        bootstrap_iters=0 if limit is not None and limit < 100 else 1000,
        log_samples=False,
    )
    seconds = round(time.perf_counter() - t0, 1)
    summary = {
        "model": loaded.path,
        "tasks": _summary(raw, tasks),
        "settings": {
            "limit": limit,
            "num_fewshot": num_fewshot,
            "chat_template": use_chat,
            "system_instruction": system_instruction,
            "batch_size": batch_size,
            "lm_eval_version": raw.get("lm_eval_version"),
        },
        "seconds": seconds,
    }
    for name, res in summary["tasks"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in res["metrics"].items() if "stderr" not in k)
        log(f"lm-eval {name}: {shown} ({res['n']} examples)")
    keep = ("results", "configs", "versions", "n-shot", "n-samples", "higher_is_better", "lm_eval_version")
    return {"summary": summary, "raw": {k: raw[k] for k in keep if k in raw}}


def default_out(path: str) -> Path | None:
    """``RUN_DIR/eval`` when ``path`` is a bittune run directory, else None."""
    return Path(path) / "eval" if (Path(path) / "run_config.yaml").is_file() else None


def run_tasks(
    path: str,
    tasks: list[str],
    *,
    adapter: str | None = None,
    out: Path | None = None,
    device: str = "auto",
    log: Log = _quiet,
    **kwargs: Any,
) -> dict[str, Any]:
    """``bittune eval MODEL --tasks ...``: load ``path`` and run the tasks; results to ``OUT/lm_eval.json``.

    ``out`` defaults to ``RUN_DIR/eval`` for a run directory (nothing is written for other models without ``out``).
    Task names and the output folder are checked before any weights load.
    """
    from bittune.evaluation.loading import describe, load_model
    from bittune.storage import atomic_write_text

    _require_lm_eval()
    if not tasks:
        raise ConfigError("--tasks is empty", hint="e.g. --tasks trec_mc,vader_sentiment")
    task = describe(path, adapter).task
    if task != "causal-lm":
        raise ConfigError(f"--tasks needs a causal LM; {path} is a classifier", hint="use --data for classifiers")
    manager = task_manager(tasks, log)  # unknown names fail here, before the model loads
    out = Path(out) if out is not None else default_out(path)
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", hint="pass a folder")
    log(f"{path}: loading ...")
    loaded = load_model(path, adapter=adapter, device=device)
    result = evaluate_tasks(loaded, tasks, manager=manager, log=log, **kwargs)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / LM_EVAL_FILE, json.dumps(result, indent=2, default=str) + "\n")
        result["summary"]["file"] = str(out / LM_EVAL_FILE)
        log(f"lm-eval results: {out / LM_EVAL_FILE}")
    return result
