"""``bittune plan``: estimate a run's peak memory and time per step before training, from config.json and (when
the files are here) the data's own rows; no weights are read.

Light to import: torch and transformers are imported by the functions that need them.
"""

from bittune.plan.estimate import estimate
from bittune.plan.report import Component, PlanReport
from bittune.plan.shapes import ModelShape, model_shape

__all__ = ["Component", "ModelShape", "PlanReport", "estimate", "model_shape"]
