"""What a path holds, and how to load it: one resolver, one loader, one merge policy.

:func:`resolve` looks at a path once and returns a typed :data:`Artifact` -- a run directory, a model folder, an
adapter folder, a quantized folder, a ``.gguf`` file or a hub id -- that knows its task, its base, its adapter,
its label names and its sidecars (read through :mod:`bittune.sidecars`). It reads small JSON/YAML files only,
never weights, so every command can refuse a bad path before the slow part.

:func:`load` is the one way weights are loaded for use (eval, generate, compare, merge, export, quantize, the demo,
a distillation teacher):

* ``as_="trained"``: exactly the model that was trained and evaluated -- a QLoRA adapter on its base quantized
  with the spec recorded in ``bittune_quantization.json``, a quantized folder as quantized, anything else as is.
* ``as_="merged"``: one float32 model without adapters or quantized layers, by **the merge policy**: the base is
  loaded as it was in training, its bitsandbytes layers are dequantized (so a QLoRA adapter lands on the very
  weights it was trained against, not on the float weights before quantization), then PEFT's
  ``merge_and_unload`` adds the adapter. A quantized folder is dequantized to the values it computes with.
  ``bittune merge``, ``bittune export``, ``bittune quantize`` of a run and the demo's evaluation all use it;
  BENCHMARKS.md ("Merge policy") has the measurement it was chosen by.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

from bittune.errors import ModelLoadError, StorageError
from bittune.model import looks_like_hub_id
from bittune.quant.spec import BnbSpec
from bittune.sidecars import (
    QUANTIZED_MANIFEST_FILE,
    RUN_CONFIG_FILE,
    QatSettings,
    QuantizedManifest,
    read_labels,
    read_manifest,
    read_qat_settings,
    read_training_quant,
)
from bittune.storage import read_json

if TYPE_CHECKING:
    from bittune.config import RunConfig

Task = Literal["causal-lm", "classification"]
LoadAs = Literal["trained", "merged"]


@dataclass(frozen=True)
class _Artifact:
    """What every artifact knows (read without loading weights).

    Attributes:
        path: The path or id as given.
        task: ``causal-lm`` or ``classification``.
        base: Where the base weights come from: the artifact itself, or the model an adapter was trained on
            (a folder, hub id or ``.gguf`` file).
        adapter: The PEFT adapter folder, or None.
        training_quant: How the base was quantized in training (a QLoRA adapter's ``bittune_quantization.json``).
        qat: The ``qat.json`` of a QAT-trained model or adapter.
        label_names: A classifier's label names as the run saved them (``labels.json``), or None.
    """

    path: str
    task: Task = "causal-lm"
    base: str = ""
    adapter: str | None = None
    training_quant: BnbSpec | None = None
    qat: QatSettings | None = None
    label_names: tuple[str, ...] | None = None
    kind: ClassVar[str] = "model"

    @property
    def tokenizer_source(self) -> str:
        """The adapter folder when a run saved its tokenizer there, else the base."""
        if self.adapter and (Path(self.adapter) / "tokenizer_config.json").is_file():
            return self.adapter
        return self.base

    @property
    def run_dir(self) -> Path | None:
        """The bittune run directory, when the artifact is one."""
        return None

    @property
    def run_config(self) -> RunConfig | None:
        """The run's validated ``run_config.yaml``, when the artifact is a run directory."""
        return None


@dataclass(frozen=True)
class ModelDir(_Artifact):
    """A Hugging Face model folder (``config.json`` + weights): a base, a full fine-tune's ``model/``, a merge."""


@dataclass(frozen=True)
class AdapterDir(_Artifact):
    """A PEFT adapter folder (``adapter_config.json``) on its ``base``."""

    kind: ClassVar[str] = "adapter"


@dataclass(frozen=True)
class QuantizedDir(_Artifact):
    """A ``bittune quantize`` (or ``merge --into-quantized``) output folder, described by its manifest."""

    manifest: QuantizedManifest | None = None
    kind: ClassVar[str] = "quantized"


@dataclass(frozen=True)
class GgufFile(_Artifact):
    """A ``.gguf`` file: dequantized once into a cached Hugging Face folder when loaded."""

    kind: ClassVar[str] = "gguf"


@dataclass(frozen=True)
class HubId(_Artifact):
    """A Hugging Face hub id (``owner/name``) that is not a local path."""

    kind: ClassVar[str] = "hub"


@dataclass(frozen=True)
class RunDir(_Artifact):
    """A bittune run directory; everything it knows comes from its finished ``final`` folder (adapter/ or model/)."""

    final: ModelDir | AdapterDir | None = None
    kind: ClassVar[str] = "run"

    @property
    def run_dir(self) -> Path | None:
        return Path(self.path)

    @cached_property
    def run_config(self) -> RunConfig | None:  # read on first use: only commands that need it pay for it
        from bittune.config import read_run_config

        return read_run_config(self.path)


Artifact = RunDir | ModelDir | AdapterDir | QuantizedDir | GgufFile | HubId


class Loaded(NamedTuple):
    """What :func:`load` returns."""

    model: Any
    tokenizer: Any
    task: str


# ---------------------------------------------------------------------------------------------------------------
# Resolving (no weights)


def resolve(path: str | Path, adapter: str | Path | None = None) -> Artifact:
    """What ``path`` is (a run directory, model folder, adapter folder, quantized folder, .gguf file or hub id).

    Args:
        path: As the user gave it.
        adapter: A PEFT adapter folder to put on ``path`` (``--adapter``): ``path`` is then its base.

    Raises:
        ModelLoadError: naming the path and what is missing, for anything that is none of these.
    """
    artifact = _resolve(str(path))
    if adapter is not None:
        artifact = _with_adapter(artifact, _resolve(str(adapter)), str(path), str(adapter))
    if artifact.adapter is not None:
        _check_base_exists(artifact)
    return artifact


def as_artifact(source: str | Path | Artifact) -> Artifact:
    """``source`` if it is already resolved, else :func:`resolve` of it."""
    return source if isinstance(source, _Artifact) else resolve(source)


def _resolve(path: str) -> Artifact:
    p = Path(path).expanduser()
    if not p.exists():
        if looks_like_hub_id(path):
            return HubId(path, base=path)
        raise ModelLoadError(
            f"{path} does not exist",
            hint="pass a run directory, a model or adapter folder, a .gguf file, or a hub id like owner/name",
        )
    if not p.is_dir():
        if p.suffix.lower() == ".gguf":
            return GgufFile(path, base=path)
        raise ModelLoadError(
            f"{path} is a file, not a model directory",
            hint="pass a folder with config.json, a run directory, or a .gguf file",
        )
    if (p / RUN_CONFIG_FILE).is_file():
        return _run_dir(p, path)
    if (p / QUANTIZED_MANIFEST_FILE).is_file():
        manifest = read_manifest(p)
        labels = read_labels(p)
        return QuantizedDir(
            path, task=manifest.task, base=path, label_names=_tuple(labels), manifest=manifest, qat=read_qat_settings(p)
        )
    if (p / "adapter_config.json").is_file():
        return _adapter_dir(p, path)
    if (p / "config.json").is_file():
        return _model_dir(p, path)
    raise ModelLoadError(
        f"{path} has no config.json, so it is not a Hugging Face model folder",
        hint="pass the folder written by save_pretrained, a bittune run directory, or an adapter folder",
    )


def _tuple(names: list[str] | None) -> tuple[str, ...] | None:
    return tuple(names) if names else None


def _read_json(path: Path) -> dict[str, Any]:
    """A model folder's JSON object, or :func:`bittune.storage.read_json`'s error as a ModelLoadError (what every
    caller of the loader catches)."""
    try:
        data = read_json(path)
    except StorageError as exc:
        raise ModelLoadError(exc.message, hint=exc.hint) from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object", hint="restore the file")
    return data


def _model_dir(p: Path, path: str) -> ModelDir:
    archs = _read_json(p / "config.json").get("architectures") or []
    task: Task = "classification" if any("SequenceClassification" in a for a in archs) else "causal-lm"
    return ModelDir(path, task=task, base=path, label_names=_tuple(read_labels(p)), qat=read_qat_settings(p))


def _adapter_dir(p: Path, path: str) -> AdapterDir:
    acfg = _read_json(p / "adapter_config.json")
    task: Task = "classification" if acfg.get("task_type") == "SEQ_CLS" else "causal-lm"
    return AdapterDir(
        path,
        task=task,
        base=acfg.get("base_model_name_or_path") or "",
        adapter=path,
        training_quant=read_training_quant(p),
        qat=read_qat_settings(p),
        label_names=_tuple(read_labels(p)),
    )


def _run_dir(p: Path, path: str) -> RunDir:
    if (p / "adapter" / "adapter_config.json").is_file():
        final: ModelDir | AdapterDir = _adapter_dir(p / "adapter", str(p / "adapter"))
    elif (p / "model" / "config.json").is_file():
        final = _model_dir(p / "model", str(p / "model"))
    else:
        raise ModelLoadError(
            f"run directory {path} has no finished adapter/ or model/ yet",
            hint="let the run finish, or resume it with `bittune train CONFIG --resume`",
        )
    fields = {k: getattr(final, k) for k in ("task", "base", "adapter", "training_quant", "qat", "label_names")}
    return RunDir(path, final=final, **fields)


def _with_adapter(base: Artifact, adapter: Artifact, path: str, adapter_path: str) -> AdapterDir:
    if not isinstance(adapter, AdapterDir):
        raise ModelLoadError(
            f"--adapter {adapter_path} is not a PEFT adapter folder (it has no adapter_config.json)",
            hint="pass the adapter/ folder of a LoRA run, or drop --adapter",
        )
    if base.adapter is not None or isinstance(base, QuantizedDir):
        raise ModelLoadError(
            f"{path} is not a plain model to put --adapter on (it is {'an adapter' if base.adapter else 'quantized'})",
            hint="pass the base model folder (or hub id) with --adapter, or drop --adapter",
        )
    return replace(adapter, base=base.base)


def _check_base_exists(artifact: Artifact) -> None:
    base = artifact.base
    if not base:
        raise ModelLoadError(
            f"the adapter {artifact.adapter} does not name its base model (adapter_config.json)",
            hint="pass the base: bittune eval BASE --adapter ADAPTER",
        )
    if not Path(base).expanduser().exists() and not looks_like_hub_id(base):
        raise ModelLoadError(
            f"{base}, the base model of the adapter {artifact.adapter}, does not exist",
            hint="put the base model back at that path, or pass it: bittune eval BASE --adapter ADAPTER",
        )


def base_config(artifact: Artifact) -> dict[str, Any]:
    """The base model's ``config.json`` as a dict (a ``.gguf`` base is converted first, once; hub ids: the cache)."""
    from bittune.model import hub_error, model_source

    base = model_source(artifact.base)
    cfg = Path(base) / "config.json"
    if cfg.is_file():
        return _read_json(cfg)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base).to_dict()
    except (OSError, ValueError) as exc:
        raise hub_error(base, exc) from None


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer_of(artifact: Artifact, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of ``artifact`` (the one a run saved beside its adapter, else the base's)."""
    from bittune.model import load_tokenizer

    return load_tokenizer(artifact.tokenizer_source, trust_remote_code=trust_remote_code)


def load(
    artifact: str | Path | Artifact,
    as_: LoadAs = "trained",
    *,
    device: Any = "auto",
    trust_remote_code: bool = False,
    tokenizer: Any = None,
) -> Loaded:
    """Load ``artifact`` for use, in eval mode (see the module docstring for ``trained`` vs ``merged``).

    Args:
        artifact: What :func:`resolve` returned (a path is resolved first).
        as_: ``trained`` (adapter on its base exactly as trained; quantized as quantized) or ``merged`` (one float32
            model by the merge policy).
        device: ``auto``, ``cpu``, ``cuda`` or a ``torch.device``.
        tokenizer: The tokenizer, when the caller has loaded it already.
    """
    import torch

    from bittune.model import check_weight_files, resolve_device
    from bittune.quant.merge import dequantize_bnb_linears, dequantize_grid_linears

    artifact = as_artifact(artifact)
    if as_ not in ("trained", "merged"):
        raise ValueError(f"as_ must be 'trained' or 'merged', not {as_!r}")
    if artifact.adapter is not None:  # before the base loads (the base's own files: model_source checks them)
        check_weight_files(Path(artifact.adapter))
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer_of(artifact, trust_remote_code=trust_remote_code)
    merged = as_ == "merged"
    if isinstance(artifact, QuantizedDir):
        from bittune.quant.io import build_quantized_model

        model = build_quantized_model(artifact.path, artifact.manifest, device=dev)
        if merged:  # the values it computes with, as plain float weights
            dequantize_grid_linears(model)
            dequantize_bnb_linears(model)
            model = model.float()
        return Loaded(model.eval(), tokenizer, artifact.task)
    model = load_base(
        artifact,
        device=dev,
        dtype=torch.float32 if merged else None,
        tokenizer=tokenizer,
        trust_remote_code=trust_remote_code,
    )
    if merged:
        dequantize_bnb_linears(model)  # the merge policy: the adapter goes onto the weights it was trained against
    if artifact.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, artifact.adapter)
        if merged:
            model = model.merge_and_unload()
    if artifact.training_quant is None:  # bitsandbytes placed a k-bit base while loading
        model.to(dev)
    return Loaded(model.eval(), tokenizer, artifact.task)


def load_base(
    artifact: Artifact,
    *,
    device: Any,
    dtype: Any = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
) -> Any:
    """The base model of ``artifact`` without its adapter, stored as in training (a QLoRA base in k-bit).

    Args:
        dtype: Weights dtype of the unquantized tensors; default: float32 on CPU, bf16 on a GPU (a frozen base).
    """
    import torch

    from bittune.model import load_model, resolve_dtype
    from bittune.quant.api import bnb_config

    dev = torch.device(device)
    quantization = bnb_config(artifact.training_quant, dev) if artifact.training_quant is not None else None
    return load_model(
        artifact.base,
        task=artifact.task,
        dtype=dtype or resolve_dtype("auto", dev, trainable_base=False),
        label_names=label_names_of(artifact, trust_remote_code=trust_remote_code),
        trust_remote_code=trust_remote_code,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else None,
        quantization=quantization,
        device=dev,
    )


def label_names_of(artifact: Artifact, *, trust_remote_code: bool = False) -> list[str] | None:
    """A classifier's label names: as the run saved them, else from the base's config (None for causal LMs)."""
    if artifact.task != "classification":
        return None
    if artifact.label_names:
        return list(artifact.label_names)
    from transformers import AutoConfig

    from bittune.model import model_source

    # transformers leaves default labels (LABEL_0, ...) out of config.json; AutoConfig restores them.
    cfg = AutoConfig.from_pretrained(model_source(artifact.base), trust_remote_code=trust_remote_code)
    return [cfg.id2label[i] for i in range(cfg.num_labels)]
