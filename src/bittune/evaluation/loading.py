"""The one place evaluation, reports, the ladder and the demo load a model.

Today this calls :func:`bittune.model.load_for_inference` (as trained) and :func:`bittune.quant.merge.load_merged`
(one float model). When ``bittune.artifacts`` lands, only :func:`load_model` and :func:`describe` change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

As = Literal["trained", "merged"]


@dataclass
class LoadedModel:
    """A model ready to evaluate: weights in eval mode, its tokenizer, its task and where it came from."""

    model: Any
    tokenizer: Any
    task: str  # "causal-lm" or "classification"
    path: str
    adapter: str | None
    load_s: float

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device


def describe(path: str, adapter: str | None = None) -> tuple[str, str | None, str]:
    """``(base, adapter, task)`` of a model/adapter/run/quantized folder or hub id; reads no weights."""
    from bittune.model import model_source, resolve_inference_source

    base, adapter, task = resolve_inference_source(path, adapter)
    source = model_source(base)  # a missing path or a bad .gguf fails here, before any weights are read
    if not Path(source).expanduser().exists():  # a hub id: fail in seconds, not after a minute of retries
        from bittune.hub import require_reachable

        require_reachable(source)
    return base, adapter, task


def load_model(path: str, *, adapter: str | None = None, device: str = "auto", as_: As = "trained") -> LoadedModel:
    """Load ``path`` for evaluation, quietly (third-party progress bars are shown with ``--debug`` only).

    Args:
        path: Model folder, hub id, adapter folder, run directory or ``bittune quantize`` folder.
        adapter: A PEFT adapter to put on ``path``.
        as_: ``trained``: exactly as trained (a QLoRA adapter on its k-bit base, a quantized folder as quantized);
            ``merged``: one float model with any adapter merged in (faster to generate with).
    """
    from bittune.quiet import quiet_third_party

    t0 = time.perf_counter()
    with quiet_third_party():
        if as_ == "merged" and adapter is None:
            from bittune.quant.merge import load_merged

            model, tokenizer, task, info = load_merged(path, device=device)
            used_adapter = info.get("adapter")
        else:
            from bittune.model import load_for_inference, resolve_inference_source

            model, tokenizer, task = load_for_inference(path, adapter=adapter, device=device)
            used_adapter = resolve_inference_source(path, adapter)[1]
            if as_ == "merged" and hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload().eval()
    return LoadedModel(model, tokenizer, task, path, used_adapter, round(time.perf_counter() - t0, 2))
