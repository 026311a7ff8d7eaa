"""``bittune export``: check every argument first, then load (merging a LoRA run), write, and optionally verify."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError, ModelLoadError

FORMATS = ("gguf", "hf")
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
    log: Log = _quiet,
) -> dict[str, Any]:
    """Export a model folder or a bittune run directory.

    Args:
        path: Model folder, adapter folder or run directory (a LoRA adapter is merged into its base).
        fmt: ``gguf`` (one file for llama.cpp) or ``hf`` (a Hugging Face folder with a model card).
        out: The .gguf file or the folder to write.
        qtype: GGUF tensor type: ``f32``, ``f16``, ``q8_0`` or ``q4_0``.
        verify: GGUF only: load the file in llama.cpp and compare it with transformers before keeping it.
        log: Progress messages.

    Returns:
        What was written (and the verification figures with ``verify``).
    """
    from bittune.export.gguf_writer import GGUF_TYPES

    if fmt not in FORMATS:
        raise BittuneError(f"unknown --format '{fmt}'", hint=f"use one of: {', '.join(FORMATS)}")
    if fmt == "gguf" and qtype not in GGUF_TYPES:
        raise BittuneError(f"unknown --type '{qtype}'", hint=f"use one of: {', '.join(GGUF_TYPES)}")
    if fmt == "hf" and verify:
        raise BittuneError("--verify checks a GGUF file in llama.cpp", hint="use it with --format gguf")
    if fmt == "gguf":
        return export_gguf(path, out, qtype=qtype, verify=verify, log=log)
    return export_hf(path, out, log=log)


def export_gguf(path: str, out: Path, *, qtype: str, verify: bool, log: Log = _quiet) -> dict[str, Any]:
    """Write ``path`` as a GGUF file at ``out``; with ``verify`` it is kept only if llama.cpp agrees."""
    from bittune.artifacts import base_config, load, load_tokenizer_of, resolve
    from bittune.export.gguf_writer import check_architecture, check_output, write_gguf
    from bittune.export.tokenizer_meta import check_tokenizer

    out = check_output(out)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise BittuneError(
            "GGUF export needs the 'gguf' package, which is not installed", hint="pip install 'bittune[export]'"
        ) from None
    if verify:
        from bittune.export.verify import require_llama_cpp

        require_llama_cpp()  # before the slow part
    artifact = resolve(path)
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
    name = Path(artifact.run_dir or artifact.base).name.removesuffix(".gguf")
    target = out.with_name(f".{out.name}.verify-{os.getpid()}") if verify else out
    try:
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
    result["merged_adapter"] = artifact.adapter is not None
    if _quantized_label(artifact):
        result["dequantized_from"] = _quantized_label(artifact)
    return result


def export_hf(path: str, out: Path, *, name: str | None = None, log: Log = _quiet) -> dict[str, Any]:
    """Write ``path`` as a merged Hugging Face folder at ``out`` with a model card (README.md)."""
    from bittune.artifacts import load, resolve
    from bittune.export.card import model_card
    from bittune.export.hf import check_out_dir, save_hf_folder
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
    )
    info = {"source": Path(path).name, "merged_adapter": artifact.adapter is not None, "task": artifact.task}
    if quantized:
        info["dequantized_from"] = quantized
    atomic_dir(out, lambda tmp: save_hf_folder(model, tokenizer, tmp, card=card, info=info), marker=False)
    files = sorted(p.name for p in out.iterdir())
    return {"path": str(out), "files": files, "merged_adapter": artifact.adapter is not None}
