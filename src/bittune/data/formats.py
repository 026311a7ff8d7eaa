"""Turn raw rows into validated examples for each data format.

A format names the fields it needs (``text``; ``prompt``/``completion``; ``instruction``/``input``/``output``;
``messages``; ``text``/``label``). ``data.columns`` maps those canonical names to the user's own column names.
Every problem is reported with the row's location, the column and a suggested fix; nothing here tokenizes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from bittune.data.records import Record
from bittune.errors import DataError

FORMATS = ("text", "completion", "alpaca", "chat", "classification")
ROLES = ("system", "user", "assistant")
# ShareGPT's 'from' values; 'user'/'assistant' appear in some exports too, 'model' in Gemma-style ones.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
# canonical field -> required?
FIELDS: dict[str, dict[str, bool]] = {
    "text": {"text": True},
    "completion": {"prompt": True, "completion": True},
    "alpaca": {"instruction": True, "input": False, "output": True},
    "chat": {"messages": True},
    "classification": {"text": True, "label": True, "text_pair": False},
}


@dataclass
class TextExample:
    """Plain text; every token is trained on."""

    text: str
    where: str


@dataclass
class CompletionExample:
    """A prompt and the completion the model should learn to produce after it."""

    prompt: str
    completion: str
    where: str


@dataclass
class ChatExample:
    """A conversation: list of ``{"role", "content"}`` dicts (alpaca rows also carry instruction/input)."""

    messages: list[dict[str, str]]
    where: str


@dataclass
class ClassificationExample:
    """A text (optionally a pair) and its label, as written in the file (name or integer id)."""

    text: str
    label: str | int
    where: str
    text_pair: str | None = None


Example = TextExample | CompletionExample | ChatExample | ClassificationExample


def _needs(fmt: str) -> str:
    req = [f"'{f}'" for f, required in FIELDS[fmt].items() if required]
    return f"format '{fmt}' needs " + (" and ".join(req) if len(req) < 3 else ", ".join(req))


def _type_name(value: Any) -> str:
    names = {list: "a list", dict: "an object", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), f"a {type(value).__name__}")


class FieldReader:
    """Reads canonical fields of one format from rows, through the user's ``columns`` mapping.

    Args:
        fmt: One of :data:`FORMATS`.
        columns: Canonical field name -> the user's column name.

    Raises:
        DataError: ``fmt`` is unknown or ``columns`` names a field the format does not use.
    """

    def __init__(self, fmt: str, columns: dict[str, str] | None = None) -> None:
        if fmt not in FIELDS:
            close = difflib.get_close_matches(fmt, FORMATS, n=1)
            raise DataError(
                f"unknown data format '{fmt}'" + (f" (did you mean '{close[0]}'?)" if close else ""),
                hint=f"set data.format to one of: {', '.join(FORMATS)}",
            )
        self.fmt = fmt
        self.columns = dict(columns or {})
        for field in self.columns:
            if field not in FIELDS[fmt]:
                raise DataError(
                    f"data.columns maps '{field}', which format '{fmt}' does not use "
                    f"(its fields: {', '.join(FIELDS[fmt])})",
                    hint="write data.columns as {canonical field: your column name}, e.g. {text: sentence}",
                )

    def column(self, field: str) -> str:
        """The user's column name for canonical ``field``."""
        return self.columns.get(field, field)

    def missing(self, rec: Record, field: str) -> DataError:
        """The error for a row that lacks ``field``, suggesting the closest existing column."""
        col = self.column(field)
        mapped = f" (mapped from '{field}' by data.columns)" if col != field else ""
        close = difflib.get_close_matches(col, [str(k) for k in rec.data], n=1, cutoff=0.6)
        msg = f"{rec.where}: field '{col}'{mapped} is missing ({_needs(self.fmt)})"
        if close:
            return DataError(
                f"{msg}; did you mean '{close[0]}'?",
                hint=f"rename the column '{close[0]}' to '{col}', or map it with data.columns: {{{field}: {close[0]}}}",
            )
        have = ", ".join(str(k) for k in list(rec.data)[:8]) or "none"
        return DataError(
            f"{msg}; the row has: {have}",
            hint=f"add a '{col}' to that row, map your column with data.columns, "
            "or set data.format to the format your file uses",
        )

    def get(self, rec: Record, field: str) -> Any:
        """The raw value of ``field`` (``None`` if an optional field is absent)."""
        col = self.column(field)
        if col not in rec.data:
            if FIELDS[self.fmt][field]:
                raise self.missing(rec, field)
            return None
        return rec.data[col]

    def string(self, rec: Record, field: str, *, allow_empty: bool = False) -> str | None:
        """``field`` as a string, checking its type and (unless ``allow_empty``) that it has content."""
        value = self.get(rec, field)
        col = self.column(field)
        if value is None:
            if not FIELDS[self.fmt][field]:
                return None
            raise DataError(
                f"{rec.where}: field '{col}' is null ({_needs(self.fmt)})",
                hint=f"give '{col}' a text value, or remove that row",
            )
        if not isinstance(value, str):
            raise DataError(
                f"{rec.where}: field '{col}' should be a string, got {_type_name(value)}: {_preview(value)}",
                hint=f"write '{col}' as a plain string",
            )
        if not allow_empty and not value.strip():
            raise DataError(
                f"{rec.where}: field '{col}' is empty",
                hint=f"fill in '{col}', or remove that row",
            )
        return value


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_example(rec: Record, reader: FieldReader) -> Example:
    """Validate one row and turn it into an example of ``reader.fmt``.

    Raises:
        DataError: A field is missing, null, empty or of the wrong type.
    """
    fmt = reader.fmt
    if fmt == "text":
        return TextExample(reader.string(rec, "text"), rec.where)  # type: ignore[arg-type]
    if fmt == "completion":
        prompt = reader.string(rec, "prompt", allow_empty=True)
        return CompletionExample(prompt, reader.string(rec, "completion"), rec.where)  # type: ignore[arg-type]
    if fmt == "alpaca":
        instruction = reader.string(rec, "instruction")
        extra = reader.string(rec, "input", allow_empty=True) or ""
        output = reader.string(rec, "output")
        content = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        # The alpaca template renders instruction and input as separate sections, so keep both.
        user = {"role": "user", "content": content, "instruction": instruction, "input": extra}
        return ChatExample([user, {"role": "assistant", "content": output}], rec.where)  # type: ignore[list-item]
    if fmt == "chat":
        return ChatExample(_messages(rec, reader), rec.where)
    text = reader.string(rec, "text")
    pair = reader.string(rec, "text_pair", allow_empty=True)
    return ClassificationExample(text, _label(rec, reader), rec.where, pair or None)  # type: ignore[arg-type]


