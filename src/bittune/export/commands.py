"""``bittune export``: check every argument first, then load (merging a LoRA run), write, and optionally verify."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError, ModelLoadError

FORMATS = ("gguf", "gguf-lora", "hf")
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _dequantizing(source: Any) -> str:
    return f" (a {source.quantized} folder: its quantized values are written in float)" if source.quantized else ""


def export_model(
    path: str,
    *,
    fmt: str,
    out: Path,
    qtype: str = "f16",
    verify: bool = False,
    imatrix: str | None = None,
    imatrix_tokens: int | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Export a model folder or a bittune run directory.

    Args:
        path: Model folder, adapter folder or run directory (a LoRA adapter is merged into its base).
        fmt: ``gguf`` (one file for llama.cpp), ``gguf-lora`` (a run's LoRA adapter as a llama.cpp adapter file)
            or ``hf`` (a Hugging Face folder with a model card).
        out: The .gguf file or the folder to write.
        qtype: GGUF type: ``f32``, ``f16``, ``q8_0``, ``q4_0`` (written by bittune) or a K-quant/IQ type made by
            llama.cpp's quantizer (``q4_k_m``, ``q6_k``, ``iq4_xs``, ...; see ``kquants.LLAMACPP_TYPES``).
            ``gguf-lora``: ``f32`` or ``f16``.
        verify: GGUF only: load the file in llama.cpp and compare it with transformers before keeping it.
        imatrix: llama.cpp types only: ``auto`` (the run's train file), a data file, or a llama.cpp imatrix GGUF.
        imatrix_tokens: Tokens of that data the importance matrix is computed on.
        log: Progress messages.

    Returns:
        What was written (and the verification figures with ``verify``).
    """
    from bittune.export.gguf_writer import GGUF_TYPES
    from bittune.export.kquants import LLAMACPP_TYPES, NEEDS_IMATRIX

    if fmt not in FORMATS:
        raise BittuneError(f"unknown --format '{fmt}'", hint=f"use one of: {', '.join(FORMATS)}")
    types = (*GGUF_TYPES, *LLAMACPP_TYPES) if fmt == "gguf" else ("f32", "f16")
    if fmt != "hf" and qtype not in types:
        raise BittuneError(f"unknown --type '{qtype}' for --format {fmt}", hint=f"use one of: {', '.join(types)}")
    if fmt == "hf" and verify:
        raise BittuneError("--verify checks a GGUF file in llama.cpp", hint="use it with --format gguf")
    if imatrix is not None and (fmt != "gguf" or qtype not in LLAMACPP_TYPES):
        raise BittuneError(
            f"--imatrix applies to the types llama.cpp's quantizer makes, not to --type {qtype}",
            hint=f"use it with e.g. --type q4_k_m (any of: {', '.join(LLAMACPP_TYPES)}), or drop --imatrix",
        )
    if fmt == "gguf" and qtype in NEEDS_IMATRIX and imatrix is None:
        raise BittuneError(
            f"--type {qtype} needs an importance matrix (llama.cpp quantizes it to noise without one)",
            hint="add --imatrix auto (a run's train file) or --imatrix FILE (text like your use)",
        )
    if fmt == "gguf-lora":
        from bittune.export.gguf_lora import export_gguf_lora

        return export_gguf_lora(path, out, qtype=qtype, verify=verify, log=log)
    if fmt == "gguf":
        return export_gguf(
            path, out, qtype=qtype, verify=verify, imatrix=imatrix, imatrix_tokens=imatrix_tokens, log=log
        )
    return export_hf(path, out, log=log)


def gguf_name(source: Any) -> str:
    """``general.name`` of an export: the base model and how it was made (``smollm2-135m-instruct-lora``).

    A run is named after its base (the ``model.path`` it was trained from) and its method; a ``bittune quantize``
    folder after its method label; a plain model folder after itself.
    """
    if source.run_dir is None:
        base = Path(source.base).name
        if source.adapter is not None:
            return f"{base}-lora"
        return f"{base}-{source.quantized}" if source.quantized else base
    import yaml

    raw = yaml.safe_load((source.run_dir / "run_config.yaml").read_text(encoding="utf-8")) or {}
    model_path = str((raw.get("model") or {}).get("path") or source.base).rstrip("/")
    base = Path(model_path).stem if model_path.endswith(".gguf") else Path(model_path).name
    method = str(raw.get("method") or "lora")
    qat = (raw.get("qat") or {}).get("method")
    return f"{base}-{method}" + (f"-{qat}" if qat and qat != "int" else "")


def _note_qat_grid(path: str, qtype: str, log: Log) -> None:
    """Say when a run trained on llama.cpp's grid is exported to another type than the one it trained for."""
    from bittune.quant.qat import read_qat_settings

    method = str((read_qat_settings(path) or {}).get("method", "int"))
    if method.startswith("gguf-") and method[5:] != qtype:
        log(
            f"note: this run trained on llama.cpp's {method[5:].upper()} grid; --type {method[5:]} stores exactly "
            f"the trained weights, --type {qtype} writes its float (latent) weights in {qtype}"
        )


