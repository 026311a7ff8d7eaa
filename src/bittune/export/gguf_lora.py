"""A run's LoRA adapter as a llama.cpp adapter file (``llama-cli --lora``, ollama's ``ADAPTER``).

The layout is the one llama.cpp's ``convert_lora_to_gguf.py`` writes and ``llama_adapter_lora_init`` reads:
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted weight ``W`` two
tensors ``<gguf name of W>.lora_a`` (PEFT's ``lora_A``, ``[r, in]``) and ``.lora_b`` (``lora_B``, ``[out, r]``).
llama.cpp adds ``alpha / r * B (A x)`` (r read from the tensors), which is PEFT's ``scaling`` when alpha is
PEFT's ``lora_alpha`` (times sqrt(r) for rsLoRA).

The rotary reordering the base export applies to Q and K rows (:func:`~bittune.export.gguf_writer.permute_for_rotary`)
must reach the adapter too: ``P (W + B A) = P W + (P B) A``, so ``lora_b`` of Q and K is permuted the same way and
``lora_a`` is left alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError, ModelLoadError
from bittune.export.gguf_writer import check_architecture, permute_for_rotary, tensor_name_map
from bittune.storage import atomic_file

Log = Callable[[str], None]


def _adapter_config(adapter: Path) -> dict[str, Any]:
    cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"a {cfg.get('peft_type')} adapter (only LoRA has a llama.cpp adapter format)")
    if cfg.get("use_dora"):
        problems.append("DoRA (llama.cpp applies plain LoRA only)")
    if cfg.get("alpha_pattern"):
        problems.append("per-module lora_alpha (llama.cpp takes one alpha per file)")
    if cfg.get("use_rslora") and cfg.get("rank_pattern"):
        problems.append("rsLoRA with per-module ranks (no single llama.cpp alpha reproduces it)")
    if cfg.get("modules_to_save"):
        problems.append(f"fully trained modules {cfg['modules_to_save']} (a llama.cpp adapter holds LoRA pairs only)")
    if problems:
        raise ModelLoadError(
            f"{adapter} cannot be written as a GGUF LoRA adapter: " + "; ".join(problems),
            hint="export the merged model instead: --format gguf",
        )
    return cfg


def lora_alpha(cfg: dict[str, Any]) -> float:
    """The ``adapter.lora.alpha`` that makes llama.cpp's ``alpha / r`` equal PEFT's scaling."""
    alpha, r = float(cfg["lora_alpha"]), float(cfg["r"])
    return alpha * r**0.5 if cfg.get("use_rslora") else alpha


def adapter_tensors(state: dict[str, Any], model_config: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(gguf name, float32 array)`` of every ``.lora_a``/``.lora_b`` tensor, Q/K ``lora_b`` rows reordered.

    Args:
        state: The adapter's safetensors (PEFT names, ``base_model.model.<module>.lora_A.weight``).
        model_config: The base model's config.json.
    """
    spec = check_architecture(model_config, "the adapter's base model")
    name_map = tensor_name_map(spec, model_config["num_hidden_layers"])
    n_heads = model_config["num_attention_heads"]
    n_kv = model_config.get("num_key_value_heads") or n_heads
    tied = bool(model_config.get("tie_word_embeddings", False))
    out = []
    for key in sorted(state):
        part = ".lora_A.weight" if key.endswith(".lora_A.weight") else ".lora_B.weight"
        if not key.endswith(part):
            raise ModelLoadError(
                f"the adapter holds {key}, which is not a LoRA A/B matrix (embedding LoRA or trained biases)",
                hint="export the merged model instead: --format gguf",
            )
        module = key.removeprefix("base_model.model.")[: -len(part)]
        gguf_name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None or (tied and gguf_name == "output.weight"):
            raise ModelLoadError(
                f"the adapter adapts {module}, which has no weight of its own in the llama.cpp model"
                + (" (the output head is the tied token embedding)" if tied else ""),
                hint="export the merged model instead: --format gguf",
            )
        data = state[key].float().numpy()
        if part == ".lora_B.weight" and spec.permute_qk and ".self_attn.q_proj" in module:
            data = permute_for_rotary(data, n_heads)
        elif part == ".lora_B.weight" and spec.permute_qk and ".self_attn.k_proj" in module:
            data = permute_for_rotary(data, n_kv)
        out.append((gguf_name + (".lora_a" if part == ".lora_A.weight" else ".lora_b"), data))
    return out


