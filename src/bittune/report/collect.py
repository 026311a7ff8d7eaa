"""What a report shows, gathered from a run directory and measured on the same data and prompts for every model."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError
from bittune.storage import read_json

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
        return read_json(f) if f.is_file() else None

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


@dataclass(frozen=True)
class ReportInputs:
    """What a report measures every model on: its data (read once), the sample prompts and their decoding."""

    settings: Any  # bittune.evaluation.core.DataSettings, or None: no quality table
    examples: list[Any] | None
    prompts: list[Any]
    decoding: Any  # bittune.evaluation.generation.Decoding
    sample_tokens: int = SAMPLE_TOKENS  # new tokens of each sample reply

    def fingerprint(self) -> str:
        """A digest of all of it (the data file's bytes included), stored with each model measured on it: a report
        reuses a model's numbers only when they were measured on exactly these inputs."""
        import dataclasses
        import hashlib

        key = {
            "settings": dataclasses.asdict(self.settings) if self.settings is not None else None,
            "rows": len(self.examples) if self.examples is not None else None,
            "prompts": self.prompts,
            "decoding": self.decoding.to_dict(),
            "sample_tokens": self.sample_tokens,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
        if self.settings is not None and Path(self.settings.data).is_file():
            digest.update(Path(self.settings.data).read_bytes())
        return digest.hexdigest()[:16]


def report_inputs(
    run_data: Any,
    task: str,
    *,
    data: str | None = None,
    where: str = "the run",
    samples: tuple[int, int] = (N_SAMPLES, SAMPLE_TOKENS),
) -> ReportInputs:
    """The data to measure on (``data``, else the run's eval file; none: no quality table) read and checked, the
    sample prompts (its first rows, causal LMs) and their decoding, from a run's validated ``data:`` section.

    Args:
        run_data: ``cfg.data`` of a run config (before the run trains), or of a finished run.
        task: ``causal-lm`` or ``classification``.
        where: The run directory (for messages).
        samples: ``(prompts, new tokens)`` of the side-by-side sample replies.
    """
    from bittune.evaluation.core import data_settings, label_pairs, read_examples
    from bittune.evaluation.generation import Decoding

    settings = examples = None
    if data or run_data.eval:
        settings = data_settings(where, data, recorded=run_data)
        examples = read_examples(settings, task)
    prompts: list[Any] = []
    if examples is not None and task == "causal-lm":
        prompts = label_pairs(examples[: samples[0]])[0]
    decoding = Decoding(template=run_data.template or "auto", system_prompt=run_data.system_prompt)
    return ReportInputs(settings, examples, prompts, decoding, samples[1])


def measure_model(name: str, path: str, *, inputs: ReportInputs, device: str = "auto", log: Log = _quiet) -> dict:
    """Load ``path`` once: its metrics on the report's data (if any) and its replies to the sample prompts.

    Also what :class:`ReportOptions` takes as ``measured``: a model measured earlier on the same ``inputs`` (the demo
    measures base and tuned as its story goes, and its report reuses those numbers).
    """
    from bittune.evaluation.core import evaluate_loaded
    from bittune.evaluation.generation import generate_replies
    from bittune.evaluation.loading import load_model

    log(f"measuring {name} ({path}) ...")
    loaded = load_model(path, device=device)
    from bittune.quant.flows import source_size_mb

    artifact = loaded.artifact  # resolved once, by the load
    entry: dict[str, Any] = {"name": name, "path": path, "kind": _kind(artifact), "load_s": loaded.load_s}
    entry["size_mb"] = source_size_mb(artifact)
    entry["inputs"] = inputs.fingerprint()
    if inputs.examples is not None:
        entry["metrics"] = evaluate_loaded(
            loaded, inputs.settings, examples=inputs.examples, labels="auto", log=lambda m: log(f"  {name}: {m}")
        )
    if inputs.prompts and loaded.task == "causal-lm":
        decoding = inputs.decoding
        sample_decoding = type(decoding)(**{**decoding.to_dict(), "max_new_tokens": inputs.sample_tokens})
        entry["replies"] = generate_replies(
            loaded.model, loaded.tokenizer, inputs.prompts, sample_decoding, batch_size=8
        )
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


@dataclass(frozen=True)
class ReportOptions:
    """What a report measures besides the run's own base and tuned models, on which data, and where.

    Attributes:
        compare: More models to put beside base and tuned (quantized or merged folders, other runs).
        data: Data to measure on (default: the run's eval file; without either, no quality table).
        gguf: A GGUF export whose replies (in llama.cpp, when installed) join the side-by-side generations.
        base: Also measure the base model (causal LMs).
        device: auto, cpu or cuda.
        measured: Models already measured by :func:`measure_model` on this report's inputs (by name and path), used
            as they are instead of being measured again.
        samples: ``(prompts, new tokens)`` of the side-by-side sample replies (default 4 prompts, 48 tokens).
    """

    compare: list[str] | None = None
    data: str | None = None
    gguf: Path | None = None
    base: bool = True
    device: str = "auto"
    measured: list[dict[str, Any]] | None = None
    samples: tuple[int, int] = (N_SAMPLES, SAMPLE_TOKENS)


def collect(run_dir: Path, options: ReportOptions = ReportOptions(), *, log: Log = _quiet) -> dict[str, Any]:
    """Everything :mod:`bittune.report.render` needs: the run's records plus base / tuned / compared models measured
    on the run's eval data (or ``options.data``) and on the same sample prompts.

    Raises:
        BittuneError: a ``measured`` model that is not one of the report's, or was measured on other inputs.
    """
    from bittune.evaluation.loading import describe
    from bittune.inference import run_data
    from bittune.quant.report import read_folder_report

    run = read_run(run_dir)
    task = describe(str(run_dir)).task  # a run without final weights fails here, before anything loads
    compare = list(options.compare or [])
    for path in compare:
        describe(path)
    if options.gguf is not None and not Path(options.gguf).expanduser().is_file():
        raise BittuneError(f"--gguf {options.gguf} does not exist", hint="pass the .gguf file bittune export wrote")
    inputs = report_inputs(run_data(str(run_dir)), task, data=options.data, where=str(run_dir), samples=options.samples)
    models: list[tuple[str, str]] = []
    base_path = (run["config"].get("model") or {}).get("path")
    if options.base and base_path and task == "causal-lm":
        models.append(("base", str(base_path)))
    models.append(("tuned", str(run_dir)))
    models += [(Path(p).name or p, p) for p in compare]
    reuse = _reusable(options.measured or [], models, inputs)
    run["models"] = [
        reuse.get(name) or measure_model(name, path, inputs=inputs, device=options.device, log=log)
        for name, path in models
    ]
    run["task"] = task
    run["data"] = inputs.settings.data if inputs.settings else None
    run["prompts"] = inputs.prompts
    run["decoding"] = {**inputs.decoding.to_dict(), "max_new_tokens": inputs.sample_tokens}
    if options.gguf is not None:
        replies = gguf_replies(Path(options.gguf), inputs.prompts, inputs.sample_tokens)
        run["gguf"] = {"path": str(options.gguf), "replies": replies}
        if replies is None:
            log("report: llama-cpp-python is not installed; the GGUF column is left out (make llamacpp)")
    run["quantization"] = [r for r in map(read_folder_report, compare) if r]
    return run


def _reusable(
    measured: list[dict[str, Any]], models: list[tuple[str, str]], inputs: ReportInputs
) -> dict[str, dict[str, Any]]:
    """``measured`` by name, each checked to be one of ``models`` (same path) measured on ``inputs``."""
    paths = dict(models)
    fingerprint = inputs.fingerprint()
    out = {}
    for entry in measured:
        name = entry.get("name")
        if paths.get(name) != entry.get("path"):
            raise BittuneError(f"the report measures no model {name!r} at {entry.get('path')}")
        if entry.get("inputs") != fingerprint:
            raise BittuneError(f"{name} ({entry.get('path')}) was measured on other data or prompts than the report's")
        out[name] = entry
    return out
