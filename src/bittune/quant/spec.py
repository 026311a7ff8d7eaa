"""The one quantization vocabulary: a typed spec per method, used by PTQ, by a QLoRA base and by QAT's grid.

* ``bittune quantize`` / ``merge --into-quantized``: the CLI flags become a spec through :func:`spec_from_cli`;
  the spec models validate them, and errors are named by flag (``--group-size 0: ...``).
* ``quant:`` of a QLoRA config is a :class:`BnbSpec` (``{method: nf4, double_quant: true}``; ``llm-int8`` is the
  8-bit base; ``compute_dtype`` picks the matmul dtype). The old spelling ``{bits: 4, type: nf4}`` is translated.
* ``qat:`` trains on the ``int`` grid: its ``group_size``/``symmetric`` and the last stage's bits make the
  :class:`IntSpec` that ``bittune quantize RUN`` applies (see :class:`bittune.sidecars.QatSettings`); or, with
  ``method: gguf-q4_0|gguf-q8_0``, on llama.cpp's own blocks (:class:`GgmlSpec`), which the GGUF export of that
  type stores exactly and ``bittune quantize`` refuses.

Methods:

* ``fp16`` / ``bf16``: cast every weight (16 bits).
* ``nf4`` / ``fp4``: bitsandbytes 4-bit blocks (blocksize 64), optionally with double quantization.
* ``llm-int8``: bitsandbytes LLM.int8 (row-wise int8 weights, outlier columns in fp16 at run time).
* ``int``: group-wise round-to-nearest integers at 2..8 bits (:mod:`bittune.quant.intq`), symmetric or not.
* ``hqq``: the same integer grid, with each group's zero point fitted by half-quadratic optimisation
  (:mod:`bittune.quant.hqq`); needs no data; beats round-to-nearest on MiniLM's float weights, not on a causal LM.
* ``gptq``: the same integer grid, codes chosen with calibration text so that each layer's outputs change least
  (:mod:`bittune.quant.gptq`); the best at 3 and 2 bits, and needs a few thousand tokens of the user's text.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from bittune.errors import ConfigError

METHODS = ("fp16", "bf16", "nf4", "fp4", "llm-int8", "int", "hqq", "gptq")
GRID_METHODS = ("int", "hqq", "gptq")  # integer codes at 2..8 bits with group scales (QuantizedLinear on disk)
# The method used when only --bits is given (GPTQ is never a silent default: it needs calibration text).
# 3 and 2 bits: int (round-to-nearest), chosen by bench/quant_float_causal.py on a causal LM with genuine float
# weights (a Llama pretrained here): held-out perplexity int <= hqq at 4, 3 and 2 bits, and int quantizes
# 15-50x faster. On the bundled SmolLM2 (weights from a 4-bit GGUF) int also beats hqq at 3 bits;
# hqq wins only on MiniLM, an encoder (BENCHMARKS.md). gptq beats both when calibration text is given.
DEFAULT_METHOD = {16: "fp16", 8: "llm-int8", 4: "nf4", 3: "int", 2: "int"}
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def label(self) -> str:
        """Short name for tables, e.g. ``int4-g64``."""
        raise NotImplementedError


class _FixedBits(_Spec):
    """A method whose bit-width follows from the method; ``bits`` is accepted on input when it agrees."""

    @classmethod
    def _bits_of(cls, method: str) -> int:
        raise NotImplementedError

    @model_validator(mode="before")
    @classmethod
    def _given_bits(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "bits" in raw and "method" in raw:
            raw = dict(raw)
            bits, fixed = raw.pop("bits"), cls._bits_of(raw["method"])
            if bits != fixed:
                raise ValueError(f"stores {fixed} bits, not {bits}")
        return raw


class CastSpec(_FixedBits):
    """Cast all weights to a 16-bit float type."""

    method: Literal["fp16", "bf16"] = "fp16"

    @classmethod
    def _bits_of(cls, method: str) -> int:
        return 16

    @property
    def bits(self) -> int:
        return 16

    def label(self) -> str:
        return self.method


class BnbSpec(_FixedBits):
    """bitsandbytes 4-bit (NF4/FP4) or 8-bit (LLM.int8) linear layers: a PTQ method and the QLoRA base alike."""

    method: Literal["nf4", "fp4", "llm-int8"] = "nf4"
    double_quant: bool = Field(True, description="Quantize the 4-bit block scales too (~0.37 bit/param; 4-bit only).")
    compute_dtype: ComputeDtype = Field(
        "auto", description="auto: float32 on CPU (bf16 is ~50x slower there), bf16 on a GPU that supports it."
    )

    @classmethod
    def _bits_of(cls, method: str) -> int:
        return 8 if method == "llm-int8" else 4

    @model_validator(mode="before")
    @classmethod
    def _old_spelling(cls, raw: Any) -> Any:
        """``{bits: 4|8, type: nf4|fp4, ...}`` (configs and ``bittune_quantization.json`` before the one vocabulary)."""
        if not isinstance(raw, dict) or "method" in raw or not {"bits", "type"} & set(raw):
            return raw
        raw = dict(raw)
        bits = raw.pop("bits", 4)
        if bits == 8:
            # The old files recorded every key, 4-bit defaults included ({bits: 8, type: nf4, double_quant: true}).
            if raw.pop("type", "nf4") != "nf4" or raw.pop("double_quant", True) is not True:
                raise ValueError("quant.type and quant.double_quant apply to 4-bit only; remove them for bits: 8")
            return {"method": "llm-int8", **raw}
        if bits != 4:
            raise ValueError(f"bits {bits!r}: a bitsandbytes base has 4 or 8 bits (write method: nf4, fp4 or llm-int8)")
        return {"method": raw.pop("type", "nf4"), **raw}

    @property
    def bits(self) -> int:
        return self._bits_of(self.method)

    def label(self) -> str:
        if self.method == "llm-int8":
            return "llm-int8"
        return f"{self.method}{'-dq' if self.double_quant else ''}"


class _GroupSpec(_Spec):
    bits: int = Field(4, description="2..8 bits per weight.")
    group_size: int = Field(64, description="Columns per group; -1 = one group per row.")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError("the integer grid (int, hqq, gptq) stores 2..8 bits")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("not a number of columns (a positive group size, or -1 for one group per row)")
        return v


class IntSpec(_GroupSpec):
    """Group-wise round-to-nearest integer quantization (the QAT grid: same codes as training saw)."""

    method: Literal["int"] = "int"
    symmetric: bool = False

    def label(self) -> str:
        return f"int{self.bits}-g{self.group_size}{'-sym' if self.symmetric else ''}"


class HqqSpec(_GroupSpec):
    """Half-quadratic optimisation of each group's zero point (and a searched scale) on the integer grid."""

    method: Literal["hqq"] = "hqq"
    iters: int = Field(20, ge=1, le=200, description="Proximal iterations per layer.")

    def label(self) -> str:
        return f"hqq{self.bits}-g{self.group_size}"


