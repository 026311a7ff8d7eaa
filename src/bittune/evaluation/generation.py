"""Answers by generation and by likelihood, for prompts rendered exactly as training rendered them.

:func:`generate_replies` asks the model (greedy, batched, stopping at the model's own eos) and records the decoding
settings. :func:`rank_labels` scores each label as the reply and picks the likeliest: the fair baseline for a label
task, since a base model that knows the answer but phrases it differently still gets credit, so "before vs after"
measures what tuning taught rather than only the answer format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

Prompt = list[dict[str, str]] | str  # chat messages ending with the user turn, or plain completion text
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Decoding:
    """How replies were generated; stored beside every generation metric."""

    max_new_tokens: int = 16
    do_sample: bool = False  # greedy
    template: str = "auto"  # the tokenizer's own chat template
    system_prompt: str | None = None
    stop: str = "the model's eos (generation_config.eos_token_id)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_prompts(
    tokenizer: Any, prompts: Sequence[Prompt], template: str, system_prompt: str | None
) -> list[list[int]]:
    """Token ids of each prompt, as the training recipe renders it (chat template, BOS handling)."""
    from bittune.data import encode_prompt

    return [encode_prompt(p if isinstance(p, str) else list(p), tokenizer, template, system_prompt) for p in prompts]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    decoding: Decoding = Decoding(),
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy replies to ``prompts`` (batched with left padding, shortest first; returned in input order; on CPU
    a batch's common beginning runs once, :func:`_prompt_batch`)."""
    import torch

    encoded = encode_prompts(tokenizer, prompts, decoding.template, decoding.system_prompt)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    replies = [""] * len(encoded)
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask, cache, _ = _prompt_batch(model, [encoded[i] for i in idx], pad, device)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,  # the shared beginning's, when there is one: generation runs the rest
                max_new_tokens=decoding.max_new_tokens,
                do_sample=decoding.do_sample,
                pad_token_id=pad,
                top_p=None,
                top_k=None,
                temperature=None,
            )
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, texts, strict=True):
                replies[i] = text.strip()
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return replies


def _continuations(tokenizer: Any, prompt_ids: list[int], labels: Sequence[str]) -> list[list[int]]:
    """Token ids of each label as the reply after ``prompt_ids`` (tokenized together, so merges match training)."""
    prompt_text = tokenizer.decode(prompt_ids)
    out = []
    for label in labels:
        joint = tokenizer(prompt_text + label, add_special_tokens=False)["input_ids"]
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            out.append(joint[len(prompt_ids) :])
        else:  # the label merged with the prompt's last token: score it on its own
            out.append(tokenizer(label, add_special_tokens=False)["input_ids"])
    return out


def _shared_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens all ``rows`` share, leaving each at least one of its own; 0 where sharing would save
    under 10% of the batch's tokens (:data:`bittune.training.shared_prefix.MIN_SAVED`)."""
    from bittune.training.shared_prefix import MIN_SAVED

    if len(rows) < 2:
        return 0
    n = min(len(r) for r in rows) - 1
    for k in range(n):
        if any(r[k] != rows[0][k] for r in rows):
            n = k
            break
    saved = (len(rows) - 1) * n / sum(len(r) for r in rows)
    return n if n > 0 and saved >= MIN_SAVED else 0


def _prompt_batch(model: Any, rows: list[list[int]], pad: int, device: Any) -> tuple[Any, Any, Any, int]:
    """Prompts ``rows`` laid out for one batch: ``(ids, mask, cache, prefix)``.

    Each row's tokens end at the same column (padding goes before them), so what follows lines up. On CPU the
    rows' common beginning (system prompt, instruction) runs here once, as a batch of one: ``cache`` holds its keys
    and values for every row (a view), ``ids`` is ``[prefix][padding][row's own tokens]`` and ``prefix`` its
    length. Elsewhere, or when too little is shared, the rows are left-padded whole (``cache`` None, ``prefix`` 0):
    a GPU's forward is bound by kernel launches, not tokens.
    """
    import torch

    from bittune.training.shared_prefix import expand_cache

    prefix = _shared_prefix(rows) if torch.device(device).type == "cpu" else 0
    cache = None
    if prefix:
        cache = model(input_ids=torch.tensor([rows[0][:prefix]], device=device), use_cache=True).past_key_values
        if not expand_cache(cache, len(rows)):  # e.g. sliding-window layers: no sharing
            cache, prefix = None, 0
    own, own_mask = _left_pad([r[prefix:] for r in rows], pad)
    head = torch.tensor([rows[0][:prefix]], dtype=own.dtype).expand(len(rows), -1)
    ids = torch.cat([head, own], 1).to(device)
    mask = torch.cat([torch.ones_like(head), own_mask], 1).to(device)
    return ids, mask, cache, prefix


def _prefill(model: Any, rows: list[list[int]], pad: int, device: Any) -> tuple[Any, Any, Any]:
    """Run the prompts ``rows`` (:func:`_prompt_batch`); returns the logits at each one's last token, the cache and
    its attention mask. Positions count real tokens only."""
    ids, mask, cache, prefix = _prompt_batch(model, rows, pad, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix:]
    # Only the last position's logits are needed: skip the output head everywhere else.
    out = model(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)  # fmt: skip
    return out.logits[:, -1], out.past_key_values, mask


def label_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    labels: Sequence[str],
    *,
    template: str = "auto",
    system_prompt: str | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[list[float]]:
    """Summed log-probability of each label as the reply to each prompt: ``[prompt][label]``.

    Each prompt batch runs once (its common beginning once for all, on CPU: :func:`_prefill`); every label is then
    scored on the prompt's cached keys and values (the cache is cropped back after each label), so ranking L labels
    costs about one forward pass, not L.
    """
    import torch

    encoded = encode_prompts(tokenizer, prompts, template, system_prompt)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    scores: list[list[float]] = [[] for _ in encoded]
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            logits, cache, mask = _prefill(model, [encoded[i] for i in idx], pad, device)
            lengths = mask.sum(-1)
            first = torch.log_softmax(logits.float(), -1)
            conts = [_continuations(tokenizer, encoded[i], labels) for i in idx]
            for j in range(len(labels)):
                rows = [c[j] for c in conts]
                total = first.gather(1, torch.tensor([[r[0]] for r in rows], device=device)).squeeze(1)
                width = max(len(r) for r in rows)
                if width > 1:
                    cont = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
                    real = torch.tensor([[k < len(r) for k in range(width)] for r in rows], device=device)
                    steps = width - 1
                    o = model(
                        input_ids=cont[:, :steps],
                        attention_mask=torch.cat([mask, torch.ones_like(cont[:, :steps])], 1),
                        position_ids=lengths[:, None] + torch.arange(steps, device=device)[None],
                        past_key_values=cache,
                        use_cache=True,
                    )
                    lp = torch.log_softmax(o.logits.float(), -1).gather(2, cont[:, 1:, None]).squeeze(2)
                    total = total + (lp * real[:, 1:]).sum(1)
                    cache.crop(-steps)
                for i, s in zip(idx, total.tolist(), strict=True):
                    scores[i].append(s)
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return scores


def rank_labels(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], labels: Sequence[str], **kwargs: Any
) -> list[str]:
    """The likeliest label for each prompt (see :func:`label_logprobs` for the keyword arguments)."""
    scores = label_logprobs(model, tokenizer, prompts, labels, **kwargs)
    return [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]
