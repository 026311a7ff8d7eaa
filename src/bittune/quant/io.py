"""Quantized model folders: save, recognise, reload — without the original weights.

A quantized folder is an ordinary model folder (``config.json``, tokenizer, ``model.safetensors``) plus
``bittune_quantized.json`` (the spec, the quantized layer names and the task). How the weights are stored depends
on the method:

* ``fp16``/``bf16``: a plain transformers checkpoint in that dtype;
* ``nf4``/``fp4``/``llm-int8``: transformers' own bitsandbytes serialisation (``quantization_config`` in
  config.json), which stock ``from_pretrained`` also reloads;
* ``int``/``hqq``: each quantized linear as ``<name>.qweight`` (densely packed codes, uint8), ``<name>.scale`` and
  ``<name>.zero`` (float16), ``<name>.bias``; every other tensor as loaded. Reloading builds the model skeleton
  without allocating weights (accelerate's ``init_empty_weights``), swaps in :class:`QuantizedLinear` layers and
  assigns the stored tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bittune.errors import ModelLoadError
from bittune.model import auto_class, pin_bnb_cpu_kernels, set_module
from bittune.quant.spec import GridSpec, Spec
from bittune.sidecars import QUANTIZED_FORMAT_VERSION, QuantizedManifest, write_labels, write_manifest

WEIGHTS_FILE = "model.safetensors"


def save_quantized(
    model: Any,
    folder: Path,
    *,
    spec: Spec,
    task: str,
    tokenizer: Any = None,
    source: str | None = None,
    label_names: list[str] | None = None,
) -> None:
    """Write a quantized ``model`` (from :func:`bittune.quant.quantize`) into an existing, empty ``folder``.

    Callers write into a temporary folder and rename it into place (see ``bittune.storage.atomic_dir``).
    """
    folder = Path(folder)
    if isinstance(spec, GridSpec):
        _save_grid(model, folder)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if label_names:
        write_labels(folder, label_names)
    manifest = QuantizedManifest(
        format_version=QUANTIZED_FORMAT_VERSION, spec=spec, task=task, layers=quantized_layers(model), source=source
    )
    write_manifest(folder, manifest)


def quantized_layers(model: Any) -> list[str]:
    """Names of the layers stored quantized: integer-grid or bitsandbytes linears (none for a 16-bit cast)."""
    kinds = ("QuantizedLinear", "Linear4bit", "Linear8bitLt")
    return [n for n, m in model.named_modules() if type(m).__name__ in kinds]


def _save_grid(model: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        # Tied tensors (embedding = output head) are stored once; tie_weights() restores the sharing on load.
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "bittune_quantized": "1"})


def build_quantized_model(path: str | Path, manifest: QuantizedManifest, *, device: Any = None) -> Any:
    """The model stored in quantized folder ``path`` (described by its ``manifest``), in eval mode on ``device``.

    The low-level builder behind :func:`bittune.artifacts.load` (which reads the manifest once, in ``resolve``).
    """
    import torch

    path = Path(path)
    spec, task = manifest.spec, manifest.task
    device = torch.device(device or "cpu")
    if isinstance(spec, GridSpec):
        model = _load_grid(path, spec, task, manifest.layers, device)
    else:
        model = auto_class(task).from_pretrained(
            str(path),
            dtype=torch.float32 if device.type == "cpu" else "auto",
            # bitsandbytes layers quantize/unpack on placement: let transformers place them.
            device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"},
        )
        pin_bnb_cpu_kernels(model)
    return model.eval()


def _load_grid(path: Path, spec: GridSpec, task: str, layers: list[str], device: Any) -> Any:
    import torch
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from bittune.quant.linear import QuantizedLinear

    config = AutoConfig.from_pretrained(str(path))
    # Parameters on the meta device (no memory, no init); buffers such as rotary frequencies are computed for real.
    with init_empty_weights(include_buffers=False):
        model = auto_class(task).from_config(config, dtype=torch.float32)
    for name in layers:
        meta = model.get_submodule(name)
        q = QuantizedLinear(
            meta.in_features,
            meta.out_features,
            bits=spec.bits,
            group_size=spec.group_size,
            bias=meta.bias is not None,
            device="cpu",
        )
        set_module(model, name, q)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (OSError, SafetensorError) as exc:
        raise ModelLoadError(
            f"{path / WEIGHTS_FILE} is missing or corrupt ({exc})", hint="quantize the model again into a new folder"
        ) from None
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ModelLoadError(
            f"{path} does not match its config (unexpected tensors {result.unexpected_keys[:3]})",
            hint="quantize the model again into a new folder",
        )
    model.tie_weights()
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"{path} lacks tensors {missing[:3]}", hint="quantize the model again into a new folder")
    return model.to(device)
