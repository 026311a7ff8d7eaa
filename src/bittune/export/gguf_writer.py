"""Write a transformers causal LM as a GGUF file that llama.cpp runs, using the ``gguf`` package.

Tensor names come from gguf's own HF-to-GGUF name map; Q8_0 and Q4_0 blocks come from ``gguf.quants`` (byte-identical
to llama.cpp's quantizer). Two layout facts matter and are handled here:

- llama.cpp's ``llama`` architecture applies rotary embeddings to interleaved pairs (x0,x1),(x2,x3)...; transformers
  rotates the two halves of each head. So the rows of every head of Q and K are reordered. Forgetting this still
  gives plausible text (and ~95% top-1 agreement), which is why verification compares logits.
- Qwen2 uses the half-split ("NEOX") rotary layout in llama.cpp too, so its Q/K stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError, ModelLoadError
from bittune.storage import atomic_file

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers architecture maps onto a llama.cpp one."""

    gguf_arch: str  # name in gguf.MODEL_ARCH_NAMES
    permute_qk: bool  # reorder Q/K rows for interleaved rotary (see module docstring)
    family: str  # for messages


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", True, "Llama, SmolLM"),
    "MistralForCausalLM": ArchSpec("llama", True, "Mistral"),
    "Qwen2ForCausalLM": ArchSpec("qwen2", False, "Qwen2"),
}


def supported_list() -> str:
    return ", ".join(f"{name} ({spec.family})" for name, spec in ARCHITECTURES.items())


def check_architecture(config: dict[str, Any], what: str) -> ArchSpec:
    """The spec for this config.json, or a clear refusal naming the supported architectures."""
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    spec = ARCHITECTURES.get(archs[0])
    if spec is None:
        raise ModelLoadError(
            f"{what} is a {archs[0]}; GGUF export supports {supported_list()}",
            hint="export it with --format hf instead (a Hugging Face folder), or use a supported causal LM",
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear"):
        raise ModelLoadError(
            f"{what} uses rope scaling '{rope_type}', which the GGUF export does not write yet (default and linear)",
            hint="export with --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py",
        )
    if config.get("mlp_bias"):
        raise ModelLoadError(
            f"{what} has MLP biases (mlp_bias: true), which the GGUF export does not write",
            hint="export with --format hf instead",
        )
    return spec


def check_output(out: Path, *, suffix: str | None = None, sources: tuple[str | None, ...] = ()) -> Path:
    """Refuse an output path that cannot be written, before any work is done.

    An earlier GGUF file there is replaced (an export written again). Any other file is the user's and is never
    written over, and neither is one of ``sources`` (the model being exported, or its base: a run trained from a
    ``.gguf`` must not overwrite the file it came from).
    """
    from bittune.errors import StorageError
    from bittune.storage import check_output_path

    out = check_output_path(out, file="model.gguf", suffix=suffix, may_replace=True, parent_must_exist=True)
    if not out.is_file():
        return out
    with open(out, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise StorageError(
                f"--out {out} already exists and is not a GGUF file",
                hint="choose a new file name (bittune only replaces an earlier .gguf export there)",
            )
    for source in sources:
        if source and Path(source).expanduser().is_file() and Path(source).expanduser().resolve() == out.resolve():
            raise StorageError(
                f"--out {out} is the model this export reads ({source})",
                hint="write the export to a new file; the one it comes from is kept",
            )
    return out


def permute_for_rotary(w: Any, n_heads: int) -> Any:
    """Reorder the rows of each head from halves (x_0..x_{d/2-1}, x_{d/2}..) to interleaved pairs.

    Within a head of size d, output row ``2i`` takes HF row ``i`` and row ``2i+1`` takes HF row ``i + d/2``.
    Works on a weight (rows, cols) or a bias (rows,).
    """
    rest = w.shape[1:]
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_for_rotary(w: Any, n_heads: int) -> Any:
    """Inverse of :func:`permute_for_rotary`: llama.cpp's interleaved rows back to transformers' halves."""
    rest = w.shape[1:]
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _file_type(gguf: Any, qtype: str) -> int:
    ft = gguf.LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "q8_0": ft.MOSTLY_Q8_0, "q4_0": ft.MOSTLY_Q4_0}[qtype]


def tensor_type(gguf: Any, name: str, shape: tuple[int, ...], qtype: str, *, is_output: bool) -> Any:
    """The GGML type one tensor is stored in for export type ``qtype``.

    1-D tensors (norms, biases) always stay F32, as llama.cpp's own converter keeps them. A matrix whose rows are
    not a multiple of the block size (32) cannot be block-quantized and falls back to F16. With q4_0 the output
    projection (or the tied embedding that serves as it) is stored as Q8_0: it is the layer most sensitive to
    quantization, and llama.cpp's own Q4_0 recipe keeps it at higher precision too.
    """
    T = gguf.GGMLQuantizationType
    if len(shape) < 2 or qtype == "f32":
        return T.F32
    if qtype == "f16":
        return T.F16
    target = T.Q8_0 if qtype == "q8_0" or is_output else T.Q4_0
    block, _ = gguf.GGML_QUANT_SIZES[target]
    return target if shape[-1] % block == 0 else T.F16


def _convert(gguf: Any, data: Any, target: Any) -> Any:
    import numpy as np

    T = gguf.GGMLQuantizationType
    if target == T.F32:
        return data.astype(np.float32)
    if target == T.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), target)