class GptqSpec(_GroupSpec):
    """GPTQ: codes chosen column by column, with calibration inputs, so that each layer's outputs stay close."""

    method: Literal["gptq"] = "gptq"
    symmetric: bool = False
    act_order: bool = Field(True, description="Quantize input columns in decreasing order of their energy.")
    calibration_tokens: int = Field(8192, description="Tokens of calibration text to collect Hessians on (>= 64).")

    @field_validator("calibration_tokens")
    @classmethod
    def _enough(cls, v: int) -> int:
        if v < 64:
            raise ValueError("too few to calibrate on (at least 64)")
        return v

    def label(self) -> str:
        return f"gptq{self.bits}-g{self.group_size}{'-sym' if self.symmetric else ''}"


class GgmlSpec(_Spec):
    """llama.cpp's own Q4_0 / Q8_0 blocks (32 weights, one float16 scale): a QAT grid whose GGUF export is exact.

    Not a PTQ method of ``bittune quantize`` (which stores :data:`GridSpec`): a run trained on it is exported with
    ``bittune export RUN --format gguf --type q4_0`` (:attr:`gguf_type`). ``bits`` is the stage's bit-width: the
    final stage's is the method's own (4 or 8); earlier stages use the same blocks with more levels
    (:mod:`bittune.quant.ggml_grid`).
    """

    method: Literal["gguf-q4_0", "gguf-q8_0"] = "gguf-q4_0"
    bits: int = Field(4, ge=2, le=8)

    @property
    def group_size(self) -> int:
        return 32

    @property
    def gguf_type(self) -> str:
        """The ``--type`` of the export that stores exactly these weights."""
        return self.method.removeprefix("gguf-")

    def label(self) -> str:
        own = 4 if self.method == "gguf-q4_0" else 8
        return self.method if self.bits == own else f"{self.method}-{self.bits}bit"


GGML_METHODS = ("gguf-q4_0", "gguf-q8_0")
GridSpec = IntSpec | HqqSpec | GptqSpec  # stored as QuantizedLinear codes + float16 scales/zeros
QatSpec = IntSpec | GgmlSpec  # the grids qat: trains on
Spec = CastSpec | BnbSpec | GridSpec
QuantSpec = Annotated[Spec, Field(discriminator="method")]
_ADAPTER: TypeAdapter[Spec] = TypeAdapter(QuantSpec)
_MODEL_OF = {"fp16": CastSpec, "bf16": CastSpec, "nf4": BnbSpec, "fp4": BnbSpec, "llm-int8": BnbSpec,
             "int": IntSpec, "hqq": HqqSpec, "gptq": GptqSpec}  # fmt: skip

