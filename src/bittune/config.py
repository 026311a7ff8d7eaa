"""Typed run configuration: YAML in, validated pydantic models out.

Every section is a pydantic model with ``extra="forbid"``, so a misspelled key is an error rather than a silently
ignored setting. :func:`load_config` reports *all* problems at once, each with its dotted path and, when it comes
from the YAML file, the line it is on. ``--set a.b=c`` overrides are parsed as YAML scalars, so they are typed
exactly like the same value written in the file.
"""

from __future__ import annotations

import difflib
import importlib.util
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bittune.errors import ConfigError
from bittune.quant.spec import BnbSpec, GgmlSpec, IntSpec

Task = Literal["causal-lm", "classification"]
Method = Literal["full", "lora", "qlora", "qat"]
ADAPTER_METHODS = ("lora", "qlora")  # the methods that train a LoRA adapter (and read the lora section)
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
DataFormat = Literal["text", "completion", "alpaca", "chat", "classification"]
Strategy = Literal["ddp", "fsdp", "deepspeed"]
TrackerName = Literal["tensorboard", "wandb", "mlflow", "trackio"]
# The import name of each tracker backend, to refuse a missing one at config time rather than mid-run.
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def _expand(path: str | None) -> str | None:
    """``~/x`` -> ``/home/me/x``: YAML has no shell to do it, and users write paths as in their shell."""
    return str(Path(path).expanduser()) if path and path.startswith("~") else path


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which model to start from."""

    path: str = Field(description="Local directory or Hugging Face hub id.")
    task: Task = "causal-lm"
    num_labels: int | None = Field(None, gt=1, description="Classification only; default: from the data.")
    trust_remote_code: bool = False
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype. auto: float32 on CPU, bfloat16 on a GPU that supports it."
    )
    attn_implementation: Literal["sdpa", "eager"] | None = None

    @field_validator("path")
    @classmethod
    def _expand_home(cls, v: str) -> str:
        return _expand(v)


class LoraConfig(_Section):
    """LoRA adapter settings: ``method: lora`` or ``qlora`` only (defaults when the section is left out)."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None