def _model_metadata(writer: Any, cfg: Any, spec: ArchSpec, n_vocab: int) -> None:
    import gguf

    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def tensor_name_map(spec: ArchSpec, n_blocks: int) -> Any:
    """gguf's map from transformers tensor names to GGUF ones for this architecture."""
    import gguf

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.gguf_arch)
    return gguf.get_tensor_name_map(arch_enum, n_blocks)


def write_gguf(
    model: Any,
    tokenizer: Any,
    out: Path,
    *,
    qtype: str = "f16",
    name: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Write ``model`` (a transformers causal LM, weights in memory) and its tokenizer to ``out``.

    The file is written beside ``out`` under a temporary name and renamed into place when complete, so a
    failure or kill never leaves a truncated GGUF at ``out``.

    Args:
        model: A loaded ``*ForCausalLM`` of a supported architecture (adapters already merged).
        tokenizer: Its fast tokenizer.
        out: Target file.
        qtype: One of ``f32``, ``f16``, ``q8_0``, ``q4_0``.
        name: ``general.name`` metadata.
        log: Progress messages.

    Returns:
        A summary: path, size in bytes, tensor count, count by GGML type.
    """
    import gguf

    from bittune.export.tokenizer_meta import build_tokenizer_meta

    if qtype not in GGUF_TYPES:
        raise BittuneError(f"unknown GGUF type '{qtype}'", hint=f"use one of: {', '.join(GGUF_TYPES)}")
    cfg = model.config
    spec = check_architecture(cfg.to_dict(), type(model).__name__)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    meta = build_tokenizer_meta(
        tokenizer, n_vocab=n_vocab, model_config=cfg, generation_config=getattr(model, "generation_config", None)
    )
    name_map = tensor_name_map(spec, cfg.num_hidden_layers)
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))

    out = Path(out)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, spec.gguf_arch)
        try:
            writer.add_name(name or str(getattr(cfg, "name_or_path", "") or "model"))
            writer.add_file_type(_file_type(gguf, qtype))
            if qtype in ("q8_0", "q4_0"):
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _model_metadata(writer, cfg, spec, n_vocab)
            meta.add_to(writer)
            counts = _add_tensors(writer, gguf, model, spec, name_map, qtype, tied=tied, heads=(n_heads, n_kv))
            log(f"writing {sum(counts.values())} tensors ({', '.join(f'{v} {k}' for k, v in counts.items())})")
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return {"path": str(out), "bytes": out.stat().st_size, "tensors": sum(counts.values()), "types": counts}


def _add_tensors(
    writer: Any, gguf: Any, model: Any, spec: Any, name_map: Any, qtype: str, *, tied: bool, heads: tuple[int, int]
) -> dict[str, int]:
    """Add every weight of ``model`` under its llama.cpp name and type; returns the count by GGML type."""
    import torch

    n_heads, n_kv = heads
    counts: dict[str, int] = {}
    with torch.no_grad():
        for hf_name, tensor in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp uses token_embd for the output when output.weight is absent
            new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise ModelLoadError(
                    f"{type(model).__name__} has a tensor {hf_name} with no llama.cpp counterpart",
                    hint="export with --format hf instead",
                )
            data = tensor.detach().to(torch.float32).cpu().numpy()
            if spec.permute_qk and ".self_attn.q_proj." in hf_name:
                data = permute_for_rotary(data, n_heads)
            elif spec.permute_qk and ".self_attn.k_proj." in hf_name:
                data = permute_for_rotary(data, n_kv)
            is_output = new_name == "output.weight" or (tied and new_name == "token_embd.weight")
            target = tensor_type(gguf, new_name, data.shape, qtype, is_output=is_output)
            writer.add_tensor(new_name, _convert(gguf, data, target), raw_dtype=target)
            counts[target.name] = counts.get(target.name, 0) + 1
    return counts
