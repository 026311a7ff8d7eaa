"""``bittune validate``: check a config, its model and its data without training."""

from __future__ import annotations

from typing import Any

from bittune.config import RunConfig


def validate_run(cfg: RunConfig) -> dict[str, Any]:
    """Run every preflight check training would run, and report what training would see.

    Returns:
        ``stats`` (rows, tokens, truncation per split), ``label_names`` and ``warnings``.

    Raises:
        BittuneError: listing every problem found in the model path, the data, the output_dir and the rest (config
            problems were already reported, all together, when ``cfg`` was loaded).
    """
    from bittune.preflight import preflight

    checked = preflight(cfg, resume=None)
    checked.raise_problems()
    data = checked.data
    return {
        "stats": {k: vars(v) for k, v in data.stats.items()},
        "label_names": data.label_names,
        "warnings": checked.warnings,
    }
