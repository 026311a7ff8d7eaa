"""The ``bittune quantize`` and ``bittune merge`` flows: load, (merge,) quantize, save, reload, measure, report.

The source is resolved once (:func:`bittune.artifacts.resolve`) and that artifact flows down: its run config gives
the default data, its sidecars the default spec, :func:`bittune.artifacts.load` the reference (``trained``) and the
model to quantize (``merged``). Both flows write their output folder atomically (a temp folder renamed into
place), so a failure leaves nothing behind, and both measure the saved model *as reloaded from disk* against the
reference on the same rows.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bittune.errors import ConfigError, ModelLoadError
from bittune.quant.api import check_group_size
from bittune.quant.spec import GptqSpec, GridSpec, Spec, spec_from_cli

if TYPE_CHECKING:
    from bittune.artifacts import Artifact

Log = Callable[[str], None]
MB = 1024**2


def _quiet(_: str) -> None:
    pass


def check_out_dir(out: Path) -> None:
    """``out`` must not exist, or be an empty folder: results are never written over other files."""
    from bittune.storage import check_output_path

    check_output_path(out)


def _eval_data(artifact: Artifact, data: str | None, *, train_fallback: bool) -> tuple[str | None, str | None]:
    """The data to measure on and a note on where it came from: ``data``, the run's eval file, or its train file."""
    from bittune.inference import run_data

    if data:
        return data, None
    recorded = run_data(artifact)
    if recorded is not None and recorded.eval:
        return recorded.eval, f"data: the run's eval file {recorded.eval}"
    if train_fallback and recorded is not None and recorded.train:
        return recorded.train, f"data: the run's train file {recorded.train} (the run has no eval file)"
    return None, None


def _rows(artifact: Artifact, tokenizer: Any, task: str, model: Any, data: str | None, opts: dict[str, Any]) -> Any:
    from bittune.inference import prepare_eval_rows

    if data is None:
        return None
    return prepare_eval_rows(artifact, tokenizer, task, data=data, model=model, **opts)


def source_size_mb(artifact: Artifact) -> float | None:
    """MB of weight files of the base (and adapter) on disk; None for a hub id."""
    from bittune.quant.report import weights_size

    sizes = [weights_size(artifact.base), weights_size(artifact.adapter) if artifact.adapter else 0]
    return None if sizes[0] is None else round(sum(sizes) / MB, 2)


def calibration_data(source: str | Path | Artifact, spec: Spec | None, calib: str | None) -> str | None:
    """The text GPTQ calibrates on: ``--calib``, else a run's train file; refused if there is none.

    Never the eval file by default: calibrating on the rows the quality is then measured on flatters the result.
    """
    if not isinstance(spec, GptqSpec):
        if calib:
            raise ConfigError("--calib applies to --method gptq only", hint="drop --calib, or add --method gptq")
        return None
    if calib:
        return calib
    from bittune.inference import run_data

    recorded = run_data(source)
    if recorded is not None and recorded.train:
        return recorded.train
    raise ConfigError(
        "--method gptq needs calibration text and none was given",
        hint="add --calib FILE (a few thousand tokens like your use, in any data format bittune reads; "
        "not your eval file)",
    )