def _label(rec: Record, reader: FieldReader) -> str | int:
    value = reader.get(rec, "label")
    col = reader.column("label")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # pandas and Parquet turn integer columns with gaps into floats
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        what = "null" if value is None else f"{_type_name(value)}: {_preview(value)}"
        raise DataError(
            f"{rec.where}: field '{col}' should be a class name (string) or class id (integer), got {what}",
            hint=f"write '{col}' as e.g. \"positive\" or 1",
        )
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DataError(f"{rec.where}: field '{col}' is empty", hint=f"give every row a '{col}'")
    elif value < 0:
        raise DataError(
            f"{rec.where}: field '{col}' is {value}; class ids must be 0 or more",
            hint="number classes from 0, or use class names",
        )
    return value


def _messages(rec: Record, reader: FieldReader) -> list[dict[str, str]]:
    if "messages" in reader.columns or "messages" in rec.data:
        col = reader.column("messages")
        value = reader.get(rec, "messages")
    elif "conversations" in rec.data:  # ShareGPT layout
        col, value = "conversations", rec.data["conversations"]
    else:
        raise reader.missing(rec, "messages")
    if not isinstance(value, list):
        raise DataError(
            f"{rec.where}: field '{col}' should be a list of messages, got {_type_name(value)}: {_preview(value)}",
            hint='write it as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
        )
    messages: list[dict[str, str]] = []
    for i, item in enumerate(value):
        at = f"{rec.where}: field '{col}' item {i}"
        if not isinstance(item, dict):
            raise DataError(
                f"{at} should be an object with 'role' and 'content', got {_type_name(item)}: {_preview(item)}",
                hint='write each message as {"role": "user", "content": "..."}',
            )
        if "role" in item or "content" in item:
            role, content, rkey, ckey = item.get("role"), item.get("content"), "role", "content"
            allowed = ROLES
        elif "from" in item or "value" in item:
            rkey, ckey, allowed = "from", "value", tuple(SHAREGPT_ROLES)
            role, content = item.get("from"), item.get("value")
            role = SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
        else:
            keys = ", ".join(map(str, item)) or "none"
            raise DataError(
                f"{at} has neither 'role'/'content' nor ShareGPT 'from'/'value' keys (it has: {keys})",
                hint='write each message as {"role": "user", "content": "..."}',
            )
        if role is None:
            raise DataError(f"{at}: '{rkey}' is missing", hint=f"give every message a '{rkey}' ({', '.join(allowed)})")
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), allowed, n=1)
            raise DataError(
                f"{at}: {rkey} '{role}' is not one of {', '.join(allowed)}"
                + (f" (did you mean '{close[0]}'?)" if close else ""),
                hint=f"use one of {', '.join(allowed)}; tool and function messages are not supported",
            )
        if content is None:
            raise DataError(f"{at}: '{ckey}' is missing", hint=f"give every message a '{ckey}' string")
        if not isinstance(content, str):
            raise DataError(
                f"{at}: '{ckey}' should be a string, got {_type_name(content)}: {_preview(content)}",
                hint=f"write '{ckey}' as plain text (multimodal content parts are not supported)",
            )
        if not content.strip():
            if role == "system":
                continue  # exports often carry an empty system message on every row; it says nothing
            raise DataError(f"{at}: {role} message has an empty '{ckey}'", hint="fill it in, or remove that row")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{rec.where}: field '{col}' has no assistant message, so there is nothing to learn from",
            hint="every conversation needs at least one assistant reply",
        )
    return messages