class QatConfig(_Section):
    """Quantization-aware training: weights are fake-quantized in the forward pass, with a bit-width per stage.

    The grid speaks :class:`~bittune.quant.spec.IntSpec`'s words (``method``, ``group_size``, ``symmetric``), or is
    llama.cpp's blocks (:class:`~bittune.quant.spec.GgmlSpec`, ``method: gguf-q4_0|gguf-q8_0``); each
    stage trains at :meth:`spec` of its bits, and the last one is what ``bittune quantize RUN`` applies.
    """

    schedule: list[int] = Field(description="Bits per stage, in order, each 2..8 (e.g. [8, 6, 4]).")
    steps_per_stage: int | None = Field(None, gt=0, description="Optimizer steps of every stage.")
    stage_steps: list[int] | None = Field(
        None, description="Optimizer steps of each stage (instead of steps_per_stage)."
    )
    group_size: int = Field(64, gt=0, description="Weights sharing one scale and zero point (along a row).")
    symmetric: bool = Field(False, description="Fixed zero point; default: per-group min/max zero point.")
    method: Literal["int", "gguf-q4_0", "gguf-q8_0"] = Field(
        "int",
        description="Quantizer: group-wise round-to-nearest integers (int), or llama.cpp's own Q4_0/Q8_0 blocks "
        "(gguf-q4_0, gguf-q8_0: the GGUF export of that type is exactly the trained model).",
    )

    @model_validator(mode="before")
    @classmethod
    def _ggml_blocks(cls, raw: Any) -> Any:
        """llama.cpp's blocks are 32 weights: that is the group size a ``gguf-*`` run records (and reads back)."""
        if isinstance(raw, dict) and str(raw.get("method", "")).startswith("gguf-") and "group_size" not in raw:
            raw = {**raw, "group_size": 32}
        return raw

    @model_validator(mode="after")
    def _stages(self) -> QatConfig:
        problems = []
        if not self.schedule:
            problems.append("qat.schedule is empty: give the bits of each stage, e.g. [8, 6, 4]")
        bad = [b for b in self.schedule if not 2 <= b <= 8]
        if bad:
            problems.append(f"qat.schedule bits must be 2..8, got {bad}")
        if self.steps_per_stage is not None and self.stage_steps is not None:
            problems.append("set qat.steps_per_stage or qat.stage_steps, not both")
        ggml_bits = {"gguf-q4_0": 4, "gguf-q8_0": 8}.get(self.method)
        if ggml_bits is not None and self.schedule and self.schedule[-1] != ggml_bits:
            problems.append(
                f"qat.method {self.method} trains for the {self.method[5:].upper()} export, so the last "
                f"qat.schedule stage must be {ggml_bits} bits (got {self.schedule[-1]})"
            )
        if ggml_bits is not None and self.group_size != 32:
            problems.append(f"qat.group_size: llama.cpp's {self.method[5:].upper()} blocks are 32 weights; drop it")
        if self.stage_steps is not None:
            if len(self.stage_steps) != len(self.schedule):
                problems.append(
                    f"qat.stage_steps has {len(self.stage_steps)} entries but qat.schedule has "
                    f"{len(self.schedule)} stages: give one step count per stage"
                )
            if any(n <= 0 for n in self.stage_steps):
                problems.append("qat.stage_steps must all be > 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def spec(self, bits: int | None = None) -> IntSpec | GgmlSpec:
        """The grid of the stage with ``bits`` (default: the last stage's, what the run converts to): the integer
        grid for ``int``, llama.cpp's 32-weight blocks for ``gguf-q4_0``/``gguf-q8_0``."""
        bits = self.schedule[-1] if bits is None else bits
        if self.method != "int":
            return GgmlSpec(method=self.method, bits=bits)
        return IntSpec(bits=bits, group_size=self.group_size, symmetric=self.symmetric)

    def explicit_steps(self) -> list[int] | None:
        """Steps of each stage when the config fixes them, else None (stages split the run's steps evenly)."""
        if self.stage_steps is not None:
            return list(self.stage_steps)
        if self.steps_per_stage is not None:
            return [self.steps_per_stage] * len(self.schedule)
        return None


class DistillConfig(_Section):
    """Knowledge distillation from a teacher that shares the student's tokenizer."""

    teacher: str = Field(description="Teacher: a model folder, a bittune run directory, or a hub id.")
    temperature: float = Field(2.0, gt=0, description="Softens both distributions; the KL term is scaled by T^2.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs the task loss.")

    @field_validator("teacher")
    @classmethod
    def _expand_home(cls, v: str) -> str:
        return _expand(v)


class DataConfig(_Section):
    """Where the data comes from and how it becomes token rows."""

    train: str = Field(description="File (.jsonl/.json/.csv/.parquet) or hub dataset id.")
    eval: str | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Held out from train when no eval file.")
    format: DataFormat = "chat"
    template: Literal["auto", "chatml", "llama2", "alpaca"] = Field(
        "auto", description="auto: the tokenizer's own chat template."
    )
    system_prompt: str | None = None
    max_length: int = Field(1024, gt=1)
    packing: bool = False
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (default: completions only).")
    columns: dict[str, str] = Field(default_factory=dict, description="Canonical field -> your column name.")
    split: str = "train"
    max_rows: int | None = Field(None, gt=0)

    @field_validator("train", "eval")
    @classmethod
    def _expand_home(cls, v: str | None) -> str | None:
        return _expand(v)


class TrainConfig(_Section):
    """Optimisation and loop settings."""

    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto",
        description="Recompute each decoder layer's activations in backward instead of keeping them: much less "
        "activation memory for ~a third more forward compute. auto: on for a k-bit base (method: qlora), where "
        "memory is why one picks it (as peft's prepare_model_for_kbit_training does), off otherwise.",
    )
    max_tokens_per_pass: PositiveInt | Literal["auto"] | None = Field(
        "auto",
        description="Pool each optimizer step's rows and run them as forward passes of at most this many padded "
        "tokens, rows grouped by length: same gradients; short rows share one wider pass, long rows get passes of "
        "their own (less padding, less activation memory at once). One process only. auto: 640 on CPU, where it "
        "was measured to pay; one pass per micro-batch elsewhere. None: one pass per micro-batch.",
    )
    shared_prefix: Literal["auto"] | bool = Field(
        "auto",
        description="Run a micro-batch's common prompt prefix (system prompt, instruction) once, not once per row: "
        "same loss and gradients; with LoRA dropout the prefix draws one mask for all rows. auto: on CPU (measured "
        "there; a GPU's step is bound by kernel launches, which a second forward adds). Padded causal-LM batches "
        "only: not with packing or distillation.",
    )
    eval_every: int | None = Field(None, gt=0, description="Steps between evals; default: at the end only.")
    save_every: int | None = Field(None, gt=0, description="Steps between checkpoints; default: none.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept on disk (the best one is kept too).")
    log_every: int = Field(1, gt=0)
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="NaN/inf loss or gradient: stop (checkpoints kept), or skip that step's update."
    )
    optimizer: Optimizer = Field(
        "adamw", description="adamw (torch); adamw_8bit, paged_adamw_8bit, paged_adamw_32bit (bitsandbytes)."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on a GPU that supports it; on CPU bf16 only where a start-up matmul measurement "
        "finds it faster than float32 (AMX / AVX512-BF16), else no.",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self


class DistributedConfig(_Section):
    """How several processes (``bittune train --nproc N`` or ``accelerate launch``) share a run."""

    strategy: Strategy = Field(
        "ddp",
        description="ddp: replicate the model, all-reduce gradients; fsdp: FSDP2, shard weights, gradients and "
        "optimizer state; deepspeed: ZeRO through accelerate (CUDA only). One process: plain training.",
    )
    reshard_after_forward: bool = Field(
        True, description="fsdp: free gathered weights after forward (ZeRO-3-like); false keeps them (ZeRO-2-like)."
    )
    zero_stage: Literal[2, 3] = Field(2, description="deepspeed: 2 shards optimizer state + gradients, 3 also weights.")
    offload: bool = Field(False, description="deepspeed: offload optimizer state (stage 3: also weights) to CPU RAM.")

    @model_validator(mode="after")
    def _options_of_the_strategy(self) -> DistributedConfig:
        # Non-default values only: the resolved config (run_config.yaml) lists every key and must load again.
        if self.strategy != "deepspeed" and (self.zero_stage != 2 or self.offload):
            raise ValueError("distributed.zero_stage and distributed.offload apply to strategy: deepspeed only")
        if self.strategy != "fsdp" and not self.reshard_after_forward:
            raise ValueError("distributed.reshard_after_forward applies to strategy: fsdp only")
        return self


class TrackingConfig(_Section):
    """Experiment trackers fed with the same records as ``metrics.jsonl`` (which is always written)."""

    backends: list[TrackerName] = Field(default_factory=list, description="Any of tensorboard, wandb, mlflow, trackio.")
    project: str = Field("bittune", min_length=1, description="Project / experiment name in every backend.")
    run_name: str | None = Field(None, description="Default: the output_dir's folder name.")
    dir: str | None = Field(None, description="Where local tracker files go; default: RUN_DIR/tracking.")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="online needs WANDB_API_KEY.")
    mlflow_tracking_uri: str | None = Field(None, description="Default: a local file store under tracking.dir.")

    @field_validator("backends")
    @classmethod
    def _installed_once(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a backend is listed twice")
        if not _check_environment(info):
            return v
        missing = [b for b in v if importlib.util.find_spec(TRACKER_MODULES[b]) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} not installed: pip install 'bittune[track]'")
        return v

    @field_validator("dir")
    @classmethod
    def _expand_home(cls, v: str | None) -> str | None:
        return _expand(v)


class RunConfig(_Section):
    """A whole run: ``bittune train`` reads one of these from YAML."""

    model: ModelConfig
    method: Method = "lora"
    lora: LoraConfig | None = Field(None, description="LoRA settings; method lora or qlora (default: LoraConfig()).")
    quant: BnbSpec | None = Field(
        None,
        description="Base quantization, only with method: qlora: {method: nf4|fp4|llm-int8, double_quant, "
        "compute_dtype} (the old {bits, type} spelling is translated).",
    )
    qat: QatConfig | None = Field(None, description="Quantization-aware training; method: qat, or lora with it.")
    distill: DistillConfig | None = Field(None, description="Distillation from a teacher; any method.")
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output_dir: str
    # Where the config came from (file and the line of every key), for messages that point into the YAML.
    _source: str | None = PrivateAttr(None)
    _lines: dict[tuple[str, ...], int] = PrivateAttr(default_factory=dict)
    _overridden: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)  # key path -> its --set item

    @field_validator("output_dir")
    @classmethod
    def _expand_home(cls, v: str) -> str:
        return _expand(v)

    @field_validator("lora")
    @classmethod
    def _lora_only_with_an_adapter(cls, v: LoraConfig | None, info: ValidationInfo) -> LoraConfig | None:
        method = info.data.get("method")
        if v is not None and method is not None and method not in ADAPTER_METHODS:
            raise ValueError(
                f"lora is set but method is '{method}', which trains no adapter, so its settings would be ignored: "
                "remove the lora section, or use method: lora"
            )
        return v

    def __eq__(self, other: object) -> bool:
        """Same settings (where each came from does not count)."""
        return type(other) is type(self) and self.__dict__ == other.__dict__

    def locate(self, key: str) -> str | None:
        """``file:line`` of a dotted key (or of its closest parent present) in the YAML this config came from, or
        the ``--set`` that gave it its value."""
        return _where(tuple(key.split(".")), self._source, self._lines, self._overridden)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> RunConfig:
        problems = []
        if (self.model.task == "classification") != (self.data.format == "classification"):
            problems.append(
                f"model.task is '{self.model.task}' but data.format is '{self.data.format}': "
                "use data.format 'classification' exactly when model.task is 'classification'"
            )
        if self.model.num_labels is not None and self.model.task != "classification":
            problems.append("model.num_labels is only for model.task 'classification'")
        if self.data.packing and self.model.task == "classification":
            problems.append("data.packing only applies to causal-lm training")
        if self.method == "qlora" and self.quant is None:
            self.__dict__["quant"] = BnbSpec()  # defaults: 4-bit NF4 with double quant
        if self.train.gradient_checkpointing == "auto":  # resolved here, so every reader sees a bool
            self.train.__dict__["gradient_checkpointing"] = self.method == "qlora"
        if self.method in ADAPTER_METHODS and self.lora is None:
            self.__dict__["lora"] = LoraConfig()
        if self.quant is not None and self.method != "qlora":
            problems.append(
                f"quant is set but method is '{self.method}': a k-bit base can only be trained through an adapter; "
                "use method: qlora (LoRA on the quantized base), or remove quant"
            )
        if self.method == "qat" and self.qat is None:
            problems.append("method: qat needs a qat section, e.g. qat: {schedule: [8, 6, 4], steps_per_stage: 200}")
        if self.qat is not None:
            if self.method == "qlora":
                problems.append(
                    "qat with method: qlora: the qlora base is already stored in bitsandbytes 4/8-bit and cannot be "
                    "fake-quantized; use method: lora (LoRA on a fake-quantized base) or method: qat (all weights)"
                )
            elif self.method == "full":
                problems.append("method: full with a qat section: write method: qat for full fine-tuning with QAT")
            steps = self.qat.explicit_steps()
            if steps is not None and self.train.max_steps is not None and self.train.max_steps < sum(steps):
                problems.append(
                    f"train.max_steps {self.train.max_steps} ends the run before the qat schedule does "
                    f"({sum(steps)} steps): raise max_steps or remove it (it defaults to the schedule's length)"
                )
        needs_bnb = self.method == "qlora" or self.train.optimizer != "adamw"
        if needs_bnb and _check_environment(info) and importlib.util.find_spec("bitsandbytes") is None:
            what = "method: qlora" if self.method == "qlora" else f"train.optimizer: {self.train.optimizer}"
            problems.append(f"{what} needs bitsandbytes, which is not installed: pip install 'bittune[kbit]'")
        if self.distributed.strategy == "deepspeed" and self.method == "qlora":
            problems.append("method: qlora with distributed.strategy deepspeed is not supported; use ddp or fsdp")
        if self.distributed.strategy == "deepspeed" and self.train.optimizer != "adamw":
            problems.append(
                f"train.optimizer {self.train.optimizer} with distributed.strategy deepspeed is not supported; "
                "use adamw (DeepSpeed shards its state)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _check_environment(info: ValidationInfo) -> bool:
    """Whether to check that optional packages are installed (not when reading back a finished run's config)."""
    return not (info.context or {}).get("recorded", False)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE", hint="write e.g. --set train.max_steps=50")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {item!r}: empty key", hint="write e.g. --set train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"--set {item!r}: the value is not valid YAML ({problem})",
            hint="write it as in the config file, e.g. --set 'lora.target_modules=[q_proj, v_proj]'",
        ) from None
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (values parsed as YAML, so typed like the file)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{k}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that remembers the line of every mapping key, for error messages."""


def _key_lines(text: str) -> tuple[dict[tuple[str, ...], int], list[tuple[tuple[str, ...], int, int]]]:
    """The line of every mapping key, and the keys written twice in one mapping: (key, first line, second line)."""
    lines: dict[tuple[str, ...], int] = {}
    twice: list[tuple[tuple[str, ...], int, int]] = []

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                if key in lines:
                    twice.append((key, lines[key], key_node.start_mark.line + 1))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)

    try:
        root = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError:
        return lines, twice
    if root is not None:
        walk(root, ())
    return lines, twice


def _set_of(key: tuple[str, ...], overridden: dict[tuple[str, ...], str]) -> str | None:
    """The ``--set`` item that gave ``key`` (or a section above it) its value, if one did."""
    return next((item for path, item in overridden.items() if key[: len(path)] == path), None)


def _where(
    key: tuple[str, ...], source: str | None, lines: dict[tuple[str, ...], int], overridden: dict[tuple[str, ...], str]
) -> str | None:
    """Where ``key`` got its value: ``--set ITEM``, else ``file:line`` of it (or of its closest parent present)."""
    item = _set_of(key, overridden)
    if item is not None:
        return f"--set {item}"
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            return f"{source}:{lines[key[:n]]}"
    return None


def _format_errors(
    exc: ValidationError,
    source: str,
    lines: dict[tuple[str, ...], int],
    overridden: dict[tuple[str, ...], str] | None = None,
) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        # Union types add the member name to the path; drop those synthetic parts.
        loc = tuple(p for p in loc if not p.startswith(("list[", "literal[", "function-")))
        dotted = ".".join(loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            model = _section_model(loc[:-1])
            known = list(model.model_fields) if model else []
            close = difflib.get_close_matches(loc[-1], known, n=1)
            msg = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
            if known:
                msg += f"; known keys here: {', '.join(known)}"
        elif err["type"] == "missing":
            msg = "required but missing"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        where = _where(loc, source, lines, overridden or {})
        out.append(f"{where}: {dotted}: {msg}" if where else f"{dotted}: {msg}")
    return out


def _section_model(path: tuple[str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in path:
        field = model.model_fields.get(part)
        # An optional section (``LoraConfig | None``) is its model.
        members = () if field is None else (typing.get_args(field.annotation) or (field.annotation,))
        sections = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if not sections:
            return None
        model = sections[0]
    return model


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, recorded: bool = False) -> RunConfig:
    """Read, override and validate a run config.

    Args:
        path: YAML file.
        overrides: ``"dotted.key=value"`` strings; values are parsed as YAML.
        recorded: The config of a run that already happened (``run_config.yaml``, written by :func:`dump_config`; a
            file of that name always counts as one): everything is validated except that optional packages
            (trackers, bitsandbytes) are installed here. Versions before ``lora:`` became optional listed it for
            every method; it is dropped where the method has no adapter, so ``train RUN/run_config.yaml --resume``
            still works.

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem, each with its dotted path (and YAML line where known).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory", hint="pass the path of a YAML run config in it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", hint="pass the path of a YAML run config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})", hint="save the config as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}", hint="fix the YAML syntax on that line") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty", hint="see configs/ for complete examples")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    lines, twice = _key_lines(text)
    if twice:  # YAML keeps the last one silently: the first setting would be ignored without a word
        key, first, second = twice[0]
        raise ConfigError(
            f"{path}:{second}: {'.'.join(key)} is set twice (also on line {first}); only one of them would count",
            hint="keep one of the two lines",
        )
    recorded = recorded or path.name == "run_config.yaml"  # bittune.sidecars.RUN_CONFIG_FILE
    if recorded and raw.get("method") not in ADAPTER_METHODS:
        raw.pop("lora", None)
    return config_from_dict(raw, overrides, source=str(path), lines=lines, recorded=recorded)


