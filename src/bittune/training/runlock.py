"""One job per run directory: a lock file with the holder's pid, and stale locks detected."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from bittune.errors import BittuneError

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``RUN_DIR/.lock``, created atomically (O_EXCL) with ``{"pid", "host", "started"}``.

    A lock whose process is gone (same host, pid not alive), or that this very process left behind after an
    exception, is stale and taken over. A lock from another host cannot be checked and is respected.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder and self._is_live(holder):
                    raise self._in_use(holder) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise BittuneError(f"could not take the lock {self.path}", hint="delete it if no bittune job uses it")

    def check(self) -> None:
        """Raise if a live job holds the lock; takes nothing (used before any work starts)."""
        holder = self._read() if self.path.exists() else None
        if holder and self._is_live(holder):
            raise self._in_use(holder)

    def _in_use(self, holder: dict) -> BittuneError:
        return BittuneError(
            f"output_dir {self.path.parent} is in use by another bittune job "
            f"(pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')})",
            hint=f"wait for that job to finish or choose another output_dir; if no such job runs, delete {self.path}",
        )

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable: a half-written lock from a killed job

    @staticmethod
    def _is_live(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True
        pid = holder.get("pid")
        return isinstance(pid, int) and pid != os.getpid() and _alive(pid)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
