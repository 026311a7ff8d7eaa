"""QAT in the training loop: the bit-width of every step, and what happens where a stage ends.

The fake quantization itself is :mod:`bittune.quant.qat`; this is the small piece the recipe calls:

- :meth:`QatHook.before_step` sets the bits from the global step alone, so a resumed run lands in the right stage
  with no extra state;
- :meth:`QatHook.stage_ended` marks the last step of a stage (not the run's last): it gets an eval at the stage's
  own bits and a checkpoint that pruning keeps;
- :meth:`QatHook.finish` moves to the last stage's bits for the final eval, and :meth:`QatHook.detach` removes the
  parametrizations before saving, leaving the latent float weights (and adapter) under their usual names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bittune.training.checkpoint import QatStageRecord

if TYPE_CHECKING:
    from bittune.sidecars import QatSettings


@dataclass
class QatHook:
    """Handle on a QAT run's fake quantization and its stage schedule.

    Attributes:
        fake_quant: :class:`bittune.quant.qat.FakeQuantized` of the model.
        stages: :class:`bittune.quant.qat.BitSchedule` of the run.
        group_size, symmetric, method: the ``qat:`` settings (recorded in ``qat.json``).
    """

    fake_quant: Any
    stages: Any
    group_size: int
    symmetric: bool
    method: str

    @classmethod
    def attach(cls, model: Any, qat_cfg: Any, stages: Any) -> QatHook:
        """Fake-quantize ``model``'s weights at the first stage's bits (after LoRA, so ``W + BA`` is quantized)."""
        from bittune.quant.qat import attach_fake_quant

        fq = attach_fake_quant(
            model, bits=qat_cfg.schedule[0], group_size=qat_cfg.group_size, symmetric=qat_cfg.symmetric
        )
        return cls(fq, stages, qat_cfg.group_size, qat_cfg.symmetric, qat_cfg.method)

    @property
    def bits(self) -> int:
        return self.fake_quant.bits

    def before_step(self, step: int) -> None:
        """Set the bits of the step that follows ``step`` completed steps."""
        self.fake_quant.set_bits(self.stages.bits_at(step))

    def stage_ended(self, step: int, total_steps: int) -> int | None:
        """The stage that completed step ``step`` finishes (not the last one: it ends with the run), or None."""
        return self.stages.ends_stage(step) if step < total_steps else None

    def eval_tags(self, stage: int) -> dict[str, int]:
        """Keys added to an eval record taken at a stage's end."""
        return {"qat_stage": stage, "qat_bits": self.bits}

    def record(self, stage: int, step: int, loss: float | None, metrics: dict[str, float]) -> QatStageRecord:
        """What ``state.json`` and ``summary.json`` keep of a finished stage."""
        return QatStageRecord(stage=stage, bits=self.bits, end_step=step, loss=loss, **metrics)

    def finish(self) -> dict[str, int]:
        """Switch to the last stage's bits for the final eval; returns that eval's tags."""
        self.fake_quant.set_bits(self.stages.bits[-1])
        return self.eval_tags(len(self.stages.bits) - 1)

    def detach(self, model: Any) -> None:
        """Remove the parametrizations: the latent float weights are what is saved (and what ``convert`` rounds)."""
        from bittune.quant.qat import remove_fake_quant

        remove_fake_quant(model)

    def settings(self) -> QatSettings:
        """The ``qat.json`` written beside the final weights: how to quantize them to match the last stage."""
        from bittune.quant.qat import qat_settings

        return qat_settings(
            bits=self.stages.bits[-1],
            group_size=self.group_size,
            symmetric=self.symmetric,
            method=self.method,
            schedule=self.stages,
        )

    def summary(self, records: list[QatStageRecord]) -> dict[str, Any]:
        """The ``qat`` entry of ``summary.json``."""
        return {
            "schedule": list(self.stages.bits),
            "stage_ends": list(self.stages.ends),
            "stages": [r.as_dict() for r in records],
        }

    def note(self) -> str:
        return f"; QAT {self.stages.bits} bits, stages ending at steps {self.stages.ends}"
