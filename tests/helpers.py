"""Tiny, offline stand-ins for real models: a BPE tokenizer trained in-process and 2-layer random models."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
THINGS = ["apple", "sky", "grass", "banana", "coal", "snow", "plum", "carrot", "tomato", "ocean", "leaf", "lemon"]


def corpus() -> list[str]:
    words = COLORS + THINGS + ["what", "color", "is", "the", "a", "it", "good", "bad", "movie", "film", "was"]
    lines = [" ".join(words)] * 4
    lines += [f"What color is the {t}? The {t} is {c}." for t in THINGS for c in COLORS]
    return lines


def make_tokenizer(pad_equals_eos: bool = False) -> Any:
    """A byte-level BPE tokenizer with ChatML special tokens and a chat template (fast, with offsets)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>" if pad_equals_eos else "<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_llama(path: Path, tokenizer: Any, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """Save a random Llama (default: 2 layers, hidden 32) and its tokenizer to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Wider than the default 0.02: behind the final RMSNorm a frozen head with tiny weights caps the logits
        # near uniform, so a LoRA on a random 32-wide model could barely move the loss.
        initializer_range=0.25,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_bert(path: Path, tokenizer: Any, seed: int = 0) -> Path:
    """Save a random 2-layer BERT encoder (no classifier head: bittune adds one) and its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.25,  # see make_tiny_llama
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def color_chat_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable chat task: each thing always has the same color."""
    rng = random.Random(seed)
    mapping = {t: COLORS[i % len(COLORS)] for i, t in enumerate(THINGS)}
    rows = []
    for _ in range(n):
        t = rng.choice(THINGS)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What color is the {t}?"},
                    {"role": "assistant", "content": f"The {t} is {mapping[t]}."},
                ]
            }
        )
    return rows


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable classification task: the label is given away by one word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        word = "good" if label == "pos" else "bad"
        filler = " ".join(rng.choice(THINGS) for _ in range(rng.randint(1, 4)))
        rows.append({"text": f"{word} movie, the {filler}", "label": label})
    return rows