def export_gguf(
    path: str,
    out: Path,
    *,
    qtype: str,
    verify: bool,
    imatrix: str | None = None,
    imatrix_tokens: int | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Write ``path`` as a GGUF file at ``out``; with ``verify`` it is kept only if llama.cpp agrees."""
    from bittune.export.gguf_writer import check_architecture, check_output, write_gguf
    from bittune.export.kquants import LLAMACPP_TYPES, require_llamacpp
    from bittune.export.source import load_merged, load_source_tokenizer, resolve_source
    from bittune.export.tokenizer_meta import check_tokenizer

    out = check_output(out)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise BittuneError(
            "GGUF export needs the 'gguf' package, which is not installed", hint="pip install 'bittune[export]'"
        ) from None
    if qtype in LLAMACPP_TYPES:
        require_llamacpp(qtype)  # before the slow part
    if verify:
        from bittune.export.verify import require_llama_cpp

        require_llama_cpp()
    imatrix_file = None
    if imatrix is not None:
        from bittune.export.imatrix import imatrix_data

        imatrix_file = imatrix_data(path, imatrix)
    source = resolve_source(path)
    if source.task != "causal-lm":
        raise ModelLoadError(
            f"{path} is a sequence classifier; GGUF export is for causal language models",
            hint="export it with --format hf",
        )
    check_architecture(source.config, f"{path} ({source.base})" if source.adapter else path)
    tokenizer = load_source_tokenizer(source)
    check_tokenizer(tokenizer)  # before the weights are read
    log(f"loading {path}" + (" and merging its LoRA adapter" if source.adapter else _dequantizing(source)))
    model, tokenizer = load_merged(source, tokenizer)
    _note_qat_grid(path, qtype, log)
    name = gguf_name(source)
    matrix = None
    if imatrix_file is not None:
        from bittune.export.imatrix import DEFAULT_TOKENS, compute_for_export

        tokens = imatrix_tokens or DEFAULT_TOKENS
        matrix = compute_for_export(path, model, tokenizer, imatrix_file, tokens=tokens, log=log)
    target = out.with_name(f".{out.name}.verify-{os.getpid()}") if verify else out
    try:
        if qtype in LLAMACPP_TYPES:
            from bittune.export.kquants import write_llamacpp_quantized

            result = write_llamacpp_quantized(model, tokenizer, target, qtype=qtype, name=name, imatrix=matrix, log=log)
        else:
            result = write_gguf(model, tokenizer, target, qtype=qtype, name=name, log=log)
        if verify:
            from bittune.export.verify import compare_with_llamacpp

            log("verifying in llama.cpp against transformers ...")
            check = compare_with_llamacpp(target, model, tokenizer, qtype=qtype)
            result["verify"] = check.as_dict()
            if not check.passed:
                raise BittuneError(
                    f"llama.cpp disagrees with transformers on the {qtype} export: " + "; ".join(check.problems),
                    hint="nothing was written; please report this with the model's config.json",
                )
            os.replace(target, out)
            result["path"] = str(out)
    finally:
        if verify:
            target.unlink(missing_ok=True)
    result["source"] = path
    result["name"] = name
    if matrix is not None:
        result["imatrix"] = {"data": imatrix_file, "tensors": len(matrix.sums), "chunks": matrix.chunks}
    result["merged_adapter"] = source.adapter is not None
    if source.quantized:
        result["dequantized_from"] = source.quantized
    return result


def export_hf(path: str, out: Path, *, name: str | None = None, log: Log = _quiet) -> dict[str, Any]:
    """Write ``path`` as a merged Hugging Face folder at ``out`` with a model card (README.md)."""
    from bittune.export.card import model_card
    from bittune.export.hf import check_out_dir, save_hf_folder
    from bittune.export.source import load_merged, resolve_source
    from bittune.training.checkpoint import atomic_dir

    out = check_out_dir(out)
    source = resolve_source(path)
    log(f"loading {path}" + (" and merging its LoRA adapter" if source.adapter else _dequantizing(source)))
    model, tokenizer = load_merged(source)
    card = model_card(
        name=name or out.name,
        base=source.base,
        task=source.task,
        run_dir=source.run_dir,
        kbit=source.kbit,
        merged=source.adapter is not None,
        quantized=source.quantized,
    )
    info = {"source": Path(path).name, "merged_adapter": source.adapter is not None, "task": source.task}
    if source.quantized:
        info["dequantized_from"] = source.quantized
    atomic_dir(out, lambda tmp: save_hf_folder(model, tokenizer, tmp, card=card, info=info), marker=False)
    files = sorted(p.name for p in out.iterdir())
    return {"path": str(out), "files": files, "merged_adapter": source.adapter is not None}
