"""``metrics.jsonl``: one JSON object per line, always on disk, whatever trackers are configured."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from bittune.storage import atomic_write_text


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLog:
    """Append-only JSONL writer, flushed after every record so a killed run keeps what it logged."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def truncate_after(path: Path, step: int) -> int:
    """On resume, drop records an interrupted run logged after the checkpoint it resumes from.

    Returns:
        The highest step of a record with a numeric value before the cut (0 if none): the trackers were sent those
        records (a record without numbers, such as a non-finite stop, never reaches them), so a resumed run does
        not send those steps again.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, highest = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if any(isinstance(v, int | float) for k, v in rec.items() if k != "step"):
            highest = max(highest, rec.get("step", 0))
        if rec.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return highest


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete records of a ``metrics.jsonl``."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
