"""The one place evaluation, reports, the ladder and the demo load a model: :mod:`bittune.artifacts` underneath.

:func:`describe` resolves a path (no weights; a hub id is checked for reachability so it fails in seconds) and
:func:`load_model` loads it quietly, timed, as trained or merged by the one merge policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bittune.artifacts import Artifact, LoadAs


@dataclass
class LoadedModel:
    """A model ready to evaluate: weights in eval mode, its tokenizer, its task and where it came from."""

    model: Any
    tokenizer: Any
    task: str  # "causal-lm" or "classification"
    path: str
    adapter: str | None
    load_s: float
    artifact: Artifact | None = None

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device


def describe(path: str | Artifact, adapter: str | None = None) -> Artifact:
    """What ``path`` is (:func:`bittune.artifacts.resolve`); reads no weights, fails fast on an unreachable hub id."""
    from bittune.artifacts import as_artifact, resolve
    from bittune.model import looks_like_hub_id

    artifact = resolve(path, adapter) if adapter is not None else as_artifact(path)
    base = artifact.base
    if base and not Path(base).expanduser().exists() and looks_like_hub_id(base):
        from bittune.hub import require_reachable

        require_reachable(base)  # seconds, not a minute of retries
    return artifact


def load_model(
    path: str | Artifact, *, adapter: str | None = None, device: str = "auto", as_: LoadAs = "trained"
) -> LoadedModel:
    """Load ``path`` for evaluation, quietly (third-party progress bars are shown with ``--debug`` only).

    Args:
        path: Model folder, hub id, adapter folder, run directory, ``bittune quantize`` folder, ``.gguf`` file, or
            an artifact :func:`describe` returned.
        adapter: A PEFT adapter to put on ``path``.
        as_: ``trained``: exactly as trained (a QLoRA adapter on its k-bit base, a quantized folder as quantized);
            ``merged``: one float model by the merge policy (faster to generate with).
    """
    from bittune.artifacts import load
    from bittune.quiet import quiet_third_party

    artifact = describe(path, adapter)
    t0 = time.perf_counter()
    with quiet_third_party():
        model, tokenizer, task = load(artifact, as_=as_, device=device)
    load_s = round(time.perf_counter() - t0, 2)
    return LoadedModel(model, tokenizer, task, artifact.path, artifact.adapter, load_s, artifact)
