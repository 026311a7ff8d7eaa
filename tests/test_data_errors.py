"""Bad data gives a DataError naming the file, line (or element) and field, with a fix; never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bittune.errors import DataError
from tiny import data_tokenizer, prepare


def _jsonl(*rows: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _chat(*messages: dict) -> dict:
    return {"messages": list(messages)}


U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}

# id: (file name, content (str or bytes), format, substrings the message must contain, substring of the hint)
CASES: dict[str, tuple[str, str | bytes, str, list[str], str]] = {
    "empty file": ("t.jsonl", "", "text", ["t.jsonl: the file is empty"], "add some rows"),
    "only blank lines": ("t.jsonl", "\n\n  \n", "text", ["t.jsonl: the file has no rows"], "add some rows"),
    "unknown extension": ("t.txt", "hello\n", "text", ["t.txt: unsupported data file extension '.txt'"], ".jsonl"),
    "malformed json line": (
        "t.jsonl",
        '{"text": "ok"}\n{"text": "unterminated}\n',
        "text",
        ["t.jsonl:2: invalid JSON at column"],
        "one complete JSON object",
    ),
    "row is not an object": (
        "t.jsonl",
        '{"text": "ok"}\n["text", "x"]\n',
        "text",
        ["t.jsonl:2: each line must be a JSON object", "got an array"],
        '{"text": "..."}',
    ),
    "json element is not an object": (
        "t.json",
        '[{"text": "ok"}, "just a string"]',
        "text",
        ["t.json[1]: each element must be a JSON object", "got a str"],
        "object",
    ),
    "non-utf8 bytes": (
        "t.jsonl",
        b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n',
        "text",
        ["t.jsonl:3: not valid UTF-8", "0xe9"],
        "UTF-8",
    ),
    "misspelled field": (
        "t.jsonl",
        _jsonl({"prompt": "a", "completion": "b"}, {"prompt": "a", "completions": "b"}),
        "completion",
        [
            "t.jsonl:2: field 'completion' is missing",
            "format 'completion' needs 'prompt' and 'completion'",
            "did you mean 'completions'?",
        ],
        "data.columns: {completion: completions}",
    ),
    "missing field": (
        "t.jsonl",
        _jsonl({"body": "a"}),
        "text",
        ["t.jsonl:1: field 'text' is missing (format 'text' needs 'text')", "the row has: body"],
        "set data.format",
    ),
    "list where string expected": (
        "t.jsonl",
        _jsonl({"text": ["a", "b"]}),
        "text",
        ["t.jsonl:1: field 'text' should be a string, got a list"],
        "plain string",
    ),
    "empty completion": (
        "t.jsonl",
        _jsonl({"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "  "}),
        "completion",
        ["t.jsonl:2: field 'completion' is empty"],
        "fill in 'completion'",
    ),
    "null field": (
        "t.jsonl",
        _jsonl({"instruction": "a", "output": None}),
        "alpaca",
        ["t.jsonl:1: field 'output' is null"],
        "text value",
    ),
    "ragged csv row": (
        "t.csv",
        "text,label\ngood,pos\nbad, really,neg\n",
        "classification",
        ["t.csv:3: row has 3 fields but the header has 2 (text, label)"],
        "quote fields",
    ),
    "duplicate csv header": ("t.csv", "text,text\na,b\n", "text", ["t.csv:1: duplicate column", "text"], "distinct"),
    "bad chat role": (
        "t.jsonl",
        _jsonl(_chat(U, {"role": "bot", "content": "x"})),
        "chat",
        ["t.jsonl:1: field 'messages' item 1: role 'bot' is not one of system, user, assistant"],
        "tool and function messages",
    ),
    "chat message without content": (
        "t.jsonl",
        _jsonl(_chat(U, A), _chat({"role": "user"}, A)),
        "chat",
        ["t.jsonl:2: field 'messages' item 0: 'content' is missing"],
        "'content' string",
    ),
    "empty assistant reply": (
        "t.jsonl",
        _jsonl(_chat(U, {"role": "assistant", "content": ""})),
        "chat",
        ["t.jsonl:1: field 'messages' item 1: assistant message has an empty 'content'"],
        "fill it in",
    ),
    "content parts instead of text": (
        "t.jsonl",
        _jsonl(_chat({"role": "user", "content": [{"type": "text", "text": "Hi"}]}, A)),
        "chat",
        ["t.jsonl:1: field 'messages' item 0: 'content' should be a string, got a list"],
        "plain text",
    ),
    "no assistant message": (
        "t.jsonl",
        _jsonl(_chat(U)),
        "chat",
        ["t.jsonl:1: field 'messages' has no assistant message"],
        "assistant reply",
    ),
    "messages not a list": (
        "t.jsonl",
        _jsonl({"messages": "Hi there"}),
        "chat",
        ["t.jsonl:1: field 'messages' should be a list of messages, got a str"],
        '"role": "user"',
    ),
    "sharegpt bad from": (
        "t.jsonl",
        _jsonl({"conversations": [{"from": "humna", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}),
        "chat",
        ["t.jsonl:1: field 'conversations' item 0: from 'humna' is not one of", "did you mean 'human'?"],
        "use one of",
    ),
    "json lines in a .json file": (
        "t.json",
        _jsonl({"text": "a"}, {"text": "b"}),
        "text",
        ["t.json:2: this .json file holds one JSON object per line"],
        "rename it to t.jsonl",
    ),
    "json object instead of array": (
        "t.json",
        json.dumps({"data": [{"text": "a"}]}),
        "text",
        ["t.json: a .json data file must be an array of objects, got a dict with keys data"],
        "JSON Lines",
    ),
    "label of the wrong type": (
        "t.jsonl",
        _jsonl({"text": "a", "label": ["pos"]}),
        "classification",
        ["t.jsonl:1: field 'label' should be a class name (string) or class id (integer), got a list"],
        '"positive" or 1',
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_names_file_line_and_field(tmp_path: Path, case: str) -> None:
    name, content, fmt, expected, hint = CASES[case]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    task = "classification" if fmt == "classification" else "causal-lm"
    with pytest.raises(DataError) as err:
        prepare(data_tokenizer(), path, fmt=fmt, task=task)
    for text in expected:
        assert text in err.value.message, f"{text!r} not in {err.value.message!r}"
    assert err.value.hint and hint in err.value.hint, err.value.hint


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found") as err:
        prepare(data_tokenizer(), tmp_path / "nope.jsonl", fmt="text")
    assert "check the path" in (err.value.hint or "")


def test_mapped_column_missing_says_it_was_mapped(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(_jsonl({"sentense": "a", "label": "x"}), encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare(data_tokenizer(), path, fmt="classification", task="classification", columns={"text": "sentence"})
    assert "t.jsonl:1: field 'sentence' (mapped from 'text' by data.columns) is missing" in err.value.message
    assert "did you mean 'sentense'?" in err.value.message


def test_columns_naming_an_unknown_field(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(_jsonl({"text": "a"}), encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.columns maps 'txt', which format 'text' does not use"):
        prepare(data_tokenizer(), path, fmt="text", columns={"txt": "body"})


def test_auto_template_without_chat_template(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(_jsonl(_chat(U, A)), encoding="utf-8")
    with pytest.raises(DataError, match="has no chat template") as err:
        prepare(data_tokenizer(chat_template=None), path, fmt="chat", template="auto")
    assert "data.template: chatml" in (err.value.hint or "")
    # The suggested fix works.
    assert len(prepare(data_tokenizer(chat_template=None), path, fmt="chat", template="chatml").train) == 1


def test_llama2_needs_alternating_turns(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(_jsonl(_chat(U, A), _chat(U, U, A)), encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.jsonl:2: message 1 is 'user' but template 'llama2' needs 'assistant'"):
        prepare(data_tokenizer(), path, template="llama2")


def test_template_that_raises_is_reported_with_the_row(tmp_path: Path) -> None:
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    tok = data_tokenizer(chat_template=strict + data_tokenizer().chat_template)
    path = tmp_path / "t.jsonl"
    path.write_text(_jsonl(_chat(U, A)), encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.jsonl:1: the tokenizer's chat template rejected this conversation"):
        prepare(tok, path, system_prompt="You are terse.")


def test_unknown_format_suggests_the_closest() -> None:
    with pytest.raises(DataError, match="unknown data format 'compleiton' \\(did you mean 'completion'\\?\\)"):
        prepare(data_tokenizer(), "unused.jsonl", fmt="compleiton")
