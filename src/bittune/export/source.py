"""What is being exported: a model folder, or a run directory whose LoRA adapter is merged into its base."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bittune.errors import ModelLoadError


@dataclass
class ExportSource:
    """Where the weights come from (read without loading any weights).

    Attributes:
        path: What the user gave (model folder, adapter folder or run dir).
        base: The base model folder or hub id.
        adapter: The PEFT adapter folder, or None for a plain model.
        task: ``causal-lm`` or ``classification``.
        run_dir: The bittune run directory, when ``path`` is one.
        config: The base model's config.json as a dict.
        kbit: The adapter's ``bittune_quantization.json`` (a QLoRA run), or None.
        quantized: The label of a ``bittune quantize`` folder's method (e.g. ``gptq3-g64``), or None.
    """

    path: str
    base: str
    adapter: str | None
    task: str
    run_dir: Path | None
    config: dict[str, Any] = field(default_factory=dict)
    kbit: dict[str, Any] | None = None
    quantized: str | None = None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else str(self.config.get("model_type", "unknown"))


def resolve_source(path: str) -> ExportSource:
    """Find base, adapter and task of ``path`` and read the base's config.json.

    Raises:
        ModelLoadError: if ``path`` is not a model folder, adapter folder or finished run.
    """
    from bittune.export.card import looks_like_hub_id
    from bittune.model import QUANT_FILE, model_source, resolve_inference_source

    p = Path(path)
    if not p.exists() and not looks_like_hub_id(path):
        raise ModelLoadError(
            f"{path} does not exist", hint="pass a run directory, a model folder, or a hub id like owner/name"
        )
    run_dir = p if (p / "run_config.yaml").is_file() else None
    if run_dir is None:
        model_source(path)  # a folder with config.json / adapter_config.json, a .gguf file, or a hub id
    base, adapter, task = resolve_inference_source(path)
    base = model_source(base)  # a run tuned from a .gguf file: its converted (cached) folder
    config = _read_config(base)
    kbit = None
    if adapter and (Path(adapter) / QUANT_FILE).is_file():
        kbit = json.loads((Path(adapter) / QUANT_FILE).read_text(encoding="utf-8"))
    quantized = None
    if adapter is None:
        from bittune.quant.io import is_quantized_dir, read_manifest

        if is_quantized_dir(base):
            quantized = read_manifest(base)["spec"].label()
    return ExportSource(path, base, adapter, task, run_dir, config, kbit, quantized)


def _read_config(base: str) -> dict[str, Any]:
    cfg = Path(base) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text(encoding="utf-8"))
    from transformers import AutoConfig

    from bittune.model import _hub_error

    try:
        return AutoConfig.from_pretrained(base).to_dict()
    except (OSError, ValueError) as exc:
        raise _hub_error(base, exc) from None


def load_source_tokenizer(source: ExportSource) -> Any:
    """The tokenizer saved with the adapter (a run saves it there), else the base model's."""
    from bittune.model import load_tokenizer

    adapter = source.adapter
    return load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else source.base)


def load_merged(source: ExportSource, tokenizer: Any = None) -> tuple[Any, Any]:
    """Load the model in float32 on CPU with its adapter merged in, and its tokenizer.

    A QLoRA adapter is merged into the base loaded in full precision (not into the 4-bit weights it was trained
    against): merging into 4-bit blocks would need a re-quantization, and a full-precision export is what
    llama.cpp and the Hub expect. The model card says so.

    A ``bittune quantize`` folder is loaded as quantized and its layers dequantized: the export holds exactly the
    values the quantized model computes with, in float (its own weight files hold packed codes no float reader
    understands; loading them as a plain model would silently start from random weights).

    Returns:
        (model in eval mode, tokenizer)
    """
    import torch

    from bittune.model import load_model

    tokenizer = tokenizer if tokenizer is not None else load_source_tokenizer(source)
    if source.quantized is not None:
        from bittune.quant.io import load_quantized
        from bittune.quant.merge import dequantize_bnb_linears, dequantize_grid_linears

        model, _ = load_quantized(source.base, device="cpu")
        dequantize_grid_linears(model)
        dequantize_bnb_linears(model)
        return model.float().eval(), tokenizer
    label_names = None
    if source.task == "classification":
        labels = Path(source.adapter or source.base) / "labels.json"
        if labels.is_file():
            label_names = json.loads(labels.read_text(encoding="utf-8"))
        else:
            id2label = source.config.get("id2label") or {}
            label_names = [id2label[k] for k in sorted(id2label, key=int)] or None
    model = load_model(
        source.base,
        task=source.task,
        dtype=torch.float32,
        label_names=label_names,
        pad_token_id=tokenizer.pad_token_id,
    )
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter).merge_and_unload()
    model.eval()
    return model, tokenizer
