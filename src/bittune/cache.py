"""bittune's cache folder (converted GGUF models and other derived files that are expensive to rebuild)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$BITTUNE_CACHE``, else ``$XDG_CACHE_HOME/bittune``, else ``~/.cache/bittune``."""
    env = os.environ.get("BITTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bittune"
