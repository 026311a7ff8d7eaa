"""Run llama.cpp's own ``convert_hf_to_gguf.py`` (from the unpacked llama-cpp-python source) on a model folder.

Usage: ``python llamacpp_convert.py LLAMACPP_SRC PRE MODEL_DIR --outfile F --outtype T``. ``PRE`` is the
pre-tokenizer name to use, or ``-`` for the converter's own lookup: it recognises a tokenizer by hashing its
tokenization of a fixed text against a table of published models, which the tiny test tokenizers (trained in
process) are not in. The converter imports ``sentencepiece`` before it looks for a ``tokenizer.model`` file; where
that package is not installed an empty stand-in lets it go on to the byte-level BPE path these models use.
"""

from __future__ import annotations

import importlib.machinery
import runpy
import sys
import types

src, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, src)
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[3:]]
try:
    import sentencepiece  # noqa: F401
except ImportError:
    stub = types.ModuleType("sentencepiece")
    stub.__spec__ = importlib.machinery.ModuleSpec("sentencepiece", None)
    stub.SentencePieceProcessor = None  # type: ignore[attr-defined]
    sys.modules["sentencepiece"] = stub
if pre != "-":
    import conversion.base as base  # the converter's package, from src

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
runpy.run_path(f"{src}/convert_hf_to_gguf.py", run_name="__main__")
