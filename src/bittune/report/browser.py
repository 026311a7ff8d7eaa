"""Render a report page in headless Chromium (Debian's ``chromium``): which sections show, whether every image
decoded, and a screenshot to look at."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--mute-audio")


def find_chromium() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def render_in_chromium(
    page: Path, *, screenshot: Path | None = None, width: int = 1280, height: int = 4000, timeout: float = 120
) -> dict[str, Any]:
    """Load ``page`` in headless Chromium and report what it rendered.

    Returns:
        ``{"sections": [ids of <section> elements in the rendered DOM], "images": <count decoded, 0 if any
        failed>, "screenshot": path or None}``.

    Raises:
        FileNotFoundError: no Chromium on PATH.
    """
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    url = Path(page).resolve().as_uri()
    # --virtual-time-budget lets the page's load handler run before the DOM is dumped.
    dom = subprocess.run(
        [exe, *FLAGS, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout
    if screenshot is not None:
        subprocess.run(
            [exe, *FLAGS, f"--window-size={width},{height}", f"--screenshot={Path(screenshot).resolve()}", url],
            capture_output=True,
            timeout=timeout,
            check=True,
        )
    ok = re.search(r'<body[^>]*data-images-ok="(\d+)"', dom)
    return {
        "sections": re.findall(r'<section id="([^"]+)"', dom),
        "images": int(ok.group(1)) if ok else 0,
        "screenshot": str(screenshot) if screenshot is not None else None,
    }
