"""GPTQ: choose integer codes column by column so that the layer's *output* on real inputs changes least.

Round-to-nearest and HQQ look only at the weights. GPTQ (Frantar et al., 2022) also looks at what the layer is fed:
from a few hundred to a few thousand tokens of calibration text it accumulates ``H = 2/n X^T X`` for every linear
layer (``X``: the layer's inputs), then quantizes one input column at a time and spreads that column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian (an optimal-brain-surgeon update). The result
minimises ``||X W^T - X Q^T||^2`` far better than rounding each weight on its own.

Details that matter at 2-3 bits, all here:

* **sequential layers**: the model is walked one transformer block at a time, and each block's Hessians come from
  the outputs of the blocks *already quantized* before it, so later blocks correct for earlier blocks' errors;
* **act-order**: columns are processed in decreasing order of ``diag(H)`` (most-used input features first, while
  the most unquantized columns remain to absorb their error); because groups are stored contiguously (the format of
  :mod:`bittune.quant.intq`), each group's scale and zero are fixed from the weights before the column loop;
* **damping**: ``1%`` of the mean diagonal is added to ``H`` so its Cholesky factor exists when inputs are collinear.

The codes, scales and zeros are in :mod:`bittune.quant.intq`'s representation, so a GPTQ model is stored, reloaded
and run exactly like a round-to-nearest one (:class:`bittune.quant.linear.QuantizedLinear`).

Written here rather than taken from ``gptqmodel`` / ``llmcompressor``: both target CUDA, pin their own
transformers releases and pull large dependency trees, while the algorithm is ~100 lines of tensor code that runs on
this machine's CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from bittune.quant.intq import dequantize, int_qparams, quantize_codes

DAMP = 0.01
BLOCK = 128  # columns updated together (lazy batch updates: the same result, fewer passes over W)


class HessianCollector:
    """Accumulates ``2/n X^T X`` of a linear layer's inputs over every call (a forward pre-hook)."""

    def __init__(self, in_features: int) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
        if self.n == 0:
            self.h = self.h.to(x.device)  # accumulate where the activations are (the GPU, when there is one)
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h += x.T @ x


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    act_order: bool = True,
    damp: float = DAMP,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes for one ``[out, in]`` weight, given the Hessian of its inputs.

    Args:
        weight: The float weight.
        hessian: ``[in, in]`` ``2/n X^T X`` of the layer's inputs (:class:`HessianCollector`).
        bits: 2..8.
        group_size: Columns per group (``-1``: one group per row).
        symmetric: Fixed zero point, as in :func:`bittune.quant.intq.int_qparams`.
        act_order: Quantize columns in decreasing order of input energy.
        damp: Fraction of the mean diagonal added to ``H``.

    Returns:
        ``(codes, scale, zero)`` in :mod:`bittune.quant.intq`'s grouped layout.
    """
    w = weight.detach().to(torch.float64).clone()
    h = hessian.to(device=w.device, dtype=torch.float64).clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # Scales and zeros per group, fixed up front from the (dead-zeroed) weights: with act-order a group's columns
    # are visited out of order, so its parameters cannot wait for "the first column of the group".
    scale, zero = int_qparams(w.float(), bits, group_size, symmetric)
    g = cols if group_size <= 0 else group_size
    col_scale = scale.squeeze(-1).repeat_interleave(g, dim=1)[:, :cols].to(torch.float64)
    col_zero = zero.squeeze(-1).repeat_interleave(g, dim=1)[:, :cols].to(torch.float64)
    qmax = 2**bits - 1

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    col_scale, col_zero = col_scale[:, perm], col_zero[:, perm]
    h += torch.eye(cols, dtype=torch.float64, device=w.device) * damp * torch.diag(h).mean()
    hinv = inverse_cholesky_upper(h)  # row i holds the update weights for the columns after i

    # Column-major (column i of W is the contiguous row i of wt) and in place: the loop runs one small op at a
    # time, ~10 per column, so its cost is their count and their memory traffic, not arithmetic.
    wt, st, zt = w.T.contiguous(), col_scale.T.contiguous(), col_zero.T.contiguous()
    qt = torch.empty_like(wt)
    with _one_thread(w.device):
        _column_loop(wt, qt, st, zt, hinv, qmax)
    q = qt.T[:, torch.argsort(perm)].float()
    # q lies on each group's grid, so re-deriving the codes from it is exact.
    codes = quantize_codes(q, scale, zero, bits, group_size)
    return codes, scale, zero


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), from one factorisation of ``H``.

    With ``J`` the order-reversing permutation and ``J H J = L L^T``: ``H^-1 = (J L^-T J)(J L^-1 J)``, where
    ``J L^-1 J`` is upper triangular with a positive diagonal, so it is ``U``. One Cholesky and one triangular
    inverse instead of Cholesky, inverse and a second Cholesky: half the arithmetic (~30% less time measured on a
    1536-wide ``down_proj`` Hessian), same factor to ~1e-15.
    """
    lower = torch.linalg.cholesky(h.flip(0, 1))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """CPU: one intra-op thread inside the block. The column loop is ~10 small ops per column; waking a second
    thread for each costs more than it saves (measured: 2x faster on 2 cores, far more on a loaded machine)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _column_loop(
    wt: torch.Tensor, qt: torch.Tensor, st: torch.Tensor, zt: torch.Tensor, hinv: torch.Tensor, qmax: int
) -> None:
    """GPTQ's column loop on ``wt`` (``W`` transposed, in place) into ``qt``: quantize column ``i`` onto its group's
    grid (``st``/``zt``: scale and zero per column), then spread the rounding error over the later columns."""
    cols = wt.shape[0]
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        w1, hinv1 = wt[i1:i2], hinv[i1:i2, i1:i2]  # w1 is a view: updated in place
        err1 = torch.empty_like(w1)
        diag = torch.diagonal(hinv1).tolist()
        for i in range(i2 - i1):
            col, qc, e, s = w1[i], qt[i1 + i], err1[i], st[i1 + i]
            torch.div(col, s, out=qc)
            z = zt[i1 + i]
            qc.add_(z).round_().clamp_(0, qmax).sub_(z).mul_(s)  # on the group's grid
            torch.sub(col, qc, out=e).div_(diag[i])  # the rounding error, weighted by the inverse Hessian
            if i + 1 < i2 - i1:  # spread it over the block's columns not yet quantized
                w1[i + 1 :].addr_(hinv1[i, i + 1 :], e, alpha=-1)
        if i2 < cols:  # and over every column after the block (lazy batch update)
            wt[i2:].sub_(hinv[i1:i2, i2:].T @ err1)


def _block_stack(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's list of transformer blocks (the longest ``ModuleList`` holding quantizable linears)."""
    best = None
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        longer = best is None or len(module) > len(best)
        if longer and any(isinstance(m, torch.nn.Linear) for m in module[0].modules()):
            best = module
    return best


