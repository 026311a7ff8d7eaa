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


def _quantized_label(artifact: Any) -> str | None:
    """The method label of a ``bittune quantize`` folder (e.g. ``gptq3-g64``), or None."""
    return artifact.manifest.spec.label() if getattr(artifact, "manifest", None) is not None else None


def _loading(path: str, artifact: Any) -> str:
    if artifact.adapter is not None:
        policy = " (into its dequantized k-bit base, as trained)" if artifact.training_quant is not None else ""
        return f"loading {path} and merging its LoRA adapter{policy}"
    label = _quantized_label(artifact)
    return f"loading {path}" + (f" (a {label} folder: its quantized values are written in float)" if label else "")


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


def gguf_name(artifact: Any) -> str:
    """``general.name`` of an export: the base model and how it was made (``smollm2-135m-instruct-lora``).

    A run is named after its base (the ``model.path`` it was trained from) and its method; a ``bittune quantize``
    folder after its method label; a plain model folder after itself.
    """
    cfg = artifact.run_config
    if cfg is None:
        base = Path(str(artifact.base).rstrip("/")).name.removesuffix(".gguf")
        if artifact.adapter is not None:
            return f"{base}-lora"
        label = _quantized_label(artifact)
        return f"{base}-{label}" if label else base
    model_path = str(cfg.model.path).rstrip("/")
    base = Path(model_path).stem if model_path.endswith(".gguf") else Path(model_path).name
    qat = cfg.qat.method if cfg.qat is not None else None
    return f"{base}-{cfg.method}" + (f"-{qat}" if qat and qat != "int" else "")


def _note_qat_grid(artifact: Any, qtype: str, log: Log) -> None:
    """Say when a run trained on llama.cpp's grid is exported to another type than the one it trained for."""
    method = artifact.qat.method if artifact.qat is not None else "int"
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
    from bittune.artifacts import base_config, load, load_tokenizer_of, resolve
    from bittune.export.gguf_writer import check_architecture, check_output, write_gguf
    from bittune.export.kquants import LLAMACPP_TYPES, require_llamacpp
    from bittune.export.tokenizer_meta import check_tokenizer

    out = check_output(out)  # before any work; then once the model and its base are known (below)
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

        require_llama_cpp()  # before the slow part
    imatrix_file = None
    if imatrix is not None:
        from bittune.export.imatrix import imatrix_data

        imatrix_file = imatrix_data(path, imatrix)
    artifact = resolve(path)
    check_output(out, sources=(path, artifact.base))
    if artifact.task != "causal-lm":
        raise ModelLoadError(
            f"{path} is a sequence classifier; GGUF export is for causal language models",
            hint="export it with --format hf",
        )
    check_architecture(base_config(artifact), f"{path} ({artifact.base})" if artifact.adapter else path)
    tokenizer = load_tokenizer_of(artifact)
    check_tokenizer(tokenizer)  # before the weights are read
    log(_loading(path, artifact))
    model = load(artifact, as_="merged", device="cpu", tokenizer=tokenizer).model
    _note_qat_grid(artifact, qtype, log)
    name = gguf_name(artifact)
    matrix = None
    if imatrix_file is not None:
        from bittune.export.imatrix import DEFAULT_TOKENS, compute_for_export

        tokens = imatrix_tokens or DEFAULT_TOKENS
        matrix = compute_for_export(artifact, model, tokenizer, imatrix_file, tokens=tokens, log=log)
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
    result["merged_adapter"] = artifact.adapter is not None
    if _quantized_label(artifact):
        result["dequantized_from"] = _quantized_label(artifact)
    return result


def export_hf(path: str, out: Path, *, name: str | None = None, log: Log = _quiet) -> dict[str, Any]:
    """Write ``path`` as a merged Hugging Face folder at ``out`` with a model card (README.md)."""
    from bittune.artifacts import load, resolve
    from bittune.export.card import model_card
    from bittune.export.hf import check_out_dir, save_hf_folder
    from bittune.quant.report import read_folder_report
    from bittune.storage import atomic_dir

    out = check_out_dir(out)
    artifact = resolve(path)
    log(_loading(path, artifact))
    model, tokenizer, _ = load(artifact, as_="merged", device="cpu")
    quantized = _quantized_label(artifact)
    card = model_card(
        name=name or out.name,
        base=artifact.base,
        task=artifact.task,
        run_dir=artifact.run_dir,
        kbit=artifact.training_quant,
        merged=artifact.adapter is not None,
        quantized=quantized,
        quant_report=read_folder_report(artifact.path),
    )
    info = {"source": Path(path).name, "merged_adapter": artifact.adapter is not None, "task": artifact.task}
    if quantized:
        info["dequantized_from"] = quantized
    atomic_dir(out, lambda tmp: save_hf_folder(model, tokenizer, tmp, card=card, info=info), marker=False)
    files = sorted(p.name for p in out.iterdir())
    return {"path": str(out), "files": files, "merged_adapter": artifact.adapter is not None}
