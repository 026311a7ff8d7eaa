"""A pytest plugin (conftest.py imports its hooks): a run fails when a test is skipped for an unnamed reason.

The README's Tests section names the only skips a run may have: GPU tests without a CUDA GPU, the llama.cpp tier
without llama-cpp-python, (on a CUDA machine) the CPU-path bitsandbytes tests, and the report's browser check
where Chromium could not be installed (`make test` installs it as root on Debian). Any other skip (a missing
package that ``make install`` installs, a file that is not where a test expected it) would otherwise leave CI green
while the test never ran, so it fails the run, listed in the terminal summary.
"""

from __future__ import annotations

from typing import Any

import pytest

# Prefixes of the skip reasons the README names (the skip sites use exactly these texts).
ALLOWED_SKIPS = (
    "needs a CUDA GPU",
    "llama-cpp-python is not installed",
    "CPU-path test; see test_gpu.py on a GPU",
    "chromium is not installed",
)
_UNNAMED: list[tuple[str, str]] = []  # (node id, reason) of this session's unnamed skips


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr: Any = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def _record(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _reason(report)
    if not reason.startswith(ALLOWED_SKIPS):
        _UNNAMED.append((report.nodeid, reason))


def pytest_sessionstart(session: pytest.Session) -> None:
    _UNNAMED.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A module-level skip (importorskip) is reported at collection, not per test.
    _record(report)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    bad = _UNNAMED
    if bad:
        terminalreporter.section("skips the README does not name (these fail the run)", sep="=", red=True)
        for nodeid, reason in bad:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line(
            "A skip is allowed only for: " + "; ".join(ALLOWED_SKIPS) + ". Install what is missing (`make install`) "
            "or make the test run."
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _UNNAMED and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
