"""A .gguf model.path keeps the model's own tokenizer: the converted folder splits text as llama.cpp does.

transformers' GGUF loader builds a byte-level BPE tokenizer with the plain GPT-2 split for every pre-tokenizer it
does not know, e.g. SmolLM's (digits split one by one before the byte-level rules): `\\n\\n1` then becomes `\\n`,
`\\n`, `1` where llama.cpp, running the same file, gives `\\n\\n`, `1`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny import GPT2_PRE, SMOLLM_PRE, split_then_bytelevel, tokenizer_with_pre

SAMPLES = (
    "Intro\n\n1. Install it\n\n\n2. Run it",
    "In 1994 I'm sure we'll pay 24690 dollars.\n\nThey've 3.14 x7",
    "What color is the sky?  It's   blue\t\t(12 345 6789)\r\n",
)


def _pre(name: str) -> dict:
    from bittune.export.tokenizer_meta import _LLAMA3_REGEX, _QWEN2_REGEX

    return {
        "gpt-2": GPT2_PRE,
        "smollm": SMOLLM_PRE,
        "llama-bpe": split_then_bytelevel(_LLAMA3_REGEX),
        "qwen2": split_then_bytelevel(_QWEN2_REGEX),
    }[name]


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_import_keeps_the_pre_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pre: str) -> None:
    from transformers import AutoTokenizer

    from bittune.artifacts import load
    from bittune.export.gguf_writer import write_gguf
    from bittune.export.tokenizer_meta import check_tokenizer
    from bittune.gguf_import import gguf_model_folder
    from tiny import make_tiny_llama

    monkeypatch.setenv("BITTUNE_CACHE", str(tmp_path / "cache"))
    original = tokenizer_with_pre(_pre(pre))
    model, tok, _ = load(make_tiny_llama(tmp_path / "m", original), as_="merged", device="cpu")
    write_gguf(model, tok, tmp_path / "m.gguf", qtype="f32")

    converted = AutoTokenizer.from_pretrained(gguf_model_folder(tmp_path / "m.gguf"))
    assert check_tokenizer(converted) == pre  # and so a re-export declares the source's pre-tokenizer
    for text in SAMPLES:
        assert (
            converted(text, add_special_tokens=False)["input_ids"]
            == original(text, add_special_tokens=False)["input_ids"]
        ), text


def test_a_tokenizer_llamacpp_splits_otherwise_is_refused_at_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With llama-cpp-python present the conversion checks the tokenizer against llama.cpp on a text sample."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make llamacpp`")

    from bittune import gguf_import
    from bittune.artifacts import load
    from bittune.errors import ModelLoadError
    from bittune.export.gguf_writer import write_gguf
    from tiny import make_tiny_llama

    monkeypatch.setenv("BITTUNE_CACHE", str(tmp_path / "cache"))
    model, tok, _ = load(make_tiny_llama(tmp_path / "m", tokenizer_with_pre(SMOLLM_PRE)), as_="merged", device="cpu")
    write_gguf(model, tok, tmp_path / "m.gguf", qtype="f32")
    monkeypatch.setattr(gguf_import, "set_pre_tokenizer", lambda tokenizer, pre: None)  # the old behaviour
    with pytest.raises(ModelLoadError, match="smollm"):
        gguf_import.gguf_model_folder(tmp_path / "m.gguf")
    assert not [p for p in (tmp_path / "cache" / "models" / "gguf").iterdir() if not p.name.startswith(".")]


def _doc_paragraphs() -> list[str]:
    """Real documentation text: the paragraphs of this project's README (numbers after blank lines, code, tables)."""
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    chunks = text.split("\n\n")
    return ["\n\n".join(chunks[i : i + 2]) for i in range(len(chunks) - 1)]


def test_smollm2_import_tokenizes_like_llamacpp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make llamacpp`")
    from transformers import AutoTokenizer

    from bittune.demo.assets import prepare_smollm2, smollm2_gguf_path
    from bittune.export.tokenizer_meta import check_tokenizer

    tok = AutoTokenizer.from_pretrained(prepare_smollm2())
    assert check_tokenizer(tok) == "smollm"
    assert json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"] == SMOLLM_PRE
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), vocab_only=True, verbose=False)
    try:
        docs = _doc_paragraphs()
        differ = [
            d[:60]
            for d in docs
            if tok(d, add_special_tokens=False)["input_ids"] != llm.tokenize(d.encode(), add_bos=False, special=True)
        ]
    finally:
        llm.close()
    assert len(docs) > 40 and not differ, differ


def test_header_keys_are_read_without_parsing_the_file(tmp_path: Path) -> None:
    """gguf_metadata (the architecture and tokenizer checks) reads what gguf's full reader reads, key by key."""
    import gguf

    from bittune.demo.assets import smollm2_gguf_path
    from bittune.gguf_import import gguf_architecture, gguf_metadata, gguf_tokenizer_kind

    path = smollm2_gguf_path()
    fields = gguf.GGUFReader(path).fields
    scalars = {
        k: f.contents() for k, f in fields.items() if not k.startswith("GGUF.") and not isinstance(f.contents(), list)
    }
    got = gguf_metadata(path, [*scalars, "tokenizer.ggml.tokens", "no.such.key"])
    assert got.keys() == scalars.keys()  # arrays and absent keys are left out
    for key, value in scalars.items():
        assert got[key] == pytest.approx(value) if isinstance(value, float) else got[key] == value, key
    assert gguf_architecture(path) == "llama" and gguf_tokenizer_kind(path) == ("gpt2", "smollm")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="ends inside its header"):
        gguf_metadata(cut, ["tokenizer.chat_template"])
