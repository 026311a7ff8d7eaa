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


def count_tokens(batch: dict[str, Any]) -> int:
    """Input tokens of a collated batch that are not padding."""
    return int(batch.get("attention_mask", batch["input_ids"]).ne(0).sum())


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
    """Split rows into forward passes of at most ``max_tokens`` padded tokens each.

    Rows are taken shortest first (so rows of similar length share a pass and pad little) and a pass closes when
    one more row would make ``rows x longest`` exceed ``max_tokens``; a row longer than the budget gets a pass of
    its own. Every row lands in exactly one pass, so with losses normalised by the step's target count (see
    ``training.loss``) the summed gradients are those of the rows together, while the activations held at once
    shrink to one pass's and less padding is computed.

    Args:
        lengths: Token count of each row.
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


# Padded tokens per forward pass on CPU (train.max_tokens_per_pass: auto). Pooling a step's short chat rows into
# one pass of up to this many tokens ran a SmolLM2-135M LoRA step ~1.45x faster than a pass per 4-row micro-batch
# (bench/pooled_passes.py), and splitting 4 x 256-token micro-batches into 2-row passes cut the run's peak RSS by
# ~38% for 0-10% of the step's time (bench/vs_trl.py; BENCHMARKS.md, "Pooled passes"). In single trial runs 512
# split 8 TREC rows (~69 tokens) and was slower; 1024 keeps 4 x 256 whole and so keeps its memory.
CPU_TOKENS_PER_PASS = 640


def pass_budget(setting: int | str | None, device_type: str, *, one_process: bool = True) -> int | None:
    """The padded tokens per forward pass a training step uses (``train.max_tokens_per_pass``).

    ``auto``: :data:`CPU_TOKENS_PER_PASS` on CPU, where it was measured to pay; elsewhere one pass per micro-batch
    (None). Several processes always run one pass per micro-batch: their collectives count micro-batches.
    """
    if not one_process:
        return None
    if setting == "auto":
        return CPU_TOKENS_PER_PASS if device_type == "cpu" else None
    return setting  # type: ignore[return-value]


def _row_chunks(batch: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    """``batch`` as consecutive passes of ``rows`` rows (views; the batch itself when it has no more)."""
    n = len(batch["input_ids"])
    if n <= rows:
        return [batch]
    return [{k: v[i : i + rows] for k, v in batch.items()} for i in range(0, n, rows)]


# What a pooled row is padded with when its pass is wider than the micro-batch it came from (right padding).
_PAD_VALUES = {"labels": IGNORE, "attention_mask": 0}


def step_passes(batches: list[dict[str, Any]], max_tokens: int | None) -> list[dict[str, Any]]:
    """An optimizer step's collated micro-batches as forward passes of at most ``max_tokens`` padded tokens each.

    Padded causal-LM rows of all micro-batches are pooled and regrouped by length (:func:`split_by_tokens`); each
    pass is cut or right-padded to its own longest row. Pooling lets short rows share one wide pass (two 4-row
    micro-batches of TREC questions become one pass of 8 rows on CPU, whose matmuls run closer to the machine's
    rate) while long rows get passes of their own (less activation memory at once, less padding). Packed rows
    (no ``attention_mask``; each row is its own sequences, all as wide as the micro-batch) are split into passes
    of as many whole rows as the budget holds, within their micro-batch. Either way the passes hold exactly the
    step's rows and targets, so with losses normalised by the step's target count the summed gradients are the
    step's own. Classification batches, and a single padded micro-batch within the budget, come back as they are.
    """
    if max_tokens is None or not all(b["labels"].dim() == 2 for b in batches):
        return list(batches)
    if not all("attention_mask" in b for b in batches):
        return [p for b in batches for p in _row_chunks(b, max(1, max_tokens // b["input_ids"].shape[1]))]
    if len(batches) == 1 and batches[0]["input_ids"].numel() <= max_tokens:
        return list(batches)
    import torch
    import torch.nn.functional as F

    rows = [(b, i) for b in batches for i in range(len(b["input_ids"]))]
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1).tolist()]

    def row(j: int, key: str, width: int) -> torch.Tensor:
        batch, i = rows[j]
        t = batch[key][i, :width]
        return F.pad(t, (0, width - len(t)), value=_PAD_VALUES.get(key, 0)) if len(t) < width else t

    passes = []
    for group in split_by_tokens(lengths, max_tokens):
        width = max(lengths[j] for j in group)
        passes.append({k: torch.stack([row(j, k, width) for j in group]) for k in batches[0]})
    return passes
