"""The small files bittune writes beside weights and reads back, each through one pydantic model.

=============================  ============================================  ==========================================
file                           written into                                  model
=============================  ============================================  ==========================================
``bittune_quantization.json``  a QLoRA run's ``adapter/``                    :class:`~bittune.quant.spec.BnbSpec`: how
                                                                             the base was quantized in training
``qat.json``                   a QAT run's ``model/`` or ``adapter/``        :class:`QatSettings`: the grid and the
                                                                             schedule it was trained down
``bittune_quantized.json``     a ``bittune quantize`` / ``merge`` folder     :class:`QuantizedManifest`
``run_config.yaml``            a run directory                               :class:`bittune.config.RunConfig`
                                                                             (:func:`bittune.config.read_run_config`)
=============================  ============================================  ==========================================

Every model forbids unknown keys, so a damaged or foreign file is reported (naming the file) instead of being
half-understood. Older files keep loading: ``bittune_quantization.json`` written as ``{bits, type, ...}`` is
translated by :class:`~bittune.quant.spec.BnbSpec`. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bittune.errors import ModelLoadError
from bittune.quant.spec import BnbSpec, IntSpec, QuantSpec

TRAINING_QUANT_FILE = "bittune_quantization.json"
QAT_SETTINGS_FILE = "qat.json"
QUANTIZED_MANIFEST_FILE = "bittune_quantized.json"
RUN_CONFIG_FILE = "run_config.yaml"
LABELS_FILE = "labels.json"
# The layout of a quantized folder (QuantizedManifest.format_version) this bittune reads and writes.
QUANTIZED_FORMAT_VERSION = 1

M = TypeVar("M", bound=BaseModel)


class QatSettings(BaseModel):
    """``qat.json``: the quantization a QAT run was trained to, and the schedule that led there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(ge=2, le=8, description="Bits of the last stage: what to quantize to.")
    group_size: int
    symmetric: bool = False
    method: Literal["int"] = "int"
    schedule: list[int] = Field(default_factory=list, description="Bits of every stage, in order.")
    stage_ends: list[int] = Field(default_factory=list, description="The global step each stage ended at.")

    @property
    def spec(self) -> IntSpec:
        """The post-training spec that reproduces what the last stage trained and evaluated."""
        return IntSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)


class QuantizedManifest(BaseModel):
    """``bittune_quantized.json``: what a quantized folder holds (its weights need it to be read back)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int
    spec: QuantSpec
    task: Literal["causal-lm", "classification"] = "causal-lm"
    layers: list[str] = Field(default_factory=list, description="Modules stored quantized.")
    source: str | None = Field(None, description="What was quantized (path as given).")


def _read(path: Path, model: type[M], fix: str) -> M:
    try:
        return model.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:  # ValidationError is a ValueError
        what = _first_problem(exc) if isinstance(exc, ValidationError) else f"{type(exc).__name__}: {exc}"
        raise ModelLoadError(f"{path} is unreadable ({what})", hint=fix) from None


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


def _write(path: Path, value: BaseModel) -> None:
    path.write_text(json.dumps(value.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")


def read_training_quant(folder: str | Path) -> BnbSpec | None:
    """How the base of the adapter in ``folder`` was quantized in training, or None (not a QLoRA adapter)."""
    path = Path(folder) / TRAINING_QUANT_FILE
    if not path.is_file():
        return None
    return _read(path, BnbSpec, "restore the file from the run, or delete it if the base was not quantized")


def write_training_quant(folder: str | Path, spec: BnbSpec) -> None:
    """Record beside a QLoRA adapter how its base was quantized (PEFT's own files do not say)."""
    _write(Path(folder) / TRAINING_QUANT_FILE, spec)


def read_qat_settings(folder: str | Path) -> QatSettings | None:
    """The ``qat.json`` in ``folder``, or None when it was not QAT-trained."""
    path = Path(folder) / QAT_SETTINGS_FILE
    if not path.is_file():
        return None
    return _read(path, QatSettings, "restore the file from the run (or quantize with explicit --bits/--method)")


def write_qat_settings(folder: str | Path, settings: QatSettings) -> None:
    """Write ``qat.json`` into ``folder``."""
    _write(Path(folder) / QAT_SETTINGS_FILE, settings)


def read_manifest(folder: str | Path) -> QuantizedManifest:
    """The ``bittune_quantized.json`` of a quantized folder.

    Raises:
        ModelLoadError: when it is missing, unreadable, or of another format version.
    """
    path = Path(folder) / QUANTIZED_MANIFEST_FILE
    manifest = _read(path, QuantizedManifest, "quantize the model again into a new folder")
    if manifest.format_version != QUANTIZED_FORMAT_VERSION:
        raise ModelLoadError(
            f"{path} has format version {manifest.format_version}, this bittune reads {QUANTIZED_FORMAT_VERSION}",
            hint="quantize the model again with this version of bittune",
        )
    return manifest


def write_manifest(folder: str | Path, manifest: QuantizedManifest) -> None:
    """Write ``bittune_quantized.json`` into a quantized folder."""
    _write(Path(folder) / QUANTIZED_MANIFEST_FILE, manifest)


def read_labels(folder: str | Path) -> list[str] | None:
    """The classifier label names a run saved in ``folder`` (``labels.json``), or None."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is unreadable ({exc})", hint="restore the file from the run") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelLoadError(f"{path} is not a list of label names", hint="restore the file from the run")
    return names


def write_labels(folder: str | Path, names: list[str]) -> None:
    """Write ``labels.json`` (classifier label names, in id order) into ``folder``."""
    (Path(folder) / LABELS_FILE).write_text(json.dumps(list(names)), encoding="utf-8")
