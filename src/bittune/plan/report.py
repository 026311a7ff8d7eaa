"""The result of ``bittune plan``: memory components, peak, fit, and time per step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MB = 2**20


@dataclass
class Component:
    """One line of the memory estimate.

    Attributes:
        name: What it is (``weights``, ``optimizer state``, ...).
        mb: Its size in MiB at the peak.
        note: How it was computed, in a few words.
        in_backward: Alive at the start of backward (activations and logits at their largest).
        in_step: Alive during the optimizer step (all gradients, the update's temporaries).
    """

    name: str
    mb: float
    note: str = ""
    in_backward: bool = True
    in_step: bool = True


@dataclass
class PlanReport:
    """Estimated memory and speed of a run, before it starts.

    Attributes:
        model: ``model.path``.
        method: ``full``, ``lora`` or ``qlora``.
        device: ``cpu`` or ``cuda``.
        device_name: What the device is.
        shape_source: ``config`` (counted by formula) or ``meta`` (counted on a meta-device model; rougher
            activation estimate).
        batch_size, seq_len, grad_accum: Micro-batch rows, tokens per row (``data.max_length``: the worst case),
            micro-batches per optimizer step.
        total_parameters, trainable_parameters: Logical parameter counts (a 4-bit weight counts as one).
        weights_mb_by_dtype: What the weights occupy, with the keys of ``summary.json``'s ``weights_mb_by_dtype``.
        components: The memory estimate, line by line.
        phase_peaks_mb: Sum of the components alive at each of the two candidate peaks.
        peak_mb: The estimated peak, comparable with ``summary.json``: ``peak_rss_mb`` on CPU,
            ``peak_cuda_allocated_mb`` on a GPU.
        need_mb: What must be free for the run: on a GPU the peak plus the CUDA context and allocator slack;
            on CPU the peak less page-cache pages the kernel can drop.
        available_mb, total_mb: Free and total memory of the device (None when it cannot be queried here).
        fits: ``need_mb <= available_mb`` (None when unknown).
        flops_per_step: Matmul FLOPs of one optimizer step.
        matmul_flops: The matmul rate used (FLOP/s), measured on this device unless given.
        seconds_per_step: Estimated wall time of one optimizer step.
        time_breakdown: Seconds per step by part (matmul, memory-bound ops, k-bit dequantization, optimizer).
        notes: Caveats worth reading.
        workload: What the data's own rows compute per step (:class:`bittune.plan.workload.Workload` as a dict);
            None when the plan was made without reading the data (every row at ``seq_len``).
    """

    model: str
    method: str
    device: str
    device_name: str
    shape_source: str
    batch_size: int
    seq_len: int
    grad_accum: int
    total_parameters: int
    trainable_parameters: int
    weights_mb_by_dtype: dict[str, float]
    components: list[Component]
    phase_peaks_mb: dict[str, float]
    peak_mb: float
    need_mb: float
    available_mb: float | None
    total_mb: float | None
    fits: bool | None
    flops_per_step: float
    matmul_flops: float | None
    seconds_per_step: float | None
    time_breakdown: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    workload: dict[str, float] | None = None

    @property
    def tokens_per_step(self) -> int:
        """Real (non-padding) tokens per step: the data's mean when it was read, else every row full."""
        if self.workload is not None:
            return round(self.workload["real_tokens"])
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens_per_step / self.seconds_per_step if self.seconds_per_step else None

    def component(self, name: str) -> float:
        """MiB of the component called ``name`` (0 when absent)."""
        return sum(c.mb for c in self.components if c.name == name)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (``bittune plan --json``)."""
        out = asdict(self)
        out["tokens_per_step"] = self.tokens_per_step
        out["tokens_per_s"] = self.tokens_per_s
        return out

    def table(self) -> str:
        """A plain-text report: the memory components, the verdict, and the time estimate."""
        peak_label = "peak RSS" if self.device == "cpu" else "peak CUDA allocated"
        lines = [
            f"plan: {self.method} on {self.device} ({self.device_name}); model {self.model}",
            f"  {self.total_parameters:,} parameters, {self.trainable_parameters:,} trainable; "
            f"micro-batch {self.batch_size} x {self.seq_len} tokens, grad_accum {self.grad_accum}",
            "",
        ]
        width = max(len(c.name) for c in self.components) + 2
        lines.append(f"  {'memory':<{width}}{'MiB':>10}  {'alive':<9} how")
        for c in self.components:
            alive = "both" if c.in_backward and c.in_step else "backward" if c.in_backward else "step"
            lines.append(f"  {c.name:<{width}}{c.mb:>10,.1f}  {alive:<9} {c.note}")
        phases = ", ".join(f"{k} {v:,.0f}" for k, v in self.phase_peaks_mb.items())
        lines.append(f"  {'= ' + peak_label:<{width}}{self.peak_mb:>10,.1f}  (the larger of: {phases})")
        if self.need_mb != self.peak_mb:
            lines.append(f"  {'needs free':<{width}}{self.need_mb:>10,.1f}")
        weights = ", ".join(f"{k} {v:,.1f}" for k, v in self.weights_mb_by_dtype.items())
        lines.append(f"  weights by dtype (MiB): {weights}")
        if self.workload is not None:
            w = self.workload
            how = "padding included" if w["computed_tokens"] > w["real_tokens"] else "prompt prefixes shared"
            lines.append(
                f"  data: {w['real_tokens']:,.0f} real tokens per step on average ({w['steps']:,.0f} steps of its "
                f"first epoch); its passes compute {w['computed_tokens']:,.0f} ({how}) of the "
                f"{self.batch_size * self.seq_len * self.grad_accum:,} at max_length; largest pass "
                f"{w['max_pass_tokens']:,.0f} tokens"
            )
        lines.append("")
        if self.fits is None:
            lines.append("  fits: unknown (the device's free memory cannot be read here)")
        else:
            verdict = "yes" if self.fits else "NO"
            lines.append(
                f"  fits: {verdict} ({self.need_mb:,.0f} MiB needed, {self.available_mb:,.0f} MiB available "
                f"of {self.total_mb:,.0f})"
            )
        if self.seconds_per_step is None:
            lines.append(f"  time: {self.flops_per_step / 1e12:.2f} TFLOP per step; no matmul rate for this device")
        else:
            parts = ", ".join(f"{k} {v:.3g}" for k, v in self.time_breakdown.items() if v > 0)
            rate = self.matmul_flops
            rate_text = f"{rate / 1e12:,.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:,.0f} GFLOP/s"
            lines.append(
                f"  time: {self.seconds_per_step:.3g} s per optimizer step (~{self.tokens_per_s:,.0f} tokens/s); "
                f"{self.flops_per_step / 1e12:.2f} TFLOP, matmul probe {rate_text}; seconds: {parts}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
