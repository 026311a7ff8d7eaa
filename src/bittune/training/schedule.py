"""How many optimizer steps a run takes, which rows each one sees, and (QAT) at which bit-width it trains."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bittune.errors import ConfigError

if TYPE_CHECKING:
    from bittune.config import RunConfig


@dataclass(frozen=True)
class StepPlan:
    """The run's length, fixed before the first step.

    Attributes:
        global_batch: Rows per micro-batch over all processes (``train.batch_size x processes``).
        steps_per_epoch: Optimizer steps (groups of ``grad_accum`` micro-batches) in one pass over the data.
        total_steps: ``train.max_steps``, else the QAT stages' steps, else ``epochs x steps_per_epoch``.
        stages: QAT only: the bit-width of each step (a :class:`bittune.quant.qat.BitSchedule`).
    """

    global_batch: int
    steps_per_epoch: int
    total_steps: int
    stages: Any = None


def step_plan(cfg: RunConfig, n_rows: int, world: int) -> StepPlan:
    """The :class:`StepPlan` of ``cfg`` on ``n_rows`` training rows and ``world`` processes.

    Raises:
        ConfigError: when the QAT stages do not fit the run's steps.
    """
    t = cfg.train
    global_batch = t.batch_size * world
    steps_per_epoch = math.ceil(math.ceil(n_rows / global_batch) / t.grad_accum)
    stage_steps = cfg.qat.explicit_steps() if cfg.qat is not None else None
    total = t.max_steps or (sum(stage_steps) if stage_steps else t.epochs * steps_per_epoch)
    stages = None
    if cfg.qat is not None:
        from bittune.quant.qat import BitSchedule

        try:
            stages = BitSchedule.build(cfg.qat.schedule, stage_steps, total)
        except ValueError as exc:
            raise ConfigError(f"qat.schedule: {exc}", hint="use fewer stages or more steps") from None
    return StepPlan(global_batch, steps_per_epoch, total, stages)


def epoch_batches(
    n_rows: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """Row indices of this process's share of each micro-batch in ``epoch``.

    The order is a fresh permutation per epoch derived from (seed, epoch) alone, which lets a resumed run rebuild
    the exact remaining batches from the position stored in the checkpoint. It is cut into global micro-batches
    of ``batch_size * world`` rows, and each process takes its own contiguous part (possibly empty in a short
    last batch), so no row is seen twice and none is skipped.
    """
    import torch

    from bittune.training.distributed import shard_of_batch

    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    step = batch_size * world
    return [shard_of_batch(order[i : i + step], rank, world) for i in range(0, n_rows, step)]


def epoch_steps(
    n_rows: int, batch_size: int, grad_accum: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[list[int]]]:
    """The optimizer steps of ``epoch``: each a list of ``grad_accum`` micro-batches (row indices; the last step
    of an epoch may have fewer)."""
    micro = epoch_batches(n_rows, batch_size, seed, epoch, rank, world)
    return [micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum)]
