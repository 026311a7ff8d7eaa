"""``bittune plan``: estimate a run's peak memory and time per step before training, from config.json alone.

Light to import: torch and transformers are imported by the functions that need them.
"""

from bittune.plan.estimate import estimate
from bittune.plan.report import Component, PlanReport
from bittune.plan.shapes import ModelShape, model_shape

__all__ = ["Component", "ModelShape", "PlanReport", "estimate", "model_shape"]
