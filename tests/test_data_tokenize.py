"""Labels: exactly the assistant replies / completions (with their end token), eos handling, truncation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bittune.data import count_targets, encode_prompt, make_collator, render_prompt
from bittune.data import tokenize as tokenize_mod
from tiny import data_tokenizer, labelled_text, prepare, write_rows

CHAT = [
    {"role": "user", "content": "Hello there, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "The capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def _one(tok: Any, tmp_path: Path, row: dict, **kw: Any) -> dict:
    data = prepare(tok, write_rows(tmp_path / "d.jsonl", [row]), **kw)
    assert len(data.train) == 1
    return data.train[0]


def test_chat_labels_are_exactly_the_assistant_turns(tmp_path: Path) -> None:
    tok = data_tokenizer(eos="<|im_end|>")  # end of turn is eos, as in most chat models
    row = _one(tok, tmp_path, {"messages": CHAT})
    assert labelled_text(tok, row) == ["I am fine, thank you.<|im_end|>", "Paris.<|im_end|>"]
    assert tok.decode(row["input_ids"]).endswith("<|im_start|>assistant\nParis.<|im_end|>\n")


def test_chat_eos_appended_when_the_template_has_none(tmp_path: Path) -> None:
    tok = data_tokenizer()  # eos </s> never appears in chatml
    row = _one(tok, tmp_path, {"messages": CHAT[:2]})
    assert labelled_text(tok, row) == ["I am fine, thank you.<|im_end|>", "</s>"]
    assert row["input_ids"][-1] == tok.eos_token_id


def test_train_on_prompt_labels_every_token(tmp_path: Path) -> None:
    tok = data_tokenizer()
    row = _one(tok, tmp_path, {"messages": CHAT}, train_on_prompt=True)
    assert row["labels"][0] == -100  # nothing predicts the first token
    assert row["labels"][1:] == row["input_ids"][1:]


def test_text_gets_bos_and_labelled_eos_even_when_pad_is_eos(tmp_path: Path) -> None:
    tok = data_tokenizer(pad_is_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    data = prepare(tok, write_rows(tmp_path / "t.jsonl", [{"text": "Hello there"}, {"text": "Hi"}]), fmt="text")
    long, short = data.train
    assert long["input_ids"][0] == tok.bos_token_id and long["input_ids"][-1] == tok.eos_token_id
    assert long["labels"][-1] == tok.eos_token_id  # the eos keeps its label although it equals pad
    assert long["labels"][1:] == long["input_ids"][1:]
    batch = make_collator("causal-lm", tok.pad_token_id, packed=False)([long, short])
    n = len(short["input_ids"])
    assert batch["labels"][1, n - 1].item() == tok.eos_token_id  # real eos: trained on
    assert (batch["labels"][1, n:] == -100).all() and (batch["input_ids"][1, n:] == tok.eos_token_id).all()
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(long["input_ids"]) - n)


def test_text_without_bos_tokenizer(tmp_path: Path) -> None:
    tok = data_tokenizer(add_bos=False)
    row = _one(tok, tmp_path, {"text": "Hello there"}, fmt="text")
    assert tok.bos_token_id not in row["input_ids"]
    assert tok.decode(row["input_ids"]) == "Hello there</s>"


def test_completion_labels_are_the_completion_and_eos(tmp_path: Path) -> None:
    tok = data_tokenizer()
    row = _one(tok, tmp_path, {"prompt": "The capital of France is", "completion": " Paris."}, fmt="completion")
    assert labelled_text(tok, row) == [" Paris.</s>"]
    assert tok.decode(row["input_ids"]) == "<s>The capital of France is Paris.</s>"


def test_alpaca_template_layout(tmp_path: Path) -> None:
    tok = data_tokenizer()
    row = _one(
        tok,
        tmp_path,
        {"instruction": "Write a poem.", "input": "the sea", "output": "Waves."},
        fmt="alpaca",
        template="alpaca",
    )
    assert tok.decode(row["input_ids"]) == (
        "<s>Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nWrite a poem.\n\n"
        "### Input:\nthe sea\n\n### Response:\nWaves.</s>"
    )
    assert labelled_text(tok, row) == ["Waves.</s>"]


def test_alpaca_rows_through_a_chat_template(tmp_path: Path) -> None:
    tok = data_tokenizer(eos="<|im_end|>")
    row = _one(tok, tmp_path, {"instruction": "Write a poem.", "input": "the sea", "output": "Waves."}, fmt="alpaca")
    assert "<|im_start|>user\nWrite a poem.\n\nthe sea<|im_end|>" in tok.decode(row["input_ids"])
    assert labelled_text(tok, row) == ["Waves.<|im_end|>"]


def test_llama2_template_multi_turn(tmp_path: Path) -> None:
    tok = data_tokenizer()
    row = _one(tok, tmp_path, {"messages": CHAT}, template="llama2", system_prompt="Be brief.")
    assert tok.decode(row["input_ids"]) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello there, how are you? [/INST] I am fine, thank you. </s>"
        "<s>[INST] The capital of France? [/INST] Paris. </s>"
    )
    assert labelled_text(tok, row) == [" I am fine, thank you. </s>", " Paris. </s>"]


def test_system_prompt_is_added_only_when_missing(tmp_path: Path) -> None:
    tok = data_tokenizer()
    row = _one(tok, tmp_path, {"messages": CHAT[:2]}, system_prompt="Be brief.")
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    own = [{"role": "system", "content": "Be kind."}, *CHAT[:2]]
    row = _one(tok, tmp_path, {"messages": own}, system_prompt="Be brief.")
    assert "Be brief." not in tok.decode(row["input_ids"])


@pytest.mark.parametrize("template", ["auto", "chatml", "llama2", "alpaca"])
def test_generation_prompt_matches_the_training_prefix(tmp_path: Path, template: str) -> None:
    tok = data_tokenizer()
    row = _one(tok, tmp_path, {"messages": CHAT}, template=template, system_prompt="Be brief.")
    first_target = next(i for i, lab in enumerate(row["labels"]) if lab != -100)
    prompt = encode_prompt(CHAT[:1], tok, template, system_prompt="Be brief.")
    assert prompt == row["input_ids"][:first_target]
    assert tok.decode(prompt) == render_prompt(CHAT[:1], tok, template, system_prompt="Be brief.")


def test_plain_prompt_encoding_matches_completion_training(tmp_path: Path) -> None:
    tok = data_tokenizer()
    row = _one(tok, tmp_path, {"prompt": "The capital of France is", "completion": " Paris."}, fmt="completion")
    assert render_prompt("The capital of France is", tok) == "The capital of France is"
    prompt = encode_prompt("The capital of France is", tok)
    assert row["input_ids"][: len(prompt)] == prompt and row["labels"][len(prompt)] != -100


def test_tokenizer_without_offsets_gives_the_same_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = data_tokenizer()
    with_offsets = _one(tok, tmp_path, {"messages": CHAT})
    monkeypatch.setattr(tokenize_mod, "_supports_offsets", lambda tokenizer: False)
    assert _one(tok, tmp_path, {"messages": CHAT}) == with_offsets


def test_truncation_and_dropping_are_counted(tmp_path: Path) -> None:
    tok = data_tokenizer()
    long_prompt = "The capital of France is Paris. " * 10
    rows = [
        {"prompt": "Hi", "completion": " Hello there."},  # fits
        {"prompt": "Hi", "completion": " Hello there, how are you today? " * 5},  # cut, keeps targets
        {"prompt": long_prompt, "completion": " Rome."},  # prompt alone exceeds: nothing left -> dropped
    ]
    data = prepare(tok, write_rows(tmp_path / "t.jsonl", rows), fmt="completion", max_length=24)
    st = data.stats["train"]
    assert (st.rows, st.kept, st.truncated, st.dropped) == (3, 2, 2, 1)
    assert all(len(r["input_ids"]) <= 24 for r in data.train) and len(data.train[1]["input_ids"]) == 24
    assert st.tokens == sum(len(r["input_ids"]) for r in data.train)
    batch = make_collator("causal-lm", tok.pad_token_id, packed=False)(data.train)
    assert count_targets("causal-lm", batch["labels"]) == st.target_tokens
    assert "1 dropped" in st.summary() and "2 truncated" in st.summary()


def test_all_rows_dropped_is_an_error(tmp_path: Path) -> None:
    from bittune.errors import DataError

    tok = data_tokenizer()
    rows = [{"prompt": "The capital of France is Paris. " * 10, "completion": " Rome."}]
    with pytest.raises(DataError, match="no training example has anything left to train on") as err:
        prepare(tok, write_rows(tmp_path / "t.jsonl", rows), fmt="completion", max_length=16)
    assert "max_length" in (err.value.hint or "")
