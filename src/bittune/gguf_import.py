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
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from bittune.errors import ModelLoadError

# Written into a converted folder before it is renamed into place: the conversion version and its files.
COMPLETE_MARKER = "bittune_complete.json"
# Bump when the conversion changes, so old caches are redone.
CONVERSION_VERSION = 2  # 2: the tokenizer keeps the GGUF's own pre-tokenizer (e.g. SmolLM's digit split)
# Temp dirs older than this are leftovers of a killed conversion (a live one takes about a minute per 100M params).
_STALE_TMP_S = 3600
# Architectures transformers can load from GGUF but bittune does not fine-tune as causal LMs.
_NOT_CAUSAL_LM = {"t5", "umt5"}

# Text the converted tokenizer must split exactly as llama.cpp does with the source file (when llama-cpp-python is
# installed): numbers after blank lines, runs of digits, contractions, mixed whitespace, code, non-ASCII.
TOKENIZER_SAMPLE = (
    "Install\n\n1. Run `make demo`\n\n\n2. Then 12345 + 3.14159 = 12348.14159",
    "I'm sure they've paid 24690 dollars in 1994; we'll see.\r\n\tIndented\t\ttabs  and   spaces \n",
    "def f(x):\n    return x**2  # 100%\n\n\n## Heading 2\n- item 1\n- item 22",
    "Ünïcödé: café, naïve, 東京, 🙂; ½ ² ³ ١٢٣",
)

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
    try:
        return str(gguf_metadata(path, ["general.architecture"])["general.architecture"])
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})",
            hint="check the file is complete (re-download it) and really a GGUF model",
        ) from None


