"""What a post-training quantization does: one typed spec per method, and the CLI's (method, bits) -> spec mapping.

Methods:

* ``fp16`` / ``bf16``: cast every weight (16 bits).
* ``nf4`` / ``fp4``: bitsandbytes 4-bit blocks (blocksize 64), optionally with double quantization.
* ``llm-int8``: bitsandbytes LLM.int8 (row-wise int8 weights, outlier columns in fp16 at run time).
* ``int``: group-wise round-to-nearest integers at 2..8 bits (:mod:`bittune.quant.intq`), symmetric or not.
* ``hqq``: the same integer grid, with each group's zero point fitted by half-quadratic optimisation
  (:mod:`bittune.quant.hqq`); needs no data; beats round-to-nearest at 3 and 2 bits on genuine float weights.
* ``gptq``: the same integer grid, codes chosen with calibration text so that each layer's outputs change least
  (:mod:`bittune.quant.gptq`); the best at 3 and 2 bits, and needs a few thousand tokens of the user's text.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from bittune.errors import ConfigError

METHODS = ("fp16", "bf16", "nf4", "fp4", "llm-int8", "int", "hqq", "gptq")
GRID_METHODS = ("int", "hqq", "gptq")  # integer codes at 2..8 bits with group scales (QuantizedLinear on disk)
# The method used when only --bits is given (GPTQ is never a silent default: it needs calibration text).
# 3 and 2 bits: hqq, clearly ahead of round-to-nearest on MiniLM's genuine float32 weights (BENCHMARKS.md; on the
# bundled SmolLM2, whose weights come from a 4-bit GGUF, round-to-nearest beats hqq and gptq beats both).
DEFAULT_METHOD = {16: "fp16", 8: "llm-int8", 4: "nf4", 3: "hqq", 2: "hqq"}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def label(self) -> str:
        """Short name for tables, e.g. ``int4-g64``."""
        raise NotImplementedError


class CastSpec(_Spec):
    """Cast all weights to a 16-bit float type."""

    method: Literal["fp16", "bf16"] = "fp16"

    @property
    def bits(self) -> int:
        return 16

    def label(self) -> str:
        return self.method


class BnbSpec(_Spec):
    """bitsandbytes 4-bit (NF4/FP4) or 8-bit (LLM.int8) linear layers."""

    method: Literal["nf4", "fp4", "llm-int8"] = "nf4"
    double_quant: bool = Field(True, description="Quantize the 4-bit block scales too (4-bit only).")

    @property
    def bits(self) -> int:
        return 8 if self.method == "llm-int8" else 4

    def label(self) -> str:
        if self.method == "llm-int8":
            return "llm-int8"
        return f"{self.method}{'-dq' if self.double_quant else ''}"


class _GroupSpec(_Spec):
    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(64, description="Columns per group; -1 = one group per row.")

    @model_validator(mode="after")
    def _group(self) -> _GroupSpec:
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be a positive number of columns or -1 (per row), got {self.group_size}")
        return self


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
    calibration_tokens: int = Field(8192, ge=64, description="Tokens of calibration text to collect Hessians on.")

    def label(self) -> str:
        return f"gptq{self.bits}-g{self.group_size}{'-sym' if self.symmetric else ''}"


GridSpec = IntSpec | HqqSpec | GptqSpec  # stored as QuantizedLinear codes + float16 scales/zeros
Spec = CastSpec | BnbSpec | GridSpec
QuantSpec = Annotated[Spec, Field(discriminator="method")]
_ADAPTER: TypeAdapter[Spec] = TypeAdapter(QuantSpec)


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
) -> Spec:
    """The spec for ``bittune quantize --bits B [--method M] [--group-size G] [--symmetric]``.

    Raises:
        ConfigError: an unknown method, bits the method does not support, or a bad group size.
    """
    if method is None:
        if bits not in DEFAULT_METHOD:
            raise ConfigError(
                f"--bits {bits} is not supported", hint=f"use one of {', '.join(map(str, DEFAULT_METHOD))}"
            )
        method = DEFAULT_METHOD[bits]
    if method not in METHODS:
        raise ConfigError(f"unknown --method '{method}'", hint=f"use one of: {', '.join(METHODS)}")
    fixed_bits = {"fp16": 16, "bf16": 16, "nf4": 4, "fp4": 4, "llm-int8": 8}
    if method in fixed_bits and bits != fixed_bits[method]:
        raise ConfigError(
            f"--method {method} stores {fixed_bits[method]} bits, not --bits {bits}",
            hint=f"use --bits {fixed_bits[method]} with {method}, or --method int|hqq|gptq for {bits} bits",
        )
    if method in GRID_METHODS and not 2 <= bits <= 8:
        raise ConfigError(
            f"--method {method} supports 2..8 bits, not --bits {bits}",
            hint="use --bits 2, 3, 4 or 8 (or --method fp16 for 16 bits)",
        )
    if group_size is not None and method not in GRID_METHODS:
        raise ConfigError(
            f"--group-size applies to --method int|hqq|gptq, not {method}",
            hint="drop --group-size (bitsandbytes uses 64)",
        )
    if symmetric and method not in ("int", "gptq"):
        raise ConfigError(f"--symmetric applies to --method int|gptq, not {method}", hint="drop --symmetric")
    if calibration_tokens is not None and method != "gptq":
        raise ConfigError(
            f"--calib-tokens applies to --method gptq, not {method}", hint="drop --calib-tokens, or use --method gptq"
        )
    if calibration_tokens is not None and calibration_tokens < 64:
        raise ConfigError(
            f"--calib-tokens {calibration_tokens} is too few to calibrate on", hint="use 2048 or more (default 8192)"
        )
    if group_size is not None and (group_size == 0 or group_size < -1):
        raise ConfigError(
            f"--group-size {group_size} is not a number of columns",
            hint="use a positive group size such as 32, 64 or 128 (or -1 for one group per row)",
        )
    if method in ("fp16", "bf16"):
        return CastSpec(method=method)
    if method in ("nf4", "fp4", "llm-int8"):
        return BnbSpec(method=method)
    g = 64 if group_size is None else group_size
    if method == "int":
        return IntSpec(bits=bits, group_size=g, symmetric=symmetric)
    if method == "gptq":
        extra = {} if calibration_tokens is None else {"calibration_tokens": calibration_tokens}
        return GptqSpec(bits=bits, group_size=g, symmetric=symmetric, **extra)
    return HqqSpec(bits=bits, group_size=g)


def spec_for_source(
    source: str,
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
    """
    from bittune.quant.qat import read_qat_settings

    qat = (
        read_qat_settings(source)
        if bits is None and method is None and group_size is None and not symmetric and calibration_tokens is None
        else None
    )
    if qat is not None and str(qat.get("method", "int")).startswith("gguf-"):
        kind = str(qat["method"])[5:]
        raise ConfigError(
            f"{source} was trained on llama.cpp's {kind.upper()} grid, which `bittune quantize` does not store",
            hint=f"export it to that type: bittune export {source} --format gguf --type {kind} --out model.gguf",
        )
    if qat is not None:
        return IntSpec(bits=qat["bits"], group_size=qat["group_size"], symmetric=qat["symmetric"])
    return spec_from_cli(
        bits=4 if bits is None else bits,
        method=method,
        group_size=group_size,
        symmetric=symmetric,
        calibration_tokens=calibration_tokens,
    )
