"""The classification example: SMS spam with all-MiniLM-L6-v2 (``configs/demo_classify.yaml``).

``python -m bittune.demo.classify`` writes the data into the cache and prints the ``bittune train`` command
that points the config at it and at the MiniLM folder inside the installed package.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from bittune.demo.assets import cache_dir, minilm_model_dir
from bittune.demo.trec import DataFiles, build_sms_spam


def prepare_classify(root: Path | None = None, *, out: str = "runs/demo-classify") -> tuple[DataFiles, list[str]]:
    """Build the SMS spam files and return them with the ``--set`` overrides for ``configs/demo_classify.yaml``.

    Args:
        root: Cache root; default :func:`bittune.demo.assets.cache_dir`.
        out: The run's output_dir.

    Returns:
        (the data files, ``["model.path=...", "data.train=...", "data.eval=...", "output_dir=..."]``)
    """
    files = build_sms_spam((root or cache_dir()) / "data" / "sms-spam")
    overrides = [
        f"model.path={minilm_model_dir()}",
        f"data.train={files.train}",
        f"data.eval={files.heldout}",
        f"output_dir={out}",
    ]
    return files, overrides


def main() -> None:
    """Print the command that trains the classification example."""
    files, overrides = prepare_classify()
    print(f"# {files.n_train} training and {files.n_heldout} eval messages in {files.train.parent}")
    print(shlex.join(["bittune", "train", "configs/demo_classify.yaml"] + [a for o in overrides for a in ("--set", o)]))


if __name__ == "__main__":
    main()