def write_gguf_lora(
    state: dict[str, Any], adapter_config: dict[str, Any], model_config: dict[str, Any], out: Path, *, qtype: str,
    name: str,
) -> dict[str, Any]:  # fmt: skip
    """Write the adapter file (atomically: a temp name beside ``out``, renamed when complete)."""
    import gguf
    import numpy as np

    spec = check_architecture(model_config, "the adapter's base model")
    tensors = adapter_tensors(state, model_config)
    ggml_type = gguf.GGMLQuantizationType.F16 if qtype == "f16" else gguf.GGMLQuantizationType.F32
    out = Path(out)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, spec.gguf_arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_alpha(adapter_config))
            writer.add_name(name)
            ft = gguf.LlamaFileType
            writer.add_file_type(ft.MOSTLY_F16 if qtype == "f16" else ft.ALL_F32)
            for tname, data in tensors:
                writer.add_tensor(tname, data.astype(np.float16 if qtype == "f16" else np.float32), raw_dtype=ggml_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "tensors": len(tensors),
        "lora_alpha": lora_alpha(adapter_config),
    }


def export_gguf_lora(path: str, out: Path, *, qtype: str = "f16", verify: bool = False, log: Log = lambda _: None
                     ) -> dict[str, Any]:  # fmt: skip
    """``bittune export RUN_DIR --format gguf-lora``: the run's adapter as a llama.cpp LoRA adapter file.

    With ``verify``, the base model is written as an f32 GGUF to a temporary file, llama.cpp loads it with the
    adapter, and its logits are compared with the merged model in transformers; the adapter file is moved into
    place only if they agree.
    """
    from safetensors.torch import load_file

    from bittune.artifacts import base_config, resolve
    from bittune.export.commands import gguf_name
    from bittune.export.gguf_writer import check_output

    out = check_output(out)
    if verify:
        from bittune.export.verify import require_llama_cpp

        require_llama_cpp()
    source = resolve(path)
    check_output(out, sources=(path, source.base))
    if source.adapter is None:
        raise BittuneError(
            f"{path} has no LoRA adapter: --format gguf-lora writes a LoRA run's adapter",
            hint="export a full model with --format gguf",
        )
    if source.task != "causal-lm":
        raise ModelLoadError(f"{path} is a sequence classifier; llama.cpp adapters are for causal language models",
                             hint="export it with --format hf")  # fmt: skip
    if source.qat is not None:
        raise BittuneError(
            f"{path} is a QAT run: its model is the quantized merge of base and adapter, which an adapter on a "
            "float base does not reproduce",
            hint="export the merged, quantized model: --format gguf --type q4_0 (or the run's bits)",
        )
    config = base_config(source)
    check_architecture(config, f"{path} ({source.base})")
    adapter = Path(source.adapter)
    cfg = _adapter_config(adapter)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    name = gguf_name(source)
    target = out.with_name(f".{out.name}.verify-{os.getpid()}") if verify else out
    try:
        result = write_gguf_lora(state, cfg, config, target, qtype=qtype, name=name)
        log(f"wrote {result['tensors']} LoRA tensors (alpha {result['lora_alpha']:g})")
        if verify:
            result["verify"] = _verify(source, target, qtype, log)
            os.replace(target, out)
            result["path"] = str(out)
    finally:
        if verify:
            target.unlink(missing_ok=True)
    result.update(source=path, name=name, base=source.base)
    if source.training_quant is not None:
        result["note"] = "a QLoRA adapter, trained on the 4-bit base: apply it to a full-precision base GGUF"
    return result


def _verify(source: Any, adapter_file: Path, qtype: str, log: Log) -> dict[str, Any]:
    from peft import PeftModel

    from bittune.artifacts import load, load_tokenizer_of, resolve
    from bittune.export.gguf_writer import write_gguf
    from bittune.export.verify import compare_with_llamacpp

    tokenizer = load_tokenizer_of(source)  # the run's own (saved with its adapter)
    # The full-precision base the adapter file is applied to in llama.cpp (for a QLoRA run too: no k-bit base there).
    base_model = load(resolve(source.base), as_="merged", device="cpu", tokenizer=tokenizer).model
    base_file = adapter_file.with_name(f".{adapter_file.name}.base-{os.getpid()}")
    try:
        write_gguf(base_model, tokenizer, base_file, qtype="f32", name=Path(source.base).name)
        merged = PeftModel.from_pretrained(base_model, source.adapter).merge_and_unload().eval()
        log("verifying in llama.cpp: the f32 base with the adapter, against the merged model in transformers ...")
        check = compare_with_llamacpp(base_file, merged, tokenizer, qtype=qtype, lora_path=adapter_file)
    finally:
        base_file.unlink(missing_ok=True)
    if not check.passed:
        raise BittuneError(
            "llama.cpp with the adapter disagrees with the merged model in transformers: " + "; ".join(check.problems),
            hint="nothing was written; please report this with the model's config.json and adapter_config.json",
        )
    return check.as_dict()