def shared_inputs(names: list[str], collectors: dict[str, HessianCollector]) -> list[list[str]]:
    """``names`` grouped by equal Hessians (layers fed the same input tensor), in first-seen order."""
    groups: list[list[str]] = []
    for name in names:
        group = next((g for g in groups if torch.equal(collectors[g[0]].h, collectors[name].h)), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    return groups


class _StopForward(Exception):
    pass


def gptq_quantize_model(
    model: torch.nn.Module,
    linears: list[tuple[str, torch.nn.Linear]],
    calibration: Iterable[dict[str, torch.Tensor]],
    *,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    act_order: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GPTQ codes for every layer in ``linears``, walking the model's blocks in order.

    The model's weights are replaced by their quantized values as it goes (so each block sees the quantized
    blocks before it); the caller swaps in :class:`~bittune.quant.linear.QuantizedLinear` layers from the returned
    ``{name: (codes, scale, zero)}``. Linears outside the block stack are done last, from one full forward pass.

    Args:
        model: A float model in eval mode.
        linears: ``(name, module)`` pairs to quantize (:func:`bittune.quant.select.quantizable_linears`).
        calibration: Model input batches (``input_ids``, ``attention_mask``, ...).
        bits: 2..8.
        group_size: Columns per group.
        symmetric: Fixed zero point.
        act_order: See :func:`gptq_quantize_weight`.
        log: Progress messages.
    """
    batches = list(calibration)
    wanted = dict(linears)
    results: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def solve(names: list[str], collectors: dict[str, HessianCollector]) -> None:
        for group in shared_inputs(names, collectors):
            lins = [wanted[n] for n in group]
            # Rows are independent given H: one pass over the stacked rows of layers fed the same input (q/k/v,
            # gate/up) gives each the codes of its own pass, in one column loop instead of several.
            weight = torch.cat([lin.weight.detach() for lin in lins]) if len(lins) > 1 else lins[0].weight
            codes, scale, zero = gptq_quantize_weight(
                weight, collectors[group[0]].h, bits=bits, group_size=group_size, symmetric=symmetric,
                act_order=act_order,
            )  # fmt: skip
            start = 0
            for name, lin in zip(group, lins, strict=True):
                rows = slice(start, start + lin.out_features)
                start = rows.stop
                part = (codes[rows].clone(), scale[rows].clone(), zero[rows].clone())
                results[name] = part
                lin.weight.data.copy_(dequantize(*part, lin.weight.shape).to(lin.weight.dtype))

    def collect(names: list[str]) -> tuple[dict[str, HessianCollector], list[Any]]:
        collectors = {n: HessianCollector(wanted[n].in_features) for n in names}
        hooks = [wanted[n].register_forward_pre_hook(collectors[n]) for n in names]
        return collectors, hooks

    blocks = _block_stack(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    with torch.no_grad():
        if blocks is not None:
            # Inputs to the first block, with whatever keyword arguments (mask, rotary embeddings) the model passes.
            captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

            def grab(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                captured.append((args, kwargs))
                raise _StopForward

            hook = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                for batch in batches:
                    with contextlib.suppress(_StopForward):
                        model(**batch, use_cache=False)
            finally:
                hook.remove()
            for index, block in enumerate(blocks):
                block_name = prefix[id(block)]
                names = [n for n in wanted if n.startswith(block_name + ".")]
                collectors, hooks = collect(names)
                try:
                    for args, kwargs in captured:
                        block(*args, **kwargs)
                finally:
                    for h in hooks:
                        h.remove()
                solve(names, collectors)
                # The next block's inputs: this block's outputs with its weights quantized.
                for k, (args, kwargs) in enumerate(captured):
                    out = block(*args, **kwargs)
                    hidden = out[0] if isinstance(out, tuple) else out
                    if args:
                        captured[k] = ((hidden, *args[1:]), kwargs)
                    else:  # a model that passes hidden_states by keyword
                        captured[k] = (args, {**kwargs, "hidden_states": hidden})
                if log:
                    log(f"gptq: block {index + 1}/{len(blocks)} ({len(names)} layers)")
        rest = [n for n in wanted if n not in results]
        if rest:
            collectors, hooks = collect(rest)
            try:
                for batch in batches:
                    model(**batch)
            finally:
                for h in hooks:
                    h.remove()
            solve(rest, collectors)
    return results


def layer_output_error(weight: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace((W - Q) H (W - Q)^T)``: the mean squared change of the layer's outputs on the calibration inputs."""
    d = weight.double() - deq.double()
    return float(torch.einsum("oi,ij,oj->", d, hessian.double(), d))
