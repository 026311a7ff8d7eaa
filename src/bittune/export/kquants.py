"""K-quant and IQ GGUF types, made by llama.cpp's own quantizer.

bittune writes f32/f16/q8_0/q4_0 itself (``gguf_writer``); the types people publish (Q4_K_M, Q5_K_M, Q6_K, Q3_K_M,
Q2_K, the IQ types) are made here by ``llama_model_quantize`` -- the function ``llama-quantize`` runs -- called
in-process through llama-cpp-python's ctypes binding, on an f32 GGUF that bittune's writer produced. Nothing of
llama.cpp's packing or its per-tensor type recipe (which layers of a Q4_K_M get Q6_K, the fallbacks for rows that
are not a multiple of 256) is re-implemented: the file is exactly what ``llama-quantize`` makes from that f32 file.

An importance matrix (:mod:`bittune.export.imatrix`) is handed over the way ``llama-quantize --imatrix`` hands it:
per tensor, the mean squared activation of each input column, as the ``llama_model_imatrix_data`` array of
``llama_model_quantize_params``, with the same ``quantize.imatrix.*`` metadata written into the file.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError
from bittune.storage import atomic_file

# --type -> gguf.LlamaFileType member (the llama_ftype llama.cpp's quantizer takes).
LLAMACPP_TYPES: dict[str, str] = {
    "q2_k": "MOSTLY_Q2_K",
    "q3_k_s": "MOSTLY_Q3_K_S",
    "q3_k_m": "MOSTLY_Q3_K_M",
    "q3_k_l": "MOSTLY_Q3_K_L",
    "q4_k_s": "MOSTLY_Q4_K_S",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K",
    "iq4_nl": "MOSTLY_IQ4_NL",
    "iq4_xs": "MOSTLY_IQ4_XS",
    "iq3_m": "MOSTLY_IQ3_M",
    "iq3_s": "MOSTLY_IQ3_S",
    "iq3_xs": "MOSTLY_IQ3_XS",
    "iq3_xxs": "MOSTLY_IQ3_XXS",
    "iq2_m": "MOSTLY_IQ2_M",
    "iq2_s": "MOSTLY_IQ2_S",
    "iq2_xs": "MOSTLY_IQ2_XS",
    "iq2_xxs": "MOSTLY_IQ2_XXS",
}
# Types llama.cpp refuses (or quantizes to noise) without an importance matrix.
NEEDS_IMATRIX = frozenset({"iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs"})

_LOG_ERROR = 4  # ggml_log_level GGML_LOG_LEVEL_ERROR in the llama.cpp that llama-cpp-python 0.3.36 bundles

Log = Callable[[str], None]


def require_llamacpp(qtype: str) -> Any:
    """Import ``llama_cpp`` for ``--type qtype``, or refuse in one line naming the fix."""
    try:
        import llama_cpp
    except ImportError:
        raise BittuneError(
            f"--type {qtype} is made by llama.cpp's own quantizer (llama-cpp-python), which is not installed",
            hint="run `make llamacpp` (installs the wheel from ../shared/wheels, else builds it, ~15 min); "
            "f32, f16, q8_0 and q4_0 need only the gguf package",
        ) from None
    return llama_cpp


class _LogCapture:
    """Collects llama.cpp's log lines during a call instead of printing them (the quantizer logs every tensor)."""

    def __init__(self, llama_cpp: Any) -> None:
        self.llama_cpp = llama_cpp
        self.lines: list[tuple[int, str]] = []

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, _user: Any) -> None:
            self.lines.append((int(level), text.decode("utf-8", "replace")))

        self._callback = callback  # referenced for as long as llama.cpp may call it

    def __enter__(self) -> _LogCapture:
        # Whatever callback was set before (llama-cpp-python sets its own at import) is put back on exit.
        self._previous = self.llama_cpp.llama_log_callback()
        self._previous_data = ctypes.c_void_p()
        self.llama_cpp.llama_log_get(ctypes.byref(self._previous), ctypes.byref(self._previous_data))
        self.llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc: object) -> None:
        self.llama_cpp.llama_log_set(self._previous, self._previous_data)

    def errors(self) -> str:
        text = "".join(t for level, t in self.lines if level == _LOG_ERROR).strip()
        if text:
            return text
        failed = [t.strip() for _, t in self.lines if "failed" in t or "error" in t.lower()]
        return failed[-1] if failed else "no message from llama.cpp"