def config_from_dict(
    raw: dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    source: str = "<config>",
    lines: dict[tuple[str, ...], int] | None = None,
    recorded: bool = False,
) -> RunConfig:
    """Validate a config given as a nested dict (after applying overrides). See :func:`load_config`."""
    raw = apply_overrides(raw, overrides)
    overridden = {tuple(_parse_override(item)[0]): item for item in overrides}  # problems there: the --set's
    try:
        cfg = RunConfig.model_validate(raw, context={"recorded": recorded})
    except ValidationError as exc:
        problems = _format_errors(exc, source, lines or {}, overridden)
        n = len(problems)
        raise ConfigError(
            f"{source}: {n} problem{'s' if n > 1 else ''} in the config:\n" + "\n".join(f"  - {p}" for p in problems),
            hint="correct the keys listed above (see README 'Config reference')",
        ) from None
    cfg._source, cfg._lines, cfg._overridden = source, dict(lines or {}), overridden
    return cfg


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The validated ``run_config.yaml`` of a run directory (the resolved config the run was trained with).

    Raises:
        ConfigError: when the file is missing or no longer valid (naming the file, line and key).
    """
    from bittune.sidecars import RUN_CONFIG_FILE

    return load_config(Path(run_dir) / RUN_CONFIG_FILE, recorded=True)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
