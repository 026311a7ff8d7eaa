"""The skip guard: a run with a skip the README does not name fails, listing it; named skips pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from skip_guard import (  # noqa: F401
    pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish, pytest_sessionstart, pytest_terminal_summary,
)
"""

NAMED = """
import pytest

def test_runs():
    pass

@pytest.mark.skip(reason="needs a CUDA GPU")
def test_gpu():
    pass

def test_llamacpp():
    pytest.skip("llama-cpp-python is not installed: run `make test-llamacpp`")
"""

UNNAMED = """
import pytest

@pytest.mark.skipif(True, reason="some asset is not installed")
def test_asset():
    pass
"""

MODULE_SKIP = """
import pytest

pytest.importorskip("surely_not_an_installed_module")

def test_never_collected():
    pass
"""

FAILING = """
def test_fails():
    assert False
"""


def _pytest(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_named_skips_pass(tmp_path: Path) -> None:
    proc = _pytest(tmp_path, {"test_named.py": NAMED})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 2 skipped" in proc.stdout
    assert "README does not name" not in proc.stdout


def test_an_unnamed_skip_fails_the_run_and_is_listed(tmp_path: Path) -> None:
    proc = _pytest(tmp_path, {"test_named.py": NAMED, "test_unnamed.py": UNNAMED, "test_module.py": MODULE_SKIP})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "skips the README does not name (these fail the run)" in out
    assert "test_unnamed.py::test_asset: some asset is not installed" in out
    assert "test_module.py: could not import 'surely_not_an_installed_module'" in out
    listed = out.split("README does not name", 1)[1]
    assert "::test_gpu" not in listed and "::test_llamacpp" not in listed


def test_a_failure_keeps_its_exit_code(tmp_path: Path) -> None:
    proc = _pytest(tmp_path, {"test_fail.py": FAILING, "test_unnamed.py": UNNAMED})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed" in proc.stdout and "test_unnamed.py::test_asset" in proc.stdout