# The CLI flag of each spec field, and how to fix a bad value of it.
FLAGS = {
    "bits": "--bits",
    "method": "--method",
    "group_size": "--group-size",
    "symmetric": "--symmetric",
    "calibration_tokens": "--calib-tokens",
}
_FLAG_HINTS = {
    "bits": "use {bits} 2, 3, 4 or 8 (or --method fp16 for 16 bits)",
    "group_size": "use a positive group size such as 32, 64 or 128 (or -1 for one group per row)",
    "calibration_tokens": "use 2048 or more (default 8192)",
}


def spec_from_dict(raw: dict) -> Spec:
    """Rebuild a spec from its ``model_dump()`` (as saved in a quantized folder)."""
    return _ADAPTER.validate_python(raw)


def spec_from_cli(
    *,
    bits: int,
    method: str | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
    calibration_tokens: int | None = None,
    bits_flag: str = "--bits",
) -> Spec:
    """The spec for ``bittune quantize --bits B [--method M] [--group-size G] [--symmetric] [--calib-tokens N]``.

    The flags given are validated by the spec models themselves; a problem is reported under its flag
    (``bits_flag``: what the command calls the bits, e.g. merge's ``--into-quantized``).

    Raises:
        ConfigError: an unknown method, bits the method does not store, a flag the method does not take, or a
            bad value.
    """
    if method is None:
        if bits not in DEFAULT_METHOD:
            raise ConfigError(
                f"{bits_flag} {bits} is not supported", hint=f"use one of {', '.join(map(str, DEFAULT_METHOD))}"
            )
        method = DEFAULT_METHOD[bits]
    raw: dict[str, Any] = {"method": method, "bits": bits}
    if group_size is not None:
        raw["group_size"] = group_size
    if symmetric:
        raw["symmetric"] = True
    if calibration_tokens is not None:
        raw["calibration_tokens"] = calibration_tokens
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise _flag_error(exc, raw, {**FLAGS, "bits": bits_flag}) from None


def _flag_error(exc: ValidationError, raw: dict[str, Any], flags: dict[str, str]) -> ConfigError:
    """The first problem of ``exc`` in the words of the command line (``flags``: each field's flag)."""
    err, method = exc.errors()[0], raw["method"]
    if err["type"] == "union_tag_invalid":
        return ConfigError(f"unknown --method '{method}'", hint=f"use one of: {', '.join(METHODS)}")
    field = next((str(p) for p in reversed(err["loc"]) if p in flags), None)
    if err["type"] == "extra_forbidden" and field is not None:
        takes = "|".join(m for m in METHODS if field in _MODEL_OF[m].model_fields)
        hint = f"drop {flags[field]}" + (" (bitsandbytes uses 64)" if field == "group_size" else "")
        if field == "calibration_tokens":
            hint += ", or use --method gptq"
        return ConfigError(f"{flags[field]} applies to --method {takes}, not {method}", hint=hint)
    msg = err["msg"].removeprefix("Value error, ")
    if field is not None:
        hint = _FLAG_HINTS.get(field)
        return ConfigError(f"{flags[field]} {raw[field]}: {msg}", hint=hint and hint.format(bits=flags["bits"]))
    fixed = _MODEL_OF[method]._bits_of(method)  # a fixed-bit method given other bits
    return ConfigError(
        f"--method {method} {msg}",
        hint=f"use {flags['bits']} {fixed} with {method}, or --method int|hqq|gptq for {raw['bits']} bits",
    )


def spec_for_source(
    source: Any,
    *,
    bits: int | None,
    method: str | None,
    group_size: int | None,
    symmetric: bool,
    calibration_tokens: int | None = None,
) -> Spec:
    """:func:`spec_from_cli`, defaulting to a QAT run's own final quantization when nothing is asked for.

    A run trained with ``qat:`` records in ``qat.json`` the bit-width, group size and zero-point mode its last
    stage trained at; quantizing with exactly those settings reproduces the numbers it evaluated, so that is
    what ``bittune quantize RUN_DIR`` does unless ``--bits/--method/--group-size/--symmetric`` say otherwise.

    Args:
        source: The resolved artifact (:func:`bittune.artifacts.resolve`) or its path.
    """
    from bittune.artifacts import as_artifact

    asked = bits is not None or method is not None or group_size is not None or symmetric
    qat = None if asked or calibration_tokens is not None else as_artifact(source).qat
    if qat is not None and isinstance(qat.spec, GgmlSpec):
        source = getattr(source, "path", source)
        raise ConfigError(
            f"{source} was trained on llama.cpp's {qat.spec.gguf_type.upper()} grid, which `bittune quantize` does "
            "not store",
            hint=f"export it to that type: bittune export {source} --format gguf --type {qat.spec.gguf_type} "
            "--out model.gguf",
        )
    if qat is not None:
        return qat.spec
    return spec_from_cli(
        bits=4 if bits is None else bits,
        method=method,
        group_size=group_size,
        symmetric=symmetric,
        calibration_tokens=calibration_tokens,
    )
