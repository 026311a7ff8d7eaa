"""What a report shows, gathered from a run directory and measured on the same data and prompts for every model."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError

Log = Callable[[str], None]
N_SAMPLES = 4
SAMPLE_TOKENS = 48


def _quiet(_: str) -> None:
    pass


def read_run(run_dir: Path) -> dict[str, Any]:
    """config, summary, metrics records, lm-eval results and quantization reports found in ``run_dir``."""
    from bittune.evaluation.harness import LM_EVAL_FILE
    from bittune.training.metrics import read_metrics

    run_dir = Path(run_dir)
    if not (run_dir / "run_config.yaml").is_file():
        raise BittuneError(
            f"{run_dir} is not a bittune run directory (no run_config.yaml)",
            hint="pass the output_dir of a `bittune train` run",
        )
    from bittune.config import read_run_config

    def js(rel: str) -> Any:
        f = run_dir / rel
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None

    return {
        "run_dir": str(run_dir),
        "config": read_run_config(run_dir).model_dump(mode="json"),
        "summary": js("summary.json") or {},
        "metrics": read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else [],
        "lm_eval": (js(f"eval/{LM_EVAL_FILE}") or {}).get("summary"),
        "ladder": js("ladder.json"),
    }


def _kind(artifact: Any) -> str:
    from bittune.compare import artifact_kind

    try:
        return artifact_kind(artifact)
    except Exception:  # a model the describing code cannot classify is still measured
        return "model"


def measure_model(
    name: str,
    path: str,
    *,
    settings: Any,
    examples: list[Any] | None,
    prompts: list[Any],
    decoding: Any,
    device: str,
    log: Log,
) -> dict[str, Any]:
    """Load ``path`` once: its metrics on the report's data (if any) and its replies to the sample prompts."""
    from bittune.evaluation.core import evaluate_loaded
    from bittune.evaluation.generation import generate_replies
    from bittune.evaluation.loading import load_model

    log(f"report: {name} ({path}) ...")
    loaded = load_model(path, device=device)
    from bittune.quant.flows import source_size_mb

    artifact = loaded.artifact  # resolved once, by the load
    entry: dict[str, Any] = {"name": name, "path": path, "kind": _kind(artifact), "load_s": loaded.load_s}
    entry["size_mb"] = source_size_mb(artifact)
    if examples is not None:
        entry["metrics"] = evaluate_loaded(
            loaded, settings, examples=examples, labels="auto", log=lambda m: log(f"  {name}: {m}")
        )
    if prompts and loaded.task == "causal-lm":
        sample_decoding = type(decoding)(**{**decoding.to_dict(), "max_new_tokens": SAMPLE_TOKENS})
        entry["replies"] = generate_replies(loaded.model, loaded.tokenizer, prompts, sample_decoding, batch_size=8)
    del loaded
    gc.collect()
    return entry


def gguf_replies(gguf: Path, prompts: list[Any], max_tokens: int = SAMPLE_TOKENS) -> list[str] | None:
    """Replies of a GGUF file in llama.cpp (its own chat template, stopping at its eos); None without llama-cpp."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=1024, verbose=False, seed=0)
    out = []
    for p in prompts:
        if isinstance(p, str):
            res = llm.create_completion(p, max_tokens=max_tokens, temperature=0.0)
            out.append(res["choices"][0]["text"].strip())
        else:
            res = llm.create_chat_completion(messages=list(p), max_tokens=max_tokens, temperature=0.0)
            out.append((res["choices"][0]["message"]["content"] or "").strip())
    return out


def collect(
    run_dir: Path,
    *,
    compare: list[str] | None = None,
    data: str | None = None,
    gguf: Path | None = None,
    base: bool = True,
    device: str = "auto",
    log: Log = _quiet,
) -> dict[str, Any]:
    """Everything :mod:`bittune.report.render` needs: the run's records plus base / tuned / compared models measured
    on the run's eval data (or ``data``) and on the same sample prompts."""
    from bittune.evaluation.core import data_settings, label_pairs, read_examples
    from bittune.evaluation.generation import Decoding
    from bittune.evaluation.loading import describe

    run = read_run(run_dir)
    task = describe(str(run_dir)).task  # a run without final weights fails here, before anything loads
    compare = list(compare or [])
    for path in compare:
        describe(path)
    settings = examples = None
    if data or (run["config"].get("data") or {}).get("eval"):
        settings = data_settings(str(run_dir), data)
        examples = read_examples(settings, task)
    prompts: list[Any] = []
    if examples is not None and task == "causal-lm":
        prompts = label_pairs(examples[:N_SAMPLES])[0]
    cfg_data = run["config"].get("data") or {}
    decoding = Decoding(template=cfg_data.get("template") or "auto", system_prompt=cfg_data.get("system_prompt"))
    models: list[tuple[str, str]] = []
    base_path = (run["config"].get("model") or {}).get("path")
    if base and base_path and task == "causal-lm":
        models.append(("base", str(base_path)))
    models.append(("tuned", str(run_dir)))
    models += [(Path(p).name or p, p) for p in compare]
    kw = {"settings": settings, "examples": examples, "prompts": prompts, "decoding": decoding, "device": device}
    run["models"] = [measure_model(name, path, log=log, **kw) for name, path in models]
    run["task"] = task
    run["data"] = settings.data if settings else None
    run["prompts"] = prompts
    run["decoding"] = {**decoding.to_dict(), "max_new_tokens": SAMPLE_TOKENS}
    if gguf is not None:
        replies = gguf_replies(Path(gguf), prompts)
        run["gguf"] = {"path": str(gguf), "replies": replies}
        if replies is None:
            log("report: llama-cpp-python is not installed; the GGUF column is left out (make llamacpp)")
    run["quantization"] = [_quant_report(p) for p in compare if _quant_report(p)]
    return run


def _quant_report(path: str) -> dict[str, Any] | None:
    for name in ("quant_report.json", "merge_report.json"):
        f = Path(path) / name
        if f.is_file():
            return {"path": path, **json.loads(f.read_text(encoding="utf-8"))}
    return None
