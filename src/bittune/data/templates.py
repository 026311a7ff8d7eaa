"""Render conversations to text, marking which characters the model is trained to produce.

A rendered conversation is a list of :data:`Segment` ``(text, trainable)``; joined they are the exact string
the model sees. Assistant replies, including the template's end-of-turn marker (so a tuned model learns to
stop), are trainable; everything else is prompt.

``auto`` uses the tokenizer's own chat template. Reply spans are found by rendering prefixes: the reply to
message *i* is what ``messages[:i+1]`` adds over ``messages[:i]`` with the generation prompt. This works for
any template that renders conversations incrementally, without special markers in the template.

Named templates (``chatml``, ``llama2``, ``alpaca``) are small render functions. They put the tokenizer's
BOS text in front when the tokenizer normally adds one, so rendered text is always tokenized with
``add_special_tokens=False``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from bittune.errors import DataError

TEMPLATES = ("auto", "chatml", "llama2", "alpaca")
Segment = tuple[str, bool]

_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
_ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclass
class Rendered:
    """A rendered conversation.

    Attributes:
        segments: ``(text, trainable)`` pieces; joined they are the full text.
        append_eos: True when the last reply ends without the tokenizer's eos text, so the caller appends the
            eos token (trained on) to teach the model to stop.
    """

    segments: list[Segment]
    append_eos: bool = False


def special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts in front of text by default (usually ``[bos_id]`` or nothing)."""
    cached = getattr(tokenizer, "_bittune_prefix", None)
    if cached is not None:
        return list(cached)
    probe = "a b"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    prefix: list[int] = []
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            prefix = list(full[:i])
            break
    # Cache on the tokenizer object: this runs for every example and every generation prompt.
    with contextlib.suppress(AttributeError):
        tokenizer._bittune_prefix = tuple(prefix)
    return prefix


def _bos_text(tokenizer: Any) -> str:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is not None and special_prefix(tokenizer)[:1] == [bos_id]:
        return tokenizer.bos_token or ""
    return ""


def check_template(template: str, tokenizer: Any) -> None:
    """Fail early when ``template`` is unknown, or ``auto`` but the tokenizer has no chat template.

    Raises:
        DataError: with the fix (pick a named template).
    """
    if template not in TEMPLATES:
        raise DataError(
            f"unknown chat template '{template}'",
            hint=f"use one of: {', '.join(TEMPLATES)} (data.template in a config, --template on the command line)",
        )
    if template == "auto" and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise DataError(
            f"data.template is 'auto' but the tokenizer of {name} has no chat template (base models usually have none)",
            hint="set data.template: chatml (or llama2 / alpaca) to use a built-in template",
        )


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """``messages`` with ``system_prompt`` as the first message, unless the conversation has its own."""
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render_conversation(
    messages: list[dict[str, str]],
    tokenizer: Any,
    template: str,
    *,
    system_prompt: str | None = None,
    add_generation_prompt: bool = False,
    where: str = "",
) -> Rendered:
    """Render a conversation into prompt and trainable segments.

    Args:
        messages: ``{"role", "content"}`` dicts with roles system/user/assistant.
        tokenizer: Supplies the chat template (for ``auto``) and the bos/eos texts.
        template: One of :data:`TEMPLATES`.
        system_prompt: Used as the system message when the conversation has none.
        add_generation_prompt: End with the text that opens an assistant reply.
        where: Row location for error messages.

    Returns:
        The segments, and whether an eos token must be appended.

    Raises:
        DataError: The template cannot render this conversation.
    """
    messages = with_system(messages, system_prompt)
    if template == "auto":
        segments = _auto_segments(messages, tokenizer, add_generation_prompt, where)
    else:
        render = {"chatml": _chatml, "llama2": _llama2, "alpaca": _alpaca}[template]
        segments = render(messages, tokenizer, add_generation_prompt, where)
    eos_text = getattr(tokenizer, "eos_token", None)
    replies = [text for text, trainable in segments if trainable]
    append_eos = bool(
        eos_text and not add_generation_prompt and messages[-1]["role"] == "assistant" and eos_text not in replies[-1]
    )
    return Rendered([s for s in segments if s[0]], append_eos)


def render_prompt(
    messages: list[dict[str, str]] | str, tokenizer: Any, template: str = "auto", system_prompt: str | None = None
) -> str:
    """Render messages as a generation prompt (ending where the assistant's reply starts).

    Args:
        messages: ``{"role", "content"}`` dicts; a plain string (text/completion formats) is returned as is.
        tokenizer: The model's tokenizer.
        template: One of :data:`TEMPLATES`.
        system_prompt: Used as the system message when the conversation has none.

    Returns:
        The prompt text. Tokenize chat prompts with ``add_special_tokens=False`` (the text already holds any
        BOS); :func:`encode_prompt` does this for you.
    """
    if isinstance(messages, str):
        return messages
    check_template(template, tokenizer)
    rendered = render_conversation(
        messages, tokenizer, template, system_prompt=system_prompt, add_generation_prompt=True
    )
    return "".join(text for text, _ in rendered.segments)


