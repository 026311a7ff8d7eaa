"""GGUF files as training sources: checked, dequantized once into a cached Hugging Face folder, then used as usual.

transformers reads GGUF (``from_pretrained(..., gguf_file=...)``) but cannot save or fine-tune the packed blocks, and
re-reading a GGUF on every run costs tens of seconds. So a GGUF is converted once: loaded with dequantization to
float32, stripped of the GGUF loader's traces, saved with its tokenizer (chat template included) and checked to
reload and generate the same tokens -- all inside the atomic folder of ``bittune.storage.atomic_dir`` (a temp
folder beside the cache entry, renamed into place once complete). A killed conversion never leaves a folder that
looks usable.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bittune.errors import ModelLoadError

# Written into a converted folder before it is renamed into place: the conversion version and its files.
COMPLETE_MARKER = "bittune_complete.json"
# Bump when the conversion changes, so old caches are redone.
CONVERSION_VERSION = 1
# Temp dirs older than this are leftovers of a killed conversion (a live one takes about a minute per 100M params).
_STALE_TMP_S = 3600
# Architectures transformers can load from GGUF but bittune does not fine-tune as causal LMs.
_NOT_CAUSAL_LM = {"t5", "umt5"}

Log = Callable[[str], None]
Convert = Callable[[Path, Path, Log], None]


def _quiet(_: str) -> None:
    pass


def supported_architectures() -> list[str]:
    """GGUF ``general.architecture`` values that can be converted (those transformers' GGUF loader knows)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"} - _NOT_CAUSAL_LM)


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file, with a clear error for files that are not readable GGUF."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        return str(field.contents())
    except (ValueError, KeyError, OSError, IndexError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})",
            hint="check the file is complete (re-download it) and really a GGUF model",
        ) from None


def check_gguf(path: Path) -> str:
    """Refuse GGUF files whose architecture cannot be converted; returns the architecture."""
    arch = gguf_architecture(path)
    supported = supported_architectures()
    normalised = arch.replace("-", "_")
    if arch not in supported and normalised not in supported:
        raise ModelLoadError(
            f"{path} holds a '{arch}' model, which cannot be loaded from GGUF for fine-tuning",
            hint=f"use a GGUF of a supported architecture ({', '.join(supported)}), or the model's original "
            "Hugging Face folder",
        )
    return arch


def _greedy_ids(model: Any, tokenizer: Any, prompt: str, n: int = 8) -> list[int]:
    import torch

    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def convert_gguf(gguf: Path, target: Path, log: Log = _quiet, *, name: str, eos_token: str | None = None) -> None:
    """Dequantize ``gguf`` into ``target`` (an empty folder) and check that the saved folder reloads identically.

    Args:
        gguf: The GGUF file.
        target: Empty output folder.
        log: Called with one-line progress messages.
        name: ``name_or_path`` recorded in the saved config.
        eos_token: If given, the token generation must stop at (e.g. a chat model's end-of-turn token); otherwise
            the GGUF's own ``tokenizer.ggml.eos_token_id`` is kept.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils.quantization_config import GgufConfig

    t0 = time.perf_counter()
    src, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=file)
    # dequantize=True explicitly: with the optional `kernels` package installed, transformers would otherwise keep
    # the blocks packed, and such a model cannot be saved or fine-tuned.
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=file, dtype=torch.float32, quantization_config=GgufConfig(gguf_file=file, dequantize=True)
    )
    log(f"dequantized {file} to float32 in {time.perf_counter() - t0:.0f}s")
    # Drop every trace of the GGUF loader so the folder saves, and later loads, as a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    eos_id = model.config.eos_token_id
    if eos_token is not None:
        eos_id = tokenizer.convert_tokens_to_ids(eos_token)
        if not isinstance(eos_id, int) or eos_id == tokenizer.unk_token_id:
            raise ModelLoadError(f"{gguf} has no {eos_token} token", hint="check this is the model you meant")
        model.config.eos_token_id = eos_id
    if tokenizer.pad_token_id is None and isinstance(eos_id, int):
        tokenizer.pad_token_id = eos_id
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    _drop_tokens_beyond(target, model.get_input_embeddings().weight.shape[0])
    tokenizer = AutoTokenizer.from_pretrained(target)

    probe = "What is the capital of France?"
    expected = _greedy_ids(model, tokenizer, probe)
    del model
    reloaded_tok = AutoTokenizer.from_pretrained(target)
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise RuntimeError(f"converted {name} folder still carries a quantization_config")
    if reloaded_tok.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"converted {name} tokenizer lost its chat template")
    got = _greedy_ids(reloaded, reloaded_tok, probe)
    if got != expected:
        raise RuntimeError(f"converted {name} generates {got}, the GGUF model {expected}")
    log(f"checked the saved folder reloads and generates the same tokens ({time.perf_counter() - t0:.0f}s)")


def _drop_tokens_beyond(folder: Path, n_vocab: int) -> None:
    """Remove tokens that transformers' GGUF tokenizer converter added past the model's vocabulary.

    For GPT-2-style vocabularies without ``<|endoftext|>`` the converter appends one; its id has no embedding row,
    so training would refuse the tokenizer. It was never in the GGUF, so dropping it restores the original.
    """
    tok_file = folder / "tokenizer.json"
    data = json.loads(tok_file.read_text(encoding="utf-8"))
    extra = {t["content"] for t in data.get("added_tokens", []) if t["id"] >= n_vocab}
    if not extra:
        return
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < n_vocab]
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        data["model"]["vocab"] = {k: v for k, v in vocab.items() if v < n_vocab}
    tok_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        decoder = cfg.get("added_tokens_decoder", {})
        cfg["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < n_vocab}
        for key, value in list(cfg.items()):
            if isinstance(value, str) and value in extra:
                cfg[key] = None
        cfg_file.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished conversion of the current version (marker present, files all there)."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("version") != CONVERSION_VERSION:
        return False
    return all((folder / f).is_file() for f in info.get("files", []))


def _remove_stale_tmp(parent: Path, prefix: str) -> None:
    """Temp folders of conversions killed long ago (a live one, maybe another process's, is left alone)."""
    now = time.time()
    for p in parent.glob(f"{prefix}*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def cached_conversion(source: Path, target: Path, convert: Convert, log: Log = _quiet) -> Path:
    """Return ``target``, first running ``convert(source, tmp, log)`` in an atomic folder if it is not complete.

    Only a folder with a valid completion marker is trusted; a half-written or outdated one is redone (and replaced
    only once the new one is complete).
    """
    from bittune.storage import atomic_dir

    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent, f".tmp-{target.name}-")
    log(f"converting {source.name} to a Hugging Face folder (once) ...")

    def write(tmp: Path) -> None:
        convert(source, tmp, log)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        marker = {"version": CONVERSION_VERSION, "source": str(source), "files": files}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

    atomic_dir(target, write)
    log(f"ready at {target}")
    return target


def gguf_model_folder(path: Path, log: Log = _quiet) -> Path:
    """The cached Hugging Face folder for a GGUF file given as ``model.path`` (converted on first use).

    The cache key covers the file's resolved path, size and modification time, so an edited file is converted again.
    """
    from bittune.cache import cache_dir

    path = path.expanduser().resolve()
    check_gguf(path)
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / "gguf" / f"{path.stem}-{key}"

    def convert(source: Path, tmp: Path, log: Log) -> None:
        convert_gguf(source, tmp, log, name=path.stem)

    return cached_conversion(path, target, convert, log)
