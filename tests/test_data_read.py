"""Reading every format from every file type, column mapping, ShareGPT, hub ids and the eval split."""

from __future__ import annotations

from pathlib import Path

import pytest

from bittune.data import read_records, split_eval
from bittune.data.records import looks_like_hub_id
from bittune.errors import DataError
from tiny import data_tokenizer, prepare, write_rows

ROWS = {
    "text": [{"text": "Hello there, how are you today?"}, {"text": "The capital of Italy is Rome."}],
    "completion": [
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": "The capital of Italy is", "completion": " Rome."},
    ],
    "alpaca": [
        {"instruction": "Write a short poem.", "input": "the sea", "output": "Waves and sky."},
        {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
    ],
    "chat": [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ]
        },
    ],
    "classification": [
        {"text": "a great movie", "label": "positive"},
        {"text": "a terrible film", "label": "negative"},
    ],
}
# A phrase of each first row that must survive into the tokens.
EXPECT = {
    "text": "Hello there",
    "completion": " Paris.",
    "alpaca": "Waves and sky.",
    "chat": "Hello there!",
    "classification": "great movie",
}


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_format_reads_from_every_file_type(tmp_path: Path, fmt: str, ext: str) -> None:
    tok = data_tokenizer()
    path = write_rows(tmp_path / f"train{ext}", ROWS[fmt])
    task = "classification" if fmt == "classification" else "causal-lm"
    if fmt == "chat" and ext == ".csv":
        # CSV cells are strings, so a conversation cannot be a list there: a clear error, not a crash.
        with pytest.raises(DataError, match=r"train\.csv:2: field 'messages' should be a list of messages"):
            prepare(tok, path, fmt=fmt, task=task)
        return
    data = prepare(tok, path, fmt=fmt, task=task)
    assert len(data.train) == 2 and data.eval == []
    assert data.stats["train"].rows == data.stats["train"].kept == 2
    assert EXPECT[fmt] in tok.decode(data.train[0]["input_ids"])
    if fmt == "classification":
        assert data.label_names == ["negative", "positive"]
        assert [r["label"] for r in data.train] == [1, 0]
    else:
        assert all(len(r["input_ids"]) == len(r["labels"]) for r in data.train)


def test_where_points_at_lines_and_elements(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert [r.where for r in read_records(str(jsonl))] == [f"{jsonl}:1", f"{jsonl}:3"]
    csv_path = tmp_path / "a.csv"
    csv_path.write_text('text,label\n"two\nlines",x\nc,y\n', encoding="utf-8")
    recs = read_records(str(csv_path))
    assert [r.where for r in recs] == [f"{csv_path}:2", f"{csv_path}:4"]
    assert recs[0].data == {"text": "two\nlines", "label": "x"}
    js = write_rows(tmp_path / "a.json", [{"text": "a"}, {"text": "b"}])
    assert [r.where for r in read_records(str(js))] == [f"{js}[0]", f"{js}[1]"]


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext\nhello\n".encode())
    assert read_records(str(path))[0].data == {"text": "hello"}


def test_sharegpt_conversations_are_mapped(tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello there!"},
        ]
    }
    tok = data_tokenizer()
    data = prepare(tok, write_rows(tmp_path / "sg.jsonl", [row]))
    text = tok.decode(data.train[0]["input_ids"])
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello there!<|im_end|>\n</s>"  # eos appended: the template has none
    )


def test_columns_map_user_names(tmp_path: Path) -> None:
    rows = [{"sentence": "a great movie", "sentiment": "pos"}, {"sentence": "a terrible film", "sentiment": "neg"}]
    tok = data_tokenizer(bert=True)
    data = prepare(
        tok,
        write_rows(tmp_path / "c.csv", rows),
        fmt="classification",
        task="classification",
        columns={"text": "sentence", "label": "sentiment"},
    )
    assert data.label_names == ["neg", "pos"] and [r["label"] for r in data.train] == [1, 0]


def test_max_rows_takes_the_first_rows(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}"} for i in range(10)]
    path = write_rows(tmp_path / "t.jsonl", rows)
    assert [r.data["text"] for r in read_records(str(path), max_rows=3)] == ["row 0", "row 1", "row 2"]
    data = prepare(data_tokenizer(), path, fmt="text", max_rows=4)
    assert data.stats["train"].rows == 4


def test_eval_fraction_is_seeded_and_deterministic(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}"} for i in range(20)]
    path = write_rows(tmp_path / "t.jsonl", rows)
    recs = read_records(str(path))
    a_train, a_eval = split_eval(recs, 0.2, seed=1)
    _, b_eval = split_eval(recs, 0.2, seed=1)
    _, c_eval = split_eval(recs, 0.2, seed=2)
    assert [r.where for r in a_eval] == [r.where for r in b_eval] and len(a_eval) == 4
    assert [r.where for r in a_eval] != [r.where for r in c_eval]
    assert len(a_train) + len(a_eval) == 20 and not {r.where for r in a_train} & {r.where for r in a_eval}
    # At least one row when a fraction is asked for, never all of them; none without a fraction.
    assert len(split_eval(recs[:2], 0.01, seed=0)[1]) == 1
    assert len(split_eval(recs[:3], 0.99, seed=0)[0]) == 1
    assert split_eval(recs, 0.0, seed=0)[1] == []
    tok = data_tokenizer()
    d1 = prepare(tok, path, fmt="text", eval_fraction=0.25, seed=3)
    d2 = prepare(tok, path, fmt="text", eval_fraction=0.25, seed=3)
    assert d1.eval == d2.eval and len(d1.eval) == 5 and d1.stats["eval"].rows == 5


def test_eval_file_is_used(tmp_path: Path) -> None:
    tok = data_tokenizer()
    train = write_rows(tmp_path / "train.jsonl", ROWS["text"])
    ev = write_rows(tmp_path / "eval.parquet", [{"text": "The capital of France is Paris."}])
    data = prepare(tok, train, fmt="text", eval=ev, eval_fraction=0.5)
    assert len(data.train) == 2 and len(data.eval) == 1


def test_hub_id_offline_is_a_data_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="could not be found in the local cache while offline") as err:
        read_records("nobody-bittune/no-such-dataset")
    assert "HF_HUB_OFFLINE" in (err.value.hint or "")


def test_hub_id_detection() -> None:
    assert looks_like_hub_id("HuggingFaceH4/ultrachat_200k")
    assert looks_like_hub_id("tatsu-lab/alpaca:train")
    assert not looks_like_hub_id("data/train.jsonl")
    assert not looks_like_hub_id("train.jsonl")
    assert not looks_like_hub_id("a/b/c")


def test_saved_dataset_directory(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS["text"]).save_to_disk(str(tmp_path / "ds"))
    recs = read_records(str(tmp_path / "ds"))
    assert [r.data["text"] for r in recs] == [r["text"] for r in ROWS["text"]]
    assert recs[0].where.endswith("[train]:row 1")