def encode_prompt(
    messages: list[dict[str, str]] | str, tokenizer: Any, template: str = "auto", system_prompt: str | None = None
) -> list[int]:
    """Token ids of a generation prompt, exactly as training saw that prefix.

    A plain string (text/completion formats) gets the tokenizer's usual BOS and no eos; messages are rendered
    with :func:`render_prompt`.
    """
    if isinstance(messages, str):
        return special_prefix(tokenizer) + tokenizer(messages, add_special_tokens=False)["input_ids"]
    text = render_prompt(messages, tokenizer, template, system_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# auto: the tokenizer's own template


def _apply(tokenizer: Any, messages: list[dict[str, str]], gen: bool, where: str) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=gen)
    except Exception as exc:  # jinja's TemplateError and raise_exception() messages are the user's fix
        raise DataError(
            f"{where + ': ' if where else ''}the tokenizer's chat template rejected this conversation: {exc}",
            hint="fix the conversation (many templates need user/assistant turns to alternate), "
            "or set data.template: chatml",
        ) from None


def _auto_segments(messages: list[dict[str, str]], tokenizer: Any, gen: bool, where: str) -> list[Segment]:
    full = _apply(tokenizer, messages, gen, where)
    eos_text = getattr(tokenizer, "eos_token", None) or ""
    segments: list[Segment] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = end = -1
        try:
            before = _apply(tokenizer, messages[:i], True, where) if i else ""
            upto = _apply(tokenizer, messages[: i + 1], False, where)
        except DataError:
            before = upto = ""  # some templates refuse partial conversations; use the search below
        if before and upto.startswith(before) and full.startswith(upto) and len(before) >= cursor:
            start, end = len(before), len(upto)
        else:
            # Templates that rewrite earlier turns (e.g. dropping reasoning) do not render incrementally:
            # find the reply text itself and take the eos text right after it as its end.
            start = full.find(msg["content"], cursor)
            if start < 0:
                raise DataError(
                    f"{where + ': ' if where else ''}could not locate assistant message {i} in the text rendered "
                    "by the tokenizer's chat template",
                    hint="set data.template: chatml (or llama2 / alpaca), or data.train_on_prompt: true",
                )
            end = start + len(msg["content"])
            if eos_text and full.startswith(eos_text, end):
                end += len(eos_text)
        # Newlines after the end-of-turn marker are layout, not something the model must produce.
        while end > start and full[end - 1].isspace():
            end -= 1
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    return segments


# ---------------------------------------------------------------------------------------------------------------
# named templates


def _chatml(messages: list[dict[str, str]], tokenizer: Any, gen: bool, where: str) -> list[Segment]:
    segments: list[Segment] = [(_bos_text(tokenizer), False)]
    for m in messages:
        head = f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            segments += [(head, False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segments.append((head + m["content"] + "<|im_end|>\n", False))
    if gen:
        segments.append(("<|im_start|>assistant\n", False))
    return segments


def _turns(messages: list[dict[str, str]], template: str, where: str) -> tuple[str | None, list[dict[str, str]]]:
    """Split off a leading system message and check the rest alternates user/assistant, starting with user."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    for i, m in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            n = i + (1 if system is not None else 0)
            raise DataError(
                f"{where + ': ' if where else ''}message {n} is '{m['role']}' but template '{template}' needs "
                f"'{expected}' there (an optional system message first, then user and assistant alternating)",
                hint="reorder or merge the messages, or set data.template: chatml which allows any order",
            )
    return system, rest


def _llama2(messages: list[dict[str, str]], tokenizer: Any, gen: bool, where: str) -> list[Segment]:
    system, rest = _turns(messages, "llama2", where)
    bos, eos = _bos_text(tokenizer), getattr(tokenizer, "eos_token", None) or ""
    segments: list[Segment] = []
    for i in range(0, len(rest), 2):
        user = rest[i]["content"].strip()
        if i == 0 and system:
            user = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user}"
        # The space before the reply belongs to it: the prompt ends at '[/INST]', as at generation time.
        segments.append((f"{bos}[INST] {user} [/INST]", False))
        if i + 1 < len(rest):
            segments.append((f" {rest[i + 1]['content'].strip()} {eos}".rstrip(), True))
    return segments


def _alpaca(messages: list[dict[str, str]], tokenizer: Any, gen: bool, where: str) -> list[Segment]:
    system, rest = _turns(messages, "alpaca", where)
    eos = getattr(tokenizer, "eos_token", None) or ""
    has_input = bool(rest and rest[0].get("input", "").strip())
    preamble = system if system is not None else (_ALPACA_PREAMBLE_INPUT if has_input else _ALPACA_PREAMBLE)
    segments: list[Segment] = [(f"{_bos_text(tokenizer)}{preamble}\n\n", False)]
    for i in range(0, len(rest), 2):
        user = rest[i]
        extra = user.get("input", "")
        if extra.strip():
            prompt = f"### Instruction:\n{user['instruction']}\n\n### Input:\n{extra}\n\n### Response:\n"
        else:
            prompt = f"### Instruction:\n{user.get('instruction', user['content'])}\n\n### Response:\n"
        segments.append((("\n\n" if i else "") + prompt, False))
        if i + 1 < len(rest):
            segments.append((rest[i + 1]["content"] + eos, True))
    return segments
