"""The tokenizer as llama.cpp reads it: token list and types, merges, pre-tokenizer name, special ids, template.

llama.cpp re-implements each tokenizer family natively; it does not run the Hugging Face ``tokenizer.json``.
For byte-level BPE (``tokenizer.ggml.model = "gpt2"``) it needs the vocabulary, the merges and the name of the
pre-tokenizer (the regex that splits text before BPE), which it knows by name only. The name is chosen here from
the structure of the ``tokenizer.json`` pre-tokenizer; an unknown structure is refused rather than guessed,
since a wrong split still loads and silently tokenizes differently.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from typing import Any

from bittune.errors import ModelLoadError

# Split regexes of the tokenizer.json pre-tokenizers llama.cpp implements, by the name llama.cpp knows them by.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX_PRE = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}
SUPPORTED_TOKENIZERS = (
    "byte-level BPE with the GPT-2 split (gpt-2), digits split one by one (smollm), "
    "the Llama 3 split (llama-bpe) or the Qwen2 split (qwen2)"
)


@dataclass
class TokenizerMeta:
    """Everything written under ``tokenizer.*`` in the GGUF."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list[dict[str, str]] | None = None

    def add_to(self, writer: Any) -> None:
        """Write these fields with a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(tid)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def pre_tokenizer_json(pre: str) -> dict[str, Any] | None:
    """The ``tokenizer.json`` pre-tokenizer that splits text as llama.cpp's ``pre`` does, or None if not ours.

    The inverse of :func:`detect_pre`: the GGUF import uses it to give a converted tokenizer its own split back.
    """
    bytelevel = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    if pre == "gpt-2":
        return {**bytelevel, "use_regex": True}
    if pre == "smollm":
        digits = {"type": "Digits", "individual_digits": True}
        return {"type": "Sequence", "pretokenizers": [digits, {**bytelevel, "use_regex": True}]}
    regex = next((r for r, name in SPLIT_REGEX_PRE.items() if name == pre), None)
    if regex is None:
        return None
    split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, {**bytelevel, "use_regex": False}]}


def _is_bytelevel(node: dict[str, Any] | None, *, use_regex: bool) -> bool:
    return bool(node) and node.get("type") == "ByteLevel" and bool(node.get("use_regex", True)) == use_regex


def detect_pre(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for this byte-level BPE pre-tokenizer, or None when it is not one llama.cpp knows."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    norm = tokenizer_json.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        return None  # llama.cpp's BPE path applies no normalizer beyond what its pre-tokenizer implies
    if _is_bytelevel(pre, use_regex=True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    first, second = steps
    if first.get("type") == "Digits" and first.get("individual_digits") and _is_bytelevel(second, use_regex=True):
        return "smollm"
    if first.get("type") == "Split" and _is_bytelevel(second, use_regex=False):
        return SPLIT_REGEX_PRE.get((first.get("pattern") or {}).get("Regex", ""))
    return None


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value if isinstance(value, int) else None


def eos_ids(model_config: Any, generation_config: Any, tokenizer: Any) -> list[int]:
    """The ids generation stops at: from the generation config, else the model config, else the tokenizer.

    When there are several, the tokenizer's own eos comes first (Llama 3 Instruct lists <|end_of_text|>,
    <|eom_id|> and <|eot_id|>; its tokenizer's eos, <|eot_id|>, is the one a chat turn ends with).
    """
    ids: list[int] = []
    for source in (generation_config, model_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]
            break
    own = tokenizer.eos_token_id
    if not ids:
        return [own] if own is not None else []
    return [own, *(i for i in ids if i != own)] if own in ids else ids


def check_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's pre-tokenizer name for ``tokenizer``, or a refusal listing what is supported.

    Raises:
        ModelLoadError: for tokenizers llama.cpp cannot reproduce.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(
            f"{type(tokenizer).__name__} is a slow tokenizer without tokenizer.json",
            hint="export needs a fast tokenizer (tokenizer.json); save one with transformers' AutoTokenizer",
        )
    tj = json.loads(backend.to_str())
    model_type = tj.get("model", {}).get("type")
    pre = detect_pre(tj) if model_type == "BPE" and not tj["model"].get("byte_fallback") else None
    if pre is None:
        desc = model_type or "unknown"
        if model_type == "BPE":
            desc = "BPE with byte fallback (SentencePiece style)" if tj["model"].get("byte_fallback") else "BPE"
            desc += f", pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:200]}"
        raise ModelLoadError(
            f"this tokenizer ({desc}) is not one the GGUF export can reproduce in llama.cpp; "
            f"supported: {SUPPORTED_TOKENIZERS}",
            hint="export with --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py",
        )
    return pre


def build_tokenizer_meta(tokenizer: Any, *, n_vocab: int, model_config: Any, generation_config: Any) -> TokenizerMeta:
    """Collect the GGUF tokenizer fields of a Hugging Face fast tokenizer.

    Args:
        tokenizer: A transformers fast tokenizer.
        n_vocab: Rows of the embedding matrix; the token list is padded to it (llama.cpp requires equal sizes).
        model_config: The model's config (for eos/bos when the tokenizer lacks them).
        generation_config: The model's generation config: its eos is where the tuned model stops.

    Raises:
        ModelLoadError: for tokenizers llama.cpp cannot reproduce (listing the supported ones).
    """
    import gguf

    pre = check_tokenizer(tokenizer)
    if len(tokenizer) > n_vocab:
        raise ModelLoadError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {n_vocab} rows",
            hint="resize the embeddings (model.resize_token_embeddings) before training, or fix the tokenizer",
        )

    # Merges come through gguf's own reader of tokenizer.json, which handles both merge formats.
    with tempfile.TemporaryDirectory(prefix="bittune-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        merges = gguf.SpecialVocab(tmp, load_merges=True, special_token_types=()).merges

    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i in added:
            tok = added[i]
            tokens.append(tok.content)
            # Special tokens are CONTROL (matched in text only when parsing specials, never printed); other added
            # tokens are USER_DEFINED (always matched as one token), as transformers treats them.
            types.append(gguf.TokenType.CONTROL if tok.special else gguf.TokenType.USER_DEFINED)
        elif i in id_to_token:
            tokens.append(id_to_token[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows beyond the tokenizer (padded vocab): placeholders llama.cpp never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)

    special: dict[str, int] = {}
    eos = eos_ids(model_config, generation_config, tokenizer)
    if eos:
        special["eos"] = eos[0]
        # llama.cpp stops at eos and eot (and tokens it recognizes by name); a second stop id becomes eot.
        others = [e for e in eos[1:] if e != eos[0]]
        if others:
            special["eot"] = others[0]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _first_id(model_config.bos_token_id)
    for kind, tid in (("bos", bos), ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            special[kind] = tid
    # Whether encode() adds bos/eos, learned from the tokenizer itself rather than from its config files.
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = bos is not None and len(with_specials) > len(plain) and with_specials[0] == bos
    add_eos = (
        tokenizer.eos_token_id is not None
        and len(with_specials) > len(plain)
        and (with_specials[-1] == tokenizer.eos_token_id)
    )
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    return TokenizerMeta(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=merges,
        special_ids=special,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template,
    )
