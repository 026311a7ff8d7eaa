"""Tiny models of the other architectures the export handles (or refuses), built in-process like helpers.py's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def make_tiny(
    path: Path, tokenizer: Any, arch: str, seed: int = 0, hidden: int = 32, init: float = 0.25, **extra: Any
) -> Path:
    """Save a random 2-layer ``llama``, ``qwen2``, ``mistral`` or ``gpt2`` causal LM and its tokenizer.

    ``hidden`` 256 gives rows llama.cpp's K-quants (256-weight super-blocks) can hold; ``init`` the weights' std
    (wide random models with the default 0.25 are chaotic: tiny rounding changes flip their logits).
    """
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = {
        # Qwen2 embeddings have spare rows beyond the tokenizer (as the real ones do); transformers also gives a
        # reloaded qwen2 tokenizer an extra <|endoftext|> token, which lands in them.
        "vocab_size": len(tokenizer) + (4 if arch == "qwen2" else 0),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": init,
    }
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
        model = tf.GPT2LMHeadModel(config)
    else:
        cls_cfg, cls_model = {
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        }[arch]
        config = cls_cfg(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=arch == "qwen2",
            **common,
            **extra,
        )
        model = cls_model(config)
        if arch == "qwen2":
            # Qwen2 has q/k/v biases; random ones make the bias path visible in comparisons.
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tokenizer_with_pre(pre_tokenizer: dict[str, Any]) -> Any:
    """A byte-level BPE tokenizer like helpers.make_tokenizer's, trained with the given pre-tokenizer.

    The corpus has numbers, contractions and line breaks, so merges form across the places where the different
    pre-tokenizers split differently, and a mismatch between transformers and llama.cpp would show.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from helpers import CHATML_TEMPLATE, corpus

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tj = json.loads(Tokenizer(models.BPE()).to_str())
    tj["pre_tokenizer"] = pre_tokenizer
    tok = Tokenizer.from_str(json.dumps(tj))
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = corpus() + [
        f"In {1990 + i} I'm sure we'll pay {i * 12345} dollars.\n\nThey've 3.14 x{i}" for i in range(40)
    ]
    # Blank lines and runs of spaces before a number: where splitting digits first changes the whitespace tokens.
    lines += [f"Step\n\n{i}. Then  {i}  more\n\n\n{i * 7}" for i in range(40)]
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def split_then_bytelevel(regex: str) -> dict[str, Any]:
    """The tokenizer.json pre-tokenizer of Llama 3 / Qwen2 style tokenizers: a regex split, then bytes."""
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }


SMOLLM_PRE = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}
GPT2_PRE = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
