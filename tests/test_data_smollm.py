"""The pipeline with a real chat tokenizer (SmolLM2's, read offline from a local GGUF; pad == eos there)."""

from __future__ import annotations

from pathlib import Path

from bittune.data import encode_prompt, make_collator
from tiny import labelled_text, prepare, smollm_tokenizer, write_rows


def test_smollm_chat_masking_and_eos(tmp_path: Path) -> None:
    tok = smollm_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id and tok.eos_token == "<|im_end|>"
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, of course."},
    ]
    rows = [{"messages": messages}, {"prompt": "The capital of France is", "completion": " Paris."}]
    chat = prepare(tok, write_rows(tmp_path / "c.jsonl", rows[:1]))
    row = chat.train[0]
    # Only the replies and their end-of-turn (= eos) are targets; nothing is appended since eos is in the span.
    assert labelled_text(tok, row) == ["Paris.<|im_end|>", "Rome, of course.<|im_end|>"]
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    first = next(i for i, lab in enumerate(row["labels"]) if lab != -100)
    assert encode_prompt(messages[:1], tok) == row["input_ids"][:first]

    comp = prepare(tok, write_rows(tmp_path / "p.jsonl", rows[1:]), fmt="completion")
    crow = comp.train[0]
    assert labelled_text(tok, crow) == [" Paris.<|im_end|>"] and crow["input_ids"][-1] == tok.eos_token_id
    # Padding with pad == eos: the real eos keeps its label, the pads do not.
    batch = make_collator("causal-lm", tok.pad_token_id, packed=False)([row, crow])
    n = len(crow["input_ids"])
    assert batch["labels"][1, n - 1].item() == tok.eos_token_id
    assert (batch["labels"][1, n:] == -100).all()
