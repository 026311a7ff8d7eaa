"""Half-quadratic quantization (HQQ): fit each group's zero point to minimise a sparsity-promoting error.

Round-to-nearest picks scale and zero from a group's min/max, which lets one outlier stretch the grid for every
other weight. HQQ (Badri & Shaji, 2023) instead minimises ``||W - dequant(quant(W))||_p^p`` with ``p < 1``, a norm
that tolerates a few large errors (outliers) in exchange for small errors everywhere else. Half-quadratic
splitting introduces the error ``E`` as a separate variable and alternates two closed-form steps:

1. ``E <- shrink_p(W - Wr)``: generalised soft-thresholding keeps only the large (outlier) residuals;
2. ``zero <- mean_group(Q - (W - E) / scale)``: the zero point that best explains the rest, given the codes ``Q``;

with the penalty ``beta`` growing each step. No calibration data is needed. On top of the original zero-only
fit, the scale comes from a short grid over shrunken min/max ranges (per group, the one whose grid has the lowest
squared error); at 2-3 bits clipping the range is where much of the gain is.

The result is in :mod:`bittune.quant.intq`'s representation (``codes``, float16-exact ``scale`` and ``zero``), so
it is stored, reloaded and dequantized exactly like round-to-nearest.

Written here because the PyPI ``hqq`` package ships only as a source build that compiles CUDA extensions on
install; the optimisation itself is a few lines of tensor code.
"""

from __future__ import annotations

import torch

from bittune.quant.intq import grouped, quantize_codes, round_storage

_TINY = 1e-8
# Candidate ranges, as fractions of the group's full min..max span, tried when fitting the scale.
SHRINK_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
_ROWS_PER_CHUNK = 256  # bounds the temporary memory of one layer's optimisation


def _fit_zero(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, iters: int, p: float, beta: float, kappa: float
) -> torch.Tensor:
    """Half-quadratic iterations on the zero point of grouped ``w`` (``[rows, groups, g]``) for a fixed scale.

    Keeps, per group, the zero point with the lowest mean absolute error seen; stops once the layer's total error
    stops falling. Written with in-place ops: this loop is most of the time a quantization takes.
    """
    w_mean = w.mean(dim=-1, keepdim=True)
    best_zero = zero
    best_err = torch.full_like(zero, float("inf"))
    best_total = float("inf")
    for _ in range(iters):
        q = torch.div(w, scale).add_(zero).round_().clamp_(0, qmax)
        q_mean = q.mean(dim=-1, keepdim=True)
        residual = q.sub_(zero).mul_(scale).neg_().add_(w)  # w - dequantized; reuses q's memory
        magnitude = residual.abs()
        err = magnitude.mean(dim=-1, keepdim=True)
        total = float(err.sum())
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_zero = torch.where(better, zero, best_zero)
        if total >= best_total:
            break
        best_total = total
        # e = shrink_p(residual): sign(r) * max(|r| - |r|^(p-1) / beta, 0), the outliers the fit may ignore.
        shrunk = magnitude.clamp(min=_TINY).pow_(p - 1).div_(-beta).add_(magnitude).clamp_(min=0)
        e_mean = shrunk.mul_(residual.sign_()).mean(dim=-1, keepdim=True)
        # zero = mean(q - (w - e) / scale), with q, w, e reduced to their group means.
        zero = q_mean - (w_mean - e_mean) / scale
        beta *= kappa
    return best_zero


def hqq_qparams(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    shrink_grid: tuple[float, ...] = SHRINK_GRID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimised per-group ``(scale, zero)`` for ``weight`` (``[out, in]``), float16-representable float32 tensors.

    Args:
        weight: The weight matrix.
        bits: Bit-width (2..8).
        group_size: Columns per group (``<= 0``: one group per row).
        iters: Half-quadratic iterations per scale candidate.
        p: The ``l_p`` norm of the error (``p < 1`` promotes sparse, outlier-only errors).
        beta: Initial penalty; ``kappa``: its growth per iteration.
        shrink_grid: Fractions of each group's min..max range tried as the quantization range.

    Returns:
        ``(scale, zero)``, each ``[out, n_groups, 1]``; codes follow from :func:`bittune.quant.intq.quantize_codes`.
    """
    qmax = 2**bits - 1
    groups = grouped(weight, group_size)
    scales, zeros = [], []
    for w in groups.split(_ROWS_PER_CHUNK):
        lo = w.amin(dim=-1, keepdim=True)
        hi = w.amax(dim=-1, keepdim=True)
        mid = (hi + lo) / 2
        # 1. The range: per group, the shrink of min..max whose round-to-nearest grid has the lowest squared error
        #    (what the layer's output error scales with). One cheap pass per candidate.
        best_err = best_scale = best_zero = None
        for shrink in shrink_grid:
            half = (hi - lo) / 2 * shrink
            scale = round_storage((2 * half / qmax).clamp(min=torch.finfo(torch.float16).tiny))
            zero = -(mid - half) / scale
            q = torch.clamp(torch.round(w / scale + zero), 0, qmax)
            err = ((q - zero) * scale - w).pow(2).mean(dim=-1, keepdim=True)
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
        # 2. The zero point: half-quadratic iterations for that scale.
        scales.append(best_scale)
        zeros.append(round_storage(_fit_zero(w, best_scale, best_zero, qmax, iters, p, beta, kappa)))
    return torch.cat(scales), torch.cat(zeros)


def quantize_hqq(
    weight: torch.Tensor, bits: int, group_size: int = 64, *, iters: int = 20
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ-optimised ``(codes, scale, zero)`` in :mod:`bittune.quant.intq`'s representation."""
    scale, zero = hqq_qparams(weight, bits, group_size, iters=iters)
    return quantize_codes(weight, scale, zero, bits, group_size), scale, zero
