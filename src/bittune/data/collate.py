"""Batch tokenized rows into tensors for the model.

Three shapes of batch:

* causal, not packed: right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding);
* causal, packed: ``input_ids``, ``labels`` and ``position_ids`` and deliberately *no* ``attention_mask``;
  transformers 5 then derives a block-diagonal causal mask from where ``position_ids`` restart. Call the model
  with ``use_cache=False`` as well (see :func:`model_inputs`): the packed-sequence detection is skipped when a
  cache exists, and models create one by default;
* classification: right-padded ``input_ids`` and ``attention_mask``, ``labels`` as a 1-D LongTensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bittune.data.tokenize import IGNORE

if TYPE_CHECKING:
    import torch

CLASSIFICATION_TASKS = ("classification",)


def _pad(seqs: list[list[int]], value: int, length: int) -> list[list[int]]:
    return [list(s) + [value] * (length - len(s)) for s in seqs]


def make_collator(task: str, pad_id: int, packed: bool) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A function that turns a list of rows from :func:`prepare_data` into a batch of tensors.

    Args:
        task: ``"causal-lm"`` or ``"classification"``.
        pad_id: The tokenizer's pad token id.
        packed: Rows were packed (``PreparedData.packed``).

    Returns:
        The collate function (usable as a ``DataLoader`` ``collate_fn``).
    """
    if pad_id is None:
        raise ValueError("pad_id is None: give the tokenizer a pad token (e.g. tokenizer.pad_token = eos_token)")

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor(_pad([r["input_ids"] for r in rows], pad_id, length), dtype=torch.long)
        if task in CLASSIFICATION_TASKS:
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows])
            labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        labels = torch.tensor(_pad([r["labels"] for r in rows], IGNORE, length), dtype=torch.long)
        if packed:
            # Rows are all max_length already; padding here only guards against a caller mixing lengths,
            # and its positions restart at 0 so the pad is its own segment.
            pos = [list(r["position_ids"]) + list(range(length - len(r["position_ids"]))) for r in rows]
            return {"input_ids": ids, "labels": labels, "position_ids": torch.tensor(pos, dtype=torch.long)}
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def count_targets(task: str, labels: Any) -> int:
    """Loss terms in a batch's ``labels``: label positions after the shift (``labels[:, 1:] != -100``) for a
    causal LM, rows for a classifier. The one count every loss normalisation and eval uses."""
    if task == "classification":
        return int(labels.numel())
    return int((labels[:, 1:] != IGNORE).sum())


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``model(**...)`` from a collated batch: everything but ``labels``.

    Packed batches also get ``use_cache=False``: transformers 5 only derives the block-diagonal mask from
    ``position_ids`` when there is no cache, and models default to creating one, even in training mode.
    """
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in batch and "attention_mask" not in batch:
        kwargs["use_cache"] = False
    return kwargs


def split_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split one micro-batch's rows into forward passes of at most ``max_tokens`` padded tokens each.

    Rows are taken shortest first (so rows of similar length share a pass and pad little) and a pass closes when
    one more row would make ``rows x longest`` exceed ``max_tokens``; a row longer than the budget gets a pass of
    its own. Every row lands in exactly one pass, so with losses normalised by the step's target count (see
    ``training.loss``) the summed gradients are the micro-batch's own, while the activations held at once shrink
    to one pass's and less padding is computed.

    Args:
        lengths: Token count of each row of the micro-batch.
        max_tokens: Padded tokens per forward pass (rows x longest row).

    Returns:
        Row indices per pass, each list in ascending length.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    passes: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            passes.append(current)
            current = []
        current.append(i)
    if current:
        passes.append(current)
    return passes


def split_batch(batch: dict[str, Any], max_tokens: int | None) -> list[dict[str, Any]]:
    """A collated causal-LM micro-batch as forward passes of at most ``max_tokens`` padded tokens each.

    Rows are grouped by length (:func:`split_by_tokens`) and each pass is cut to its own longest row (batches are
    right-padded), so the passes together hold exactly the micro-batch's rows and targets. Packed batches (no
    ``attention_mask``), classification batches and batches within the budget come back whole.
    """
    if max_tokens is None or "attention_mask" not in batch or batch["labels"].dim() != 2:
        return [batch]
    if batch["input_ids"].numel() <= max_tokens:
        return [batch]
    import torch

    lengths = batch["attention_mask"].sum(1).tolist()
    passes = []
    for rows in split_by_tokens(lengths, max_tokens):
        index, width = torch.tensor(rows), max(lengths[i] for i in rows)
        passes.append({k: v[index, :width] for k, v in batch.items()})
    return passes
