"""Packing layout, collators, and the proof that packed examples do not attend to each other."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from bittune.data import count_targets, make_collator, model_inputs
from bittune.data.packing import pack_rows
from tiny import data_tokenizer, prepare, write_rows

TEXTS = [
    "Hello there, how are you today?",
    "The capital of France is Paris.",
    "I am fine, thank you.",
    "Write a short poem about the sea and the sky.",
    "The capital of Italy is Rome.",
    "Hi",
    "positive negative neutral great terrible movie film",
]
MAX = 40


def _segments(row: dict[str, list[int]]) -> list[tuple[int, int]]:
    """(start, end) of each block whose position ids count up from 0."""
    pos, starts = row["position_ids"], [i for i, p in enumerate(row["position_ids"]) if p == 0]
    bounds = [*starts, len(pos)]
    return list(itertools.pairwise(bounds))


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    tok = data_tokenizer(pad_is_eos=True)
    path = write_rows(tmp_path_factory.mktemp("pack") / "t.jsonl", [{"text": t} for t in TEXTS])
    plain = prepare(tok, path, fmt="text", max_length=MAX)
    packed = prepare(tok, path, fmt="text", max_length=MAX, packing=True)
    return tok, plain, packed


def test_packed_rows_have_whole_examples_and_restarting_positions(packed: tuple[Any, Any, Any]) -> None:
    tok, plain, data = packed
    assert data.packed and not plain.packed
    assert 1 < len(data.train) < len(plain.train) == len(TEXTS)
    assert data.stats["train"].packed_rows == len(data.train)
    unpacked: list[dict[str, list[int]]] = []
    shared = padded = 0
    for row in data.train:
        assert {len(v) for v in row.values()} == {MAX}
        segs = _segments(row)
        for a, b in segs:
            assert row["position_ids"][a:b] == list(range(b - a))
        # Kept examples always have targets, so a block without any is the pad tail.
        real = [(a, b) for a, b in segs if any(x != -100 for x in row["labels"][a:b])]
        tail = [(a, b) for a, b in segs if (a, b) not in real]
        assert tail == [] or (len(tail) == 1 and tail[0][1] == MAX)
        for a, b in tail:
            assert row["input_ids"][a:b] == [tok.pad_token_id] * (b - a)
        shared += len(real) > 1
        padded += len(tail)
        unpacked += [{"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]} for a, b in real]
    assert shared and padded  # the data exercises both: rows holding 2+ examples, and pad tails
    # every example appears whole and in order: none was split across rows
    assert unpacked == plain.train
    # greedy: the first example of each next row would not have fitted in the previous row
    for prev, nxt in zip(data.train, data.train[1:]):
        used = sum(b - a for a, b in _segments(prev) if any(x != -100 for x in prev["labels"][a:b]))
        first = _segments(nxt)[0]
        assert used + (first[1] - first[0]) > MAX


def test_pack_rows_exact_fit_and_single_token_examples() -> None:
    rows = [{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7], "labels": [7]}]
    out = pack_rows(rows, 3, pad_id=0)
    assert out == [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]}]
    out = pack_rows(rows, 2, pad_id=0)
    assert out[1] == {"input_ids": [7, 0], "labels": [7, -100], "position_ids": [0, 0]}


def test_packed_collator_has_no_attention_mask(packed: tuple[Any, Any, Any]) -> None:
    tok, _, data = packed
    batch = make_collator("causal-lm", tok.pad_token_id, packed=True)(data.train)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (len(data.train), MAX)
    assert count_targets("causal-lm", batch["labels"]) == data.stats["train"].target_tokens
    assert model_inputs(batch) == {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }


def test_plain_collator_pads_right(packed: tuple[Any, Any, Any]) -> None:
    tok, plain, _ = packed
    rows = plain.train[:3]
    batch = make_collator("causal-lm", tok.pad_token_id, packed=False)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (3, longest)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
        assert batch["labels"][i, n:].tolist() == [-100] * (longest - n)
    assert "use_cache" not in model_inputs(batch)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(packed: tuple[Any, Any, Any], attn: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, _, data = packed
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=MAX,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()
    batch = make_collator("causal-lm", tok.pad_token_id, packed=True)(data.train)
    checked = 0
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        for r, row in enumerate(data.train):
            for a, b in _segments(row):
                alone = model(input_ids=torch.tensor([row["input_ids"][a:b]])).logits[0]
                torch.testing.assert_close(logits[r, a:b], alone, atol=1e-5, rtol=0)
                checked += 1
        # Sanity check that the test can fail: with a cache the packed layout is not detected, so a later
        # example sees the one before it.
        leaky = model(**{k: v for k, v in model_inputs(batch).items() if k != "use_cache"}).logits
    assert checked >= len(TEXTS)
    a, b = _segments(data.train[0])[1]
    alone = model(input_ids=torch.tensor([data.train[0]["input_ids"][a:b]])).logits[0]
    assert not torch.allclose(leaky[0, a:b], alone, atol=1e-5)


def test_eval_split_is_packed_too(tmp_path: Path) -> None:
    tok = data_tokenizer()
    path = write_rows(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    data = prepare(tok, path, fmt="text", max_length=MAX, packing=True, eval_fraction=0.3)
    assert data.eval and all(len(r["position_ids"]) == MAX for r in data.eval)
    assert data.stats["eval"].packed_rows == len(data.eval)