def _calibration_batches(
    artifact: Artifact, spec: Spec, calib: str | None, tokenizer: Any, task: str, model: Any, opts: dict[str, Any]
) -> list | None:
    from bittune.quant.api import calibration_batches

    if calib is None or not isinstance(spec, GptqSpec):
        return None
    # Enough rows for the token budget unless rows average under 4 tokens; the file is not tokenized past that.
    rows = _rows(artifact, tokenizer, task, model, calib, {**opts, "max_rows": max(spec.calibration_tokens // 4, 1)})
    # Classifier rows stay separate ([CLS] ... [SEP] each); causal-LM text is packed into full-length sequences.
    return calibration_batches(rows, spec.calibration_tokens, per_row=task == "classification")


def preflight(artifact: Artifact, spec: Spec | None, data: str | None, calib: str | None = None) -> None:
    """Every check that needs no weights, before the slow part: the source, the group size, the data files."""
    from bittune.artifacts import QuantizedDir

    if isinstance(artifact, QuantizedDir):
        raise ModelLoadError(
            f"{artifact.path} is already quantized",
            hint="quantize the original full-precision model (or run dir) instead",
        )
    if isinstance(spec, GridSpec) and spec.group_size != -1:
        check_group_size(_skeleton(artifact), spec.group_size)
    check_data(data)
    check_data(calib)


def check_data(data: str | None) -> None:
    """Read the first row of ``data`` (a DataError names what is wrong with the file)."""
    if data:
        from bittune.data.records import read_records

        read_records(data, "train", max_rows=1)


def _skeleton(artifact: Artifact) -> Any:
    """The model's module tree without weights (meta device): enough to see its layer shapes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from bittune.model import auto_class, model_source

    with init_empty_weights():
        return auto_class(artifact.task).from_config(AutoConfig.from_pretrained(model_source(artifact.base)))


def _measure_saved(
    folder: Path, name: str, tokenizer: Any, rows: Any, device: Any, batch_size: int, reference: dict[str, Any]
) -> dict[str, Any]:
    """Reload ``folder`` (as a user would) and measure it against ``reference``."""
    from bittune.artifacts import load, resolve
    from bittune.quant.report import measure, quality_delta

    t0 = time.perf_counter()
    model, _, task = load(resolve(folder), device=device, tokenizer=tokenizer)
    load_s = round(time.perf_counter() - t0, 2)
    entry = {**_saved_entry(folder, name), "load_s": load_s}
    entry.update(measure(model, tokenizer, task, rows, batch_size=batch_size))
    entry["delta"] = quality_delta(reference, entry, task)
    del model
    gc.collect()
    return entry


def _saved_entry(folder: Path, name: str) -> dict[str, Any]:
    """A saved model's report entry before any measurement: its name and its weights' size on disk."""
    from bittune.quant.report import weights_size

    return {"name": name, "size_mb": round((weights_size(folder) or 0) / MB, 2)}


def _load_reference(
    artifact: Artifact, name: str, dev: Any, data: str | None, data_opts: dict[str, Any] | None, batch_size: int
) -> tuple[Any, Any, str, list, dict[str, Any]]:
    """Load the source as trained (adapter on its base as in training), read the rows, and measure it."""
    from bittune.artifacts import load
    from bittune.quant.report import measure, warm_imports

    warm_imports(artifact)
    t0 = time.perf_counter()
    model, tokenizer, task = load(artifact, as_="trained", device=dev)
    load_s = round(time.perf_counter() - t0, 2)
    rows = _rows(artifact, tokenizer, task, model, data, data_opts or {})
    reference = {"name": name, "size_mb": source_size_mb(artifact), "load_s": load_s}
    reference.update(measure(model, tokenizer, task, rows, batch_size=batch_size))
    return model, tokenizer, task, rows, reference


def quantize_path(
    source: str | Path | Artifact,
    spec: Spec,
    out: Path,
    *,
    data: str | None = None,
    calib: str | None = None,
    data_opts: dict[str, Any] | None = None,
    batch_size: int = 8,
    device: str = "auto",
    measure: bool = True,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Quantize a model folder or run directory into ``out`` and write its quality report there.

    Args:
        source: Model folder, hub id, adapter folder or run directory, as resolved by
            :func:`bittune.artifacts.resolve` (or its path). Adapters are merged first, by the merge policy.
        spec: What to do (see :mod:`bittune.quant.spec`).
        out: New folder (must not exist, or be empty).
        data: Data to measure quality on; default: the run's eval file, else quality is not measured.
        calib: GPTQ's calibration text; default: a run's train file (see :func:`calibration_data`).
        data_opts: ``fmt``, ``template``, ``max_length``, ``max_rows`` for reading ``data`` (and ``calib``).
        measure: False: no quality measurement, not even on the run's eval file (for a caller that measures the
            quantized model itself, e.g. in a report beside others: each measurement is a pass over the data).

    Returns:
        The report (also in ``out/quant_report.json`` and ``.md``).
    """
    from bittune.artifacts import as_artifact, load
    from bittune.model import resolve_device
    from bittune.quant import quantize
    from bittune.quant.io import save_quantized
    from bittune.quant.report import write_report
    from bittune.quant.select import quantizable_linears
    from bittune.storage import atomic_dir

    out = Path(out)
    check_out_dir(out)
    artifact = as_artifact(source)
    source = artifact.path
    data, data_note = _eval_data(artifact, data, train_fallback=False) if measure else (None, None)
    calib = calibration_data(artifact, spec, calib)
    preflight(artifact, spec, data, calib)
    dev = resolve_device(device)
    log(f"loading {source} ...")
    if measure:
        log("measuring the unquantized model" + (f" on {data}" if data else "") + " ...")
        ref_model, tokenizer, task, rows, reference = _load_reference(
            artifact, "reference (unquantized)", dev, data, data_opts, batch_size
        )
        if _has_adapter_or_bnb(ref_model):  # one float model to quantize, by the merge policy
            del ref_model
            gc.collect()
            model = load(artifact, as_="merged", device=dev, tokenizer=tokenizer).model
        else:
            model = ref_model
    else:  # nothing to measure the trained form on: load the float model to quantize, once
        model, tokenizer, task = load(artifact, as_="merged", device=dev)
        rows, reference = None, {"name": "reference (unquantized)", "size_mb": source_size_mb(artifact)}
    layers = [n for n, _ in quantizable_linears(model)]
    batches = _calibration_batches(artifact, spec, calib, tokenizer, task, model, data_opts or {})
    log(f"quantizing {len(layers)} linear layers: {spec.label()} ...")
    t0 = time.perf_counter()
    quantize(model, spec, calibration=batches, log=log)
    quant_s = round(time.perf_counter() - t0, 1)
    label_names = _label_names(model, task)
    report: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        nonlocal model
        save_quantized(model, tmp, spec=spec, task=task, tokenizer=tokenizer, source=source, label_names=label_names)
        model = None
        gc.collect()
        if measure:
            log("reloading the saved model and measuring it ...")
            entry = _measure_saved(tmp, spec.label(), tokenizer, rows, dev, batch_size, reference)
        else:
            entry = _saved_entry(tmp, spec.label())
        report.update(
            title=f"{spec.label()} quantization of {source}",
            task=task,
            source=source,
            spec=spec.model_dump(),
            data=data,
            calibration=_calibration_note(calib, batches),
            device=str(dev),
            quantize_s=quant_s,
            models=[reference, entry],
            notes=_notes(data, data_note, dev, spec),
        )
        write_report(tmp, report)

    atomic_dir(out, write)
    return report


def _calibration_note(calib: str | None, batches: list | None) -> dict[str, Any] | None:
    if not batches:
        return None
    return {"data": calib, "tokens": sum(int(b["input_ids"].numel()) for b in batches)}


def _has_adapter_or_bnb(model: Any) -> bool:
    return hasattr(model, "peft_config") or getattr(model.config, "quantization_config", None) is not None


def _label_names(model: Any, task: str) -> list[str] | None:
    if task != "classification":
        return None
    return [model.config.id2label[i] for i in range(len(model.config.id2label))]


def _notes(data: str | None, data_note: str | None, dev: Any, spec: Spec | None) -> list[str]:
    notes = [data_note] if data_note else []
    if data is None:
        notes.append("no --eval data: size, memory and speed only; quality not measured")
    if dev.type == "cpu":
        notes.append("CPU: computed in float32 (16-bit weights are upcast on load)")
    if isinstance(spec, GridSpec):
        notes.append("int/hqq/gptq layers have no fused kernels: each forward dequantizes, then a float matmul")
    return notes


def merge_spec(
    artifact: Artifact,
    bits: int,
    method: str | None,
    group_size: int | None,
    symmetric: bool,
    calib_tokens: int | None = None,
) -> Spec:
    """The spec for ``merge --into-quantized BITS`` (``--method`` etc. as given, else the defaults of ``quantize``).

    A QLoRA run at 4 bits is the exception: its merged weights are its NF4/FP4 grid values plus a LoRA-sized change,
    and re-quantizing them on the same bitsandbytes grid rounds nearly every weight back onto the base (the tuned
    model is lost), so without ``--method`` it gets round-to-nearest int4 on another grid.
    """
    if method is None and bits == 4 and artifact.training_quant is not None:
        method = "int"
    return spec_from_cli(
        bits=bits,
        method=method,
        group_size=group_size,
        symmetric=symmetric,
        calibration_tokens=calib_tokens,
        bits_flag="--into-quantized",  # merge's name for the bits, in its messages
    )


def require_adapter(artifact: Artifact) -> str:
    """The adapter folder of a run directory (or adapter folder) to merge; a clear error for anything else."""
    from bittune.artifacts import HubId, ModelDir, RunDir

    path = artifact.path
    if isinstance(artifact, HubId) or not Path(path).is_dir():
        raise ModelLoadError(f"{path} is not a directory", hint="pass a bittune run directory (or an adapter folder)")
    if isinstance(artifact, RunDir) and isinstance(artifact.final, ModelDir):
        raise ModelLoadError(
            f"{path} is a full fine-tuning run: its model/ has no adapter to merge",
            hint=f"use it as it is, or shrink it with `bittune quantize {path} --bits 4`",
        )
    if artifact.adapter is None:
        raise ModelLoadError(
            f"{path} has no LoRA adapter to merge",
            hint="pass a LoRA/QLoRA run directory (with adapter/) or an adapter folder",
        )
    return artifact.adapter


def merge_run(
    run_dir: str | Path | Artifact,
    out: Path,
    *,
    into_bits: int | None = None,
    method: str | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
    calib_tokens: int | None = None,
    data: str | None = None,
    calib: str | None = None,
    data_opts: dict[str, Any] | None = None,
    batch_size: int = 8,
    device: str = "auto",
    measure: bool = True,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Merge a run's LoRA adapter into its base by the merge policy: full precision, or (``into_bits``)
    re-quantized and measured.

    The reference is the adapter on its base as trained (a QLoRA adapter on its NF4 base); the merged model is
    :func:`bittune.artifacts.load` ``as_="merged"`` (the same weights ``bittune export`` writes). It is measured
    against the reference on the run's eval data (or ``data``; else the run's train data), and the change goes into
    ``out/merge_report.json``; ``report["warnings"]`` is non-empty when the change is large.

    ``measure=False``: no measurement (the merged model is loaded once, the reference not at all), for a caller
    that measures the merged model itself, as :func:`quantize_path`'s.
    """
    from bittune.artifacts import as_artifact, load

    out = Path(out)
    artifact = as_artifact(run_dir)
    adapter = require_adapter(artifact)
    check_out_dir(out)
    spec = None if into_bits is None else merge_spec(artifact, into_bits, method, group_size, symmetric, calib_tokens)
    if spec is None and (method or group_size is not None or symmetric or calib_tokens is not None):
        raise ConfigError(
            "--method/--group-size/--symmetric/--calib-tokens need --into-quantized BITS",
            hint="add --into-quantized 4",
        )
    data, data_note = _eval_data(artifact, data, train_fallback=True) if measure else (None, None)
    calib = calibration_data(artifact, spec, calib)
    preflight(artifact, spec, data, calib)
    from bittune.model import resolve_device

    dev = resolve_device(device)
    reference_name = "adapter on base (as trained)"
    if measure:
        log(f"loading {artifact.path} (adapter on its base, as trained) ...")
        ref_model, tokenizer, task, rows, reference = _load_reference(
            artifact, reference_name, dev, data, data_opts, batch_size
        )
        del ref_model
        gc.collect()
    else:
        tokenizer, rows, reference = None, None, {"name": reference_name, "size_mb": source_size_mb(artifact)}
    base_q = artifact.training_quant
    log("merging the adapter in float32" + (f" into its dequantized {base_q.label()} base" if base_q else "") + " ...")
    merged, tokenizer, task = load(artifact, as_="merged", device=dev, tokenizer=tokenizer)
    return _write_merge(artifact, adapter, merged, tokenizer, task, rows, reference, out, spec=spec, data=data,
                        data_note=data_note, calib=calib, data_opts=data_opts, batch_size=batch_size, dev=dev,
                        log=log)  # fmt: skip


def _write_merge(
    artifact: Artifact,
    adapter: str,
    merged: Any,
    tokenizer: Any,
    task: str,
    rows: Any,
    reference: dict[str, Any],
    out: Path,
    *,
    spec: Spec | None,
    data: str | None,
    data_note: str | None,
    calib: str | None,
    data_opts: dict[str, Any] | None,
    batch_size: int,
    dev: Any,
    log: Log,
) -> dict[str, Any]:
    """Measure the float merge, write it (or its re-quantization) into ``out`` atomically with the report."""
    from bittune.quant import quantize
    from bittune.quant.io import save_quantized
    from bittune.quant.report import measure, quality_delta, write_report
    from bittune.sidecars import write_labels
    from bittune.storage import atomic_dir

    base_q, run_dir = artifact.training_quant, artifact.path
    fp_name = "merged fp32" + (f" (dequantized {base_q.method.upper()} base)" if base_q else "")
    fp_entry: dict[str, Any] = {"name": fp_name}
    if rows is not None:  # measured (merge_run's measure=True)
        fp_entry.update(measure(merged, tokenizer, task, rows, batch_size=batch_size))
        fp_entry["delta"] = quality_delta(reference, fp_entry, task)
    label_names = _label_names(merged, task)
    report: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        nonlocal merged
        entries = [reference, fp_entry]
        if spec is None:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if label_names:
                write_labels(tmp, label_names)
            fp_entry["size_mb"] = round(sum(p.stat().st_size for p in tmp.glob("*.safetensors")) / MB, 2)
        else:
            log(f"re-quantizing the merged model: {spec.label()} ...")
            batches = _calibration_batches(artifact, spec, calib, tokenizer, task, merged, data_opts or {})
            report["calibration"] = _calibration_note(calib, batches)
            quantize(merged, spec, calibration=batches, log=log)
            save_quantized(
                merged, tmp, spec=spec, task=task, tokenizer=tokenizer, source=run_dir, label_names=label_names
            )
            merged = None
            gc.collect()
            name = f"merged {spec.label()}"
            if rows is None:
                entries.append(_saved_entry(tmp, name))
            else:
                log("reloading the merged quantized model and measuring it ...")
                entries.append(_measure_saved(tmp, name, tokenizer, rows, dev, batch_size, reference))
        final = entries[-1]
        warnings = []
        if final.get("delta", {}).get("large"):
            warnings.append(_large_delta_warning(final, task, spec))
        report.update(
            title=f"merge of {run_dir}" + (f" into {spec.label()}" if spec else " (full precision)"),
            task=task,
            source=run_dir,
            adapter=adapter,
            base_quantization=base_q.model_dump() if base_q else None,
            spec=spec.model_dump() if spec else None,
            data=data,
            calibration=report.get("calibration"),
            device=str(dev),
            models=entries,
            warnings=warnings,
            notes=_notes(data, data_note, dev, spec),
        )
        write_report(tmp, report, name="merge_report")

    atomic_dir(out, write)
    return report


def _large_delta_warning(entry: dict[str, Any], task: str, spec: Spec | None) -> str:
    d = entry["delta"]
    if task == "classification":
        what = f"accuracy {100 * d['accuracy']:+.2f} pt"
    else:
        what = f"perplexity {d['perplexity_pct']:+.2f}%"
    fix = (
        "keep the adapter separate (serve it on the quantized base), or re-quantize with more bits or --method hqq"
        if spec is not None
        else "check the run: a full-precision merge should match the adapter"
    )
    return f"{entry['name']} changed quality against the adapter on its base: {what} (loss {d['loss']:+.4f}); {fix}"


def describe(report: dict[str, Any]) -> str:
    """The report's table and notes, for the terminal."""
    from bittune.quant.report import table

    lines = [report["title"], table(report["models"], report["task"])]
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)
