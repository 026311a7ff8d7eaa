"""The demo's progress: numbered phases with their wall and CPU seconds, and detail lines from the library."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Story:
    """Prints ``[n/total] title`` at the start of each phase and its seconds at the end; keeps the timings.

    CPU seconds (all threads of this process) are recorded beside wall seconds: on a machine shared with other
    jobs the wall time grows, the CPU time much less, so the two together say what the phase costs on a quiet box.
    """

    def __init__(self, console: Any, *, total: int, title: str) -> None:
        self.console = console
        self.total = total
        self.done = 0
        self.timings: dict[str, dict[str, float]] = {}
        self.start = time.perf_counter()
        self.load_start = _loadavg()
        from bittune.demo.report import git_commit

        self.commit = git_commit()  # at the start: the code that runs, whatever is committed meanwhile
        console.rule(f"[bold]{title}")

    def say(self, text: str) -> None:
        """A result line inside the current phase."""
        self.console.print(f"  {text}")

    def detail(self, text: str) -> None:
        """A progress line from a library function (its ``log`` callback)."""
        self.console.print(f"  [dim]{text}[/]", highlight=False)

    @contextmanager
    def phase(self, key: str, title: str) -> Iterator[None]:
        """Time one phase; its seconds go into :attr:`timings` under ``key``."""
        self.done += 1
        self.console.print(f"[bold][{self.done}/{self.total}][/] {title}")
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.timings[key] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        self.console.print(
            f"  [green]done[/] in {wall:.0f}s (CPU {cpu:.0f}s); {self.elapsed():.0f}s since the start", highlight=False
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        return None