def _kv_override(llama_cpp: Any, key: str, value: str | int) -> Any:
    kv = llama_cpp.llama_model_kv_override()
    kv.key = key.encode("utf-8")[:127]
    if isinstance(value, int):
        kv.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
        kv.value.val_i64 = value
    else:
        kv.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        kv.value.val_str = value.encode("utf-8")[:127]
    return kv


def quantize_gguf(
    src: Path,
    out: Path,
    qtype: str,
    *,
    imatrix: dict[str, Any] | None = None,
    imatrix_meta: dict[str, str | int] | None = None,
    nthread: int = 0,
) -> None:
    """Run llama.cpp's quantizer on the f32/f16 GGUF ``src``, writing ``qtype`` to ``out``.

    Args:
        src: A GGUF file llama.cpp can load (bittune's f32 export).
        out: The file to write (the caller renames it into place).
        qtype: A key of :data:`LLAMACPP_TYPES`.
        imatrix: GGUF tensor name -> mean squared activation per input column (float32 array), or None.
        imatrix_meta: ``quantize.imatrix.*`` keys to record in the file (dataset, entries_count, chunks_count).
        nthread: Threads (0: all cores).

    Raises:
        BittuneError: with llama.cpp's own message when it refuses (e.g. a type that needs an imatrix).
    """
    import gguf
    import numpy as np

    llama_cpp = require_llamacpp(qtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, LLAMACPP_TYPES[qtype]))
    params.nthread = nthread or os.cpu_count() or 1
    keep: list[Any] = []  # ctypes buffers that must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode("utf-8")
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # terminator, as llama-quantize writes it
        params.imatrix = entries
        keep.append(entries)
        overrides = [_kv_override(llama_cpp, f"quantize.imatrix.{k}", v) for k, v in (imatrix_meta or {}).items()]
        kvs = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))(*overrides)
        kvs[len(overrides)].key = b""  # terminator: an empty key
        params.kv_overrides = kvs
        keep.append(kvs)
    with _LogCapture(llama_cpp) as logs:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        Path(out).unlink(missing_ok=True)
        raise BittuneError(
            f"llama.cpp could not quantize to {qtype}: {logs.errors()}",
            hint="for IQ2/IQ3 types pass --imatrix auto (or --imatrix FILE); otherwise report this with the "
            "model's config.json",
        )


def write_llamacpp_quantized(
    model: Any,
    tokenizer: Any,
    out: Path,
    *,
    qtype: str,
    name: str | None,
    imatrix: Any = None,
    log: Log = lambda _: None,
) -> dict[str, Any]:
    """Write ``model`` as a ``qtype`` GGUF at ``out``: bittune's f32 file, then llama.cpp's quantizer.

    The f32 file is a temporary beside ``out``; the result is written under a temporary name and renamed into
    place, so a failure or kill never leaves a partial file at ``out``.

    Args:
        imatrix: An :class:`bittune.export.imatrix.Imatrix`, or None.

    Returns:
        What was written: path, bytes, tensor count, count by GGML type (as :func:`write_gguf` reports it).
    """
    import gguf

    from bittune.export.gguf_writer import write_gguf

    out = Path(out)
    f32 = out.with_name(f".{out.name}.f32-{os.getpid()}")
    try:
        with atomic_file(out) as tmp:
            write_gguf(model, tokenizer, f32, qtype="f32", name=name, log=log)
            log(f"quantizing to {qtype} with llama.cpp" + (" and the importance matrix" if imatrix is not None else ""))
            quantize_gguf(
                f32,
                tmp,
                qtype,
                imatrix=imatrix.mean_squares() if imatrix is not None else None,
                imatrix_meta=imatrix.metadata() if imatrix is not None else None,
            )
    finally:
        f32.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    reader = gguf.GGUFReader(out)
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return {"path": str(out), "bytes": out.stat().st_size, "tensors": len(reader.tensors), "types": counts}
