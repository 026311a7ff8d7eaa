"""OpenMP thread settings for CPU training, applied before torch starts its thread pool.

PyTorch's CPU kernels run in OpenMP parallel regions, thousands per training step. By default the GNU OpenMP
runtime keeps idle worker threads spinning between regions. On a machine whose cores are shared with other work
(CI, other jobs, several users) a spinning thread holds a core that the thread it waits for needs, and each
region ends only when its slowest thread gets scheduled again: measured on a 2-core Xeon at load average ~14
(bench/results/profile_notes.md), a linear + SiLU loop with 2 threads took 4.5-5.2 s by default and 0.44-1.0 s
with ``OMP_WAIT_POLICY=PASSIVE`` (1 thread: 0.8-1.2 s). Passive waiting lets an idle worker sleep at once.

The runtime reads these variables once, when it is loaded (at ``import torch``), so :func:`configure_omp` must
run first; it never overrides a value the user set. This module imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_omp(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set bittune's OpenMP defaults in ``environ`` (default ``os.environ``) where the user has not set them.

    Returns the variables it set. Call at process start, before ``import torch``: once torch is imported the
    runtime has read its settings and a change has no effect (nothing is set then, and ``{}`` is returned).
    """
    env = os.environ if environ is None else environ
    if environ is None and "torch" in sys.modules:
        return {}
    applied = {k: v for k, v in DEFAULTS.items() if k not in env}
    env.update(applied)
    return applied
