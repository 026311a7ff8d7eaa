"""Post-training quantization, fake quantization for QAT, and the quantized-model file format.

``quantize(model, spec)`` is the one entry point (see :mod:`bittune.quant.api`); specs live in
:mod:`bittune.quant.spec`. Imports are lazy so that ``import bittune.quant`` stays light.
"""

from __future__ import annotations

from typing import Any


def quantize(model: Any, spec: Any, *, calibration: Any = None, log: Any = None) -> Any:
    """Quantize ``model`` in place as ``spec`` says (see :func:`bittune.quant.api.quantize`)."""
    from bittune.quant.api import quantize as _quantize

    return _quantize(model, spec, calibration=calibration, log=log)