# GGUF metadata value types (the GGUF spec's gguf_type): scalars by struct format, and the two variable-sized ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def gguf_metadata(path: Path, keys: Iterable[str]) -> dict[str, Any]:
    """The scalar and string values of ``keys`` in a GGUF file's header (those present), read key by key and no
    further than the last one wanted.

    ``gguf.GGUFReader`` builds every field and tensor of the file first: ~3 s for SmolLM2's 49k-token vocabulary,
    where the few keys this module looks at sit in the first kilobyte. Arrays are skipped (never returned).

    Raises:
        ValueError: the file is not little-endian GGUF (version 2 or 3), or its header is cut short.
    """
    wanted, found = set(keys), {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("no GGUF magic at the start of the file")
        (version,) = _unpack(f, "<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (only 2 and 3, little-endian, are read)")
        _, n_kv = _unpack(f, "<QQ")
        for _ in range(n_kv):
            if wanted <= found.keys():
                break
            key = _gguf_string(f)
            (vtype,) = _unpack(f, "<I")
            if vtype == _ARRAY:
                _skip_gguf_array(f)
            else:
                value = _gguf_value(f, vtype)
                if key in wanted:
                    found[key] = value
    return found


def _unpack(f: BinaryIO, fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its header")
    return struct.unpack(fmt, data)


def _gguf_string(f: BinaryIO) -> str:
    (n,) = _unpack(f, "<Q")
    data = f.read(n)
    if len(data) != n:
        raise ValueError("the file ends inside its header")
    return data.decode("utf-8", errors="replace")


def _gguf_value(f: BinaryIO, vtype: int) -> Any:
    if vtype == _STRING:
        return _gguf_string(f)
    if vtype not in _SCALARS:
        raise ValueError(f"unknown GGUF value type {vtype}")
    return _unpack(f, _SCALARS[vtype])[0]


def _skip_gguf_array(f: BinaryIO) -> None:
    etype, count = _unpack(f, "<IQ")
    if etype == _STRING:
        for _ in range(count):
            f.seek(_unpack(f, "<Q")[0], 1)
    elif etype == _ARRAY:
        for _ in range(count):
            _skip_gguf_array(f)
    elif etype in _SCALARS:
        f.seek(count * struct.calcsize(_SCALARS[etype]), 1)
    else:
        raise ValueError(f"unknown GGUF array element type {etype}")


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
    # transformers reads the file three times here (tokenizer, config, weights; ~3 s each for SmolLM2's 49k-token
    # vocabulary) and builds gguf's tensor-name map once per module (~5 s). Once per file: the result is cached.
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=file)
    # dequantize=True explicitly: with the optional `kernels` package installed, transformers would otherwise
    # keep the blocks packed, and such a model cannot be saved or fine-tuned.
    quantization = GgufConfig(gguf_file=file, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=file, dtype=torch.float32, quantization_config=quantization
    )
    tok_model, pre = gguf_tokenizer_kind(gguf)
    if tok_model == "gpt2":
        set_pre_tokenizer(tokenizer, pre)
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
    if tok_model == "gpt2":
        check_tokenizer_with_llamacpp(gguf, tokenizer, pre, log)

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


def gguf_tokenizer_kind(path: Path) -> tuple[str | None, str | None]:
    """``(tokenizer.ggml.model, tokenizer.ggml.pre)`` of a GGUF file (None where absent)."""
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.pre")
    meta = gguf_metadata(path, keys)
    return tuple(None if meta.get(k) is None else str(meta[k]) for k in keys)  # type: ignore[return-value]


def set_pre_tokenizer(tokenizer: Any, pre: str | None) -> None:
    """Give a byte-level BPE tokenizer converted from GGUF the split llama.cpp uses for ``pre`` (in place).

    transformers' GGUF loader knows some pre-tokenizers by name and falls back to the plain GPT-2 split for the
    rest; for the ones bittune exports (gpt-2, smollm, llama-bpe, qwen2) the split is set here explicitly, from the
    same table the exporter reads, so import and export cannot disagree. Others are left as transformers built them
    (and checked against llama.cpp when it is installed).
    """
    from tokenizers import Regex, pre_tokenizers

    from bittune.export.tokenizer_meta import pre_tokenizer_json

    node = pre_tokenizer_json(pre or "")

    def build(n: dict[str, Any]) -> Any:
        kind = n["type"]
        if kind == "Sequence":
            return pre_tokenizers.Sequence([build(c) for c in n["pretokenizers"]])
        if kind == "ByteLevel":
            return pre_tokenizers.ByteLevel(
                add_prefix_space=n["add_prefix_space"], trim_offsets=n["trim_offsets"], use_regex=n["use_regex"]
            )
        if kind == "Digits":
            return pre_tokenizers.Digits(individual_digits=n["individual_digits"])
        return pre_tokenizers.Split(Regex(n["pattern"]["Regex"]), behavior=n["behavior"].lower(), invert=n["invert"])

    if node is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = build(node)


def check_tokenizer_with_llamacpp(gguf: Path, tokenizer: Any, pre: str | None, log: Log = _quiet) -> None:
    """Refuse a conversion whose tokenizer splits :data:`TOKENIZER_SAMPLE` (and a chat turn) unlike llama.cpp.

    Runs only when llama-cpp-python is installed (it reads the vocabulary alone, in well under a second).

    Raises:
        ModelLoadError: naming the first text that differs and both tokenizations.
    """
    try:
        import llama_cpp
    except ImportError:
        log(f"tokenizer ({pre}) not checked against llama.cpp: llama-cpp-python is not installed (make llamacpp)")
        return
    texts = list(TOKENIZER_SAMPLE)
    if tokenizer.chat_template:
        msgs = [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]
        texts.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        for text in texts:
            ours = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            theirs = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
            if ours != theirs:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                raise ModelLoadError(
                    f"{gguf.name}: the converted tokenizer splits text unlike llama.cpp with its '{pre}' "
                    f"pre-tokenizer: {text[:40]!r} gives {ours[at : at + 6]} here and {theirs[at : at + 6]} in "
                    f"llama.cpp (token {at})",
                    hint="use the model's original Hugging Face folder instead; fine-tuning on a tokenizer that "
                    "splits differently from the model's own would train it on unfamiliar token sequences",
                )
    finally:
        llm.close()
    log(f"tokenizer ({pre}) checked against llama.cpp on {len(texts)} sample texts")


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

    The cache key covers the file's resolved path, size and modification time, so an edited file is converted again;
    the conversion of its earlier content is then removed (one folder per path, not one per write: a file that is
    written anew at the same path, like each `bittune demo`'s GGUF, would otherwise leave ~0.5 GB behind each time).
    """
    from bittune.cache import cache_dir

    path = path.expanduser().resolve()
    check_gguf(path)
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / "gguf" / f"{path.stem}-{key}"

    def convert(source: Path, tmp: Path, log: Log) -> None:
        convert_gguf(source, tmp, log, name=path.stem)

    if is_complete(target):
        return target
    folder = cached_conversion(path, target, convert, log)
    _remove_earlier_conversions(path, keep=folder)
    return folder


def _remove_earlier_conversions(source: Path, *, keep: Path) -> None:
    """Remove the cache folders converted from earlier contents of ``source`` (their marker names it)."""
    for folder in keep.parent.glob(f"{source.stem}-*"):
        if folder == keep or not folder.is_dir():
            continue
        try:
            info = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not a finished conversion (maybe another process's, in progress): leave it
        if isinstance(info, dict) and info.get("source") == str(source):
            shutil.rmtree(folder, ignore_errors=True)
