"""The low-level model layer: from_pretrained and tokenizer wrappers, LoRA, device and dtype, module surgery.

Components here take plain arguments, not the config object, so they can be used on their own. What to load for
a path (run dir, adapter, quantized folder, ...) and how (as trained, or merged) is :mod:`bittune.artifacts`.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bittune.errors import ModelLoadError
from bittune.sidecars import QUANTIZED_MANIFEST_FILE

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    import torch

    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "train.device is 'cuda' but no CUDA GPU is visible", hint="set train.device to 'auto' or 'cpu'"
        )
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(preference)


def resolve_dtype(preference: str, device: torch.device, *, trainable_base: bool) -> torch.dtype:
    """Pick the weights dtype.

    On CPU everything runs in float32: bf16/fp16 matmuls are ~50x slower there. On a GPU a frozen base (LoRA)
    is stored in bf16 (or fp16 without bf16 support); weights that are trained in full stay float32 and mixed
    precision does the fast compute, since pure bf16 AdamW updates lose small steps to rounding.
    """
    import torch

    if preference != "auto":
        return getattr(torch, preference)
    if device.type != "cuda" or trainable_base:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_mixed_precision(preference: str, device: torch.device, *, cpu_bf16_candidate: bool = False) -> str:
    """The run's autocast setting: ``no``, ``bf16`` or ``fp16``.

    ``auto`` on a GPU: bf16 (or fp16). ``auto`` on CPU: ``bf16`` only for a ``cpu_bf16_candidate`` run (LoRA over a
    float base: frozen base stored in bf16, adapters and optimizer in float32) on a CPU where a bf16 matmul was
    *measured* faster than float32 (:func:`bittune.plan.device.fastest_cpu_dtype`: AMX / AVX512-BF16 Xeons), else
    ``no`` (float32; e.g. AMD EPYC Zen 1/2 run bf16 ~60x slower). ``no`` always means float32.
    """
    import torch

    if preference != "auto":
        if preference != "no" and device.type != "cuda":
            raise ModelLoadError(
                f"train.mixed_precision '{preference}' needs a GPU; on CPU bittune picks bf16 by itself (auto) "
                "where a measurement says this CPU runs it faster than fp32",
                hint="set train.mixed_precision to 'auto' or 'no'",
            )
        return preference
    if device.type != "cuda":
        from bittune.plan.device import fastest_cpu_dtype

        return "bf16" if cpu_bf16_candidate and fastest_cpu_dtype() == torch.bfloat16 else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_compute_dtype(preference: str, device: torch.device) -> torch.dtype:
    """Compute dtype of k-bit layers: float32 on CPU, bf16 on a GPU that has it, else fp16.

    An explicit value that cannot work well on the device is refused rather than silently slow.
    """
    import torch

    if preference == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda" and preference != "float32":
        raise ModelLoadError(
            f"quant.compute_dtype {preference} on CPU: half-precision matmuls run ~50x slower than float32 here",
            hint="set quant.compute_dtype to auto or float32",
        )
    if preference == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("quant.compute_dtype bfloat16: this GPU has no bf16 support", hint="use auto or float16")
    return getattr(torch, preference)


def pin_bnb_cpu_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Keep bitsandbytes 4-bit layers on their fp32 CPU path in eval too (in place; returns ``model``).

    On CPUs with AVX512-BF16 bitsandbytes repacks a 4-bit weight on the first no-grad eval forward and computes in
    bf16 from then on: eval then differs from what training computed (and layers narrower than 64 inputs fail).
    bittune evaluates what it trained, so the per-layer switch ``support_avx512bf16_for_cpu`` is turned off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def model_source(path: str) -> str:
    """Where to load ``model.path`` from, failing early, with a clear message, on paths that cannot be a model.

    A ``.gguf`` file is converted once into a cached Hugging Face folder (see :mod:`bittune.gguf_import`) and that
    folder is returned; folders and hub ids are returned unchanged.
    """
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            if p.suffix.lower() == ".gguf":
                from bittune.gguf_import import gguf_model_folder

                return str(gguf_model_folder(p, log=lambda msg: print(msg, file=sys.stderr)))
            raise ModelLoadError(
                f"model.path {path} is a file, not a model directory",
                hint="point model.path at a folder with config.json, or at a .gguf file",
            )
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"model.path {path} has no config.json, so it is not a Hugging Face model folder",
                hint="point model.path at the folder written by save_pretrained (or a bittune run's model/)",
            )
        check_weight_files(p)
        return path
    if not looks_like_hub_id(path):
        raise ModelLoadError(
            f"model.path {path} does not exist", hint="fix the path, or use a hub id like 'owner/name'"
        )
    from bittune.hub import require_reachable

    require_reachable(path)  # every loader comes through here: seconds, not the loaders' minute of retries
    return path


def check_weight_files(folder: Path) -> None:
    """Refuse a folder whose ``.safetensors`` files are cut short or damaged, from their headers alone.

    A safetensors file is an 8-byte header length, a JSON header with each tensor's byte range, then the data: a
    file shorter than its last range (an interrupted copy or download) would otherwise fail deep inside the
    loader, after the command had started, or load as garbage.
    """
    import json
    import struct

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length)) if length <= size else None  # a garbled length
            if header is None:
                whole = False
            else:
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                whole = size >= 8 + length + end
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, MemoryError):
            whole = False
        if not whole:
            raise ModelLoadError(
                f"{f} is damaged or incomplete (cut short?)",
                hint="copy or download the model again (or save it again with save_pretrained)",
            )


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` that is not a local path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()


def hub_error(path: str, exc: Exception) -> ModelLoadError:
    """The message for a model or tokenizer that from_pretrained could not load (offline, missing, malformed)."""
    if Path(path).expanduser().is_dir():  # a local folder: what it lacks, not the hub's cache
        return ModelLoadError(
            f"could not load the model folder {path} ({type(exc).__name__}: {exc})",
            hint="the folder is incomplete or damaged (tokenizer files, config.json, weights): save it again with "
            "save_pretrained, or copy it again",
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(exc).__name__}: {exc}"
    return ModelLoadError(
        f"could not load model '{path}' ({why})",
        hint="check the id or path; without a network, download it once elsewhere and point model.path at the folder",
    )


def refuse_quantized_folder(path: str) -> None:
    """Refuse a ``bittune quantize`` output as a model to train or load as float weights.

    Its safetensors hold packed integer codes under other names; transformers would not find the weights it
    expects and would silently start from random ones.
    """
    manifest = Path(path).expanduser() / QUANTIZED_MANIFEST_FILE
    if manifest.is_file():
        raise ModelLoadError(
            f"model.path {path} is a `bittune quantize` output (packed low-bit codes), not trainable float weights",
            hint="train from the original full-precision model or run directory (method: qlora trains on a 4-bit "
            "base); evaluate, compare or export the quantized folder instead",
        )


def load_tokenizer(path: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """Load a tokenizer and make sure it can pad.

    A missing pad token is set to eos. That is safe here because bittune builds labels from the template's
    spans, never by masking ``input_ids == pad_id`` — which would also mask every real eos.
    """
    from transformers import AutoTokenizer

    path = model_source(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise hub_error(path, exc) from None
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"tokenizer of {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str,
    *,
    task: str,
    dtype: torch.dtype,
    label_names: list[str] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    pad_token_id: int | None = None,
    quantization: Any = None,
    device: torch.device | None = None,
) -> PreTrainedModel:
    """Load a causal LM or a sequence classifier from a folder or hub id.

    Args:
        quantization: A ``BitsAndBytesConfig`` (see :func:`bittune.quant.api.bnb_config`) to store the linear
            layers in k-bit; the model is then placed on ``device`` while loading, as bitsandbytes quantizes on
            placement.
    """
    path = model_source(path)
    refuse_quantized_folder(path)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "revision": revision}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        on_gpu = device is not None and device.type == "cuda"
        kwargs["device_map"] = {"": (device.index or 0) if on_gpu else "cpu"}
    if task == "classification":
        if not label_names:
            raise ModelLoadError("classification needs label names from the data")
        kwargs["num_labels"] = len(label_names)
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    try:
        model = auto_class(task).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise hub_error(path, exc) from None
    if task == "classification" and pad_token_id is not None and model.config.pad_token_id is None:
        # Decoder classifiers find the last real token through pad_token_id.
        model.config.pad_token_id = pad_token_id
    if quantization is None:
        return model
    from bittune.training.mapped import release_mapped_weights

    # bitsandbytes read every float linear through the checkpoint's memory mapping; the weights it left unquantized
    # (embeddings, norms) are views into it and would keep all those pages resident: copied out, the mapping goes.
    release_mapped_weights(model)
    return pin_bnb_cpu_kernels(model)


def auto_class(task: str) -> Any:
    """The transformers auto class of a bittune task: a sequence classifier or a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put ``module`` at dotted ``name``, in the model's train/eval mode (bitsandbytes layers behave differently)."""
    module.train(model.training)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def attach_lora(
    model: PreTrainedModel,
    *,
    task: str,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str,
    bias: str = "none",
    modules_to_save: list[str] | None = None,
) -> Any:
    """Wrap ``model`` in a PEFT LoRA model; only the adapter (and the classifier head) train."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias=bias,
        modules_to_save=modules_to_save,
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ModelLoadError(
            f"lora.target_modules {target_modules!r} does not fit this model: {exc}",
            hint="use 'all-linear' or names of Linear layers printed by print(model)",
        ) from None


def check_lora_targets(
    path: str,
    *,
    task: str,
    target_modules: list[str] | str,
    num_labels: int = 2,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> None:
    """Refuse LoRA target modules that match nothing, before any weights are loaded.

    The model is built from its config on the ``meta`` device (no memory, no weights) and LoRA is attached to it,
    so a misspelled target fails in a second instead of after minutes of loading.
    """
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        model_source(path), trust_remote_code=trust_remote_code, revision=revision, num_labels=num_labels
    )
    with torch.device("meta"):
        skeleton = auto_class(task).from_config(config, trust_remote_code=trust_remote_code)
    with warnings.catch_warnings():  # deprecation notices from peft/transformers internals say nothing to the user
        warnings.simplefilter("ignore", FutureWarning)
        attach_lora(skeleton, task=task, r=1, alpha=1, dropout=0.0, target_modules=target_modules, bias="none")


def prepare_kbit_base(model: PreTrainedModel, *, gradient_checkpointing: bool) -> PreTrainedModel:
    """Freeze a k-bit base for adapter training, keeping its unquantized weights in the dtype they were loaded in.

    ``peft.prepare_model_for_kbit_training`` upcasts every unquantized weight (embeddings, norms, head) to
    float32. Under bf16 autocast a float32 norm weight turns the whole residual stream into float32, and on a
    1.1B Llama that made QLoRA peak higher than plain bf16 LoRA (15.1 vs 13.4 GB, BENCHMARKS.md). Frozen weights
    receive no updates, so float32 buys them nothing; the trainable LoRA weights are float32 anyway (PEFT casts
    adapters up). Only fp16 norms are upcast, since fp16 overflows in the RMS.
    """
    import torch

    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype == torch.float16 and param.ndim == 1:
            param.data = param.data.float()
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing on every decoder layer: each keeps only its input and recomputes the rest in
    backward. Non-reentrant (``torch.utils.checkpoint``'s recommended mode), which also replays dropout draws and
    passes gradients to tensors a layer reads without taking them as inputs (the shared prefix's keys and values)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the new name (5.23 has it); the old one warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
