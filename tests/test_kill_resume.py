"""Kill safety, fast: SIGKILL real ``bittune train`` jobs at seeded random points, resume, compare bit for bit.

The harness is bench/kill_resume.py (the full version: 10 kills, LoRA and full, ``python -m bittune``). Here jobs
start through its fork launcher (one warm process that has imported torch forks each job: ~1 s per start instead
of ~10 s), with 3 kills over 16 steps, checkpointing every step. Each job is still its own process, killed with
SIGKILL, leaving its ``.lock`` behind for the next one to find stale. Two sabotaged runs show the comparison does
fail when resume loses the RNG state or the data position; two deterministic in-process tests pin down what a kill
during checkpoint pruning and a kill during a checkpoint write leave behind, and that the resumed run cleans it up.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from bittune.config import config_from_dict
from bittune.recipes.finetune import stop_after, train
from bittune.storage import COMPLETE
from bittune.training.checkpoint import list_checkpoints
from tiny import color_chat_rows, run_config, write_jsonl

pytestmark = pytest.mark.e2e

HARNESS = Path(__file__).parent.parent / "bench" / "kill_resume.py"
STEPS, KILLS, SEED = 16, 3, 3  # seed 3 puts one kill 5% of a step after step 4 is logged: in its checkpoint write


def _load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kill_resume", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_resume"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


kr = _load_harness()


@pytest.fixture(scope="module")
def launcher() -> Iterator[object]:
    fork = kr.ForkLauncher()
    yield fork
    fork.close()


def _report(res: object) -> str:
    return (
        "\n".join(f"{name}: {fails}" for name, fails in res.failures.items() if fails)
        + "\n"
        + "\n".join(f"kill {k.index}: step {k.logged_step}, {k.phase}, {k.next_job}" for k in res.kills)
    )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_killed_and_resumed_run_is_bit_identical(method: str, launcher: object, tmp_path: Path) -> None:
    res = kr.run_method(
        method, work=tmp_path, launcher=launcher, kills=KILLS, seed=SEED, steps=STEPS, save_every=1, log=lambda _: None
    )
    assert res.ok, _report(res)
    assert res.tensors_compared > 0
    # The kills really happened mid-run, each left a stale lock, and at least one job resumed from a checkpoint.
    assert len(res.kills) == KILLS, _report(res)
    assert all(k.lock_left == f"pid {k.pid} (the killed job)" for k in res.kills), _report(res)
    assert any(k.next_job.startswith("resumes from step-") for k in res.kills), _report(res)


@pytest.mark.parametrize("sabotage", ["rng", "data"])
def test_the_comparison_catches_a_resume_that_loses_state(sabotage: str, launcher: object, tmp_path: Path) -> None:
    """Resumed jobs that skip restoring the RNG (dropout masks) or restart their epoch must be caught."""
    res = kr.run_method(
        "lora", work=tmp_path, launcher=launcher, kills=2, seed=SEED, steps=12, save_every=1, sabotage=sabotage,
        log=lambda _: None,
    )  # fmt: skip
    assert any(k.next_job.startswith("resumes from step-") for k in res.kills), _report(res)
    assert res.failures["weights"] and res.failures["metrics"], _report(res)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(32))


class _Killed(BaseException):
    """Stands in for SIGKILL inside this process: nothing after the point it is raised at runs."""


def test_kill_during_pruning_leaves_no_folder_that_looks_complete(
    tiny_llama_dir: Path, chat_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_rmtree = shutil.rmtree

    def rmtree_then_die(path: Path, *args: object, **kwargs: object) -> None:
        path = Path(path)
        if path.parent.name != "checkpoints" or path.name.startswith(".tmp-"):
            return real_rmtree(path, *args, **kwargs)
        # Directory order decides what rmtree deletes first; COMPLETE surviving is what bench/kill_resume.py saw
        # when pruning still deleted step-N folders in place.
        for name in ("state.json", "optimizer.pt"):
            (path / name).unlink()
        raise _Killed

    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 6, "save_every": 1})
    monkeypatch.setattr(shutil, "rmtree", rmtree_then_die)
    with pytest.raises(_Killed):  # keep_last 2: saving step-3 prunes step-1
        train(config_from_dict(raw), progress=False)
    monkeypatch.undo()
    ckpts = tmp_path / "run" / "checkpoints"
    # Pruning renames a folder away before deleting it: no step-N folder may look complete but be half gone.
    looks_complete = [p.name for p in ckpts.iterdir() if p.name.startswith("step-") and (p / COMPLETE).is_file()]
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-2", "step-3"]
    assert sorted(looks_complete) == ["step-2", "step-3"], sorted(looks_complete)
    # The resumed run sweeps what the killed one left and ends with complete checkpoints only.
    assert train(config_from_dict(raw), resume=True, progress=False).steps == 6
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-4", "step-5"]


def test_resume_removes_the_temp_folders_of_killed_jobs(tiny_llama_dir: Path, chat_file: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 4, "save_every": 2})
    with stop_after(2):
        train(config_from_dict(raw), progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is no longer running, like a killed job's
    shutil.copytree(ckpts / "step-2", ckpts / f".tmp-step-3-{dead.pid}")
    (ckpts / f".tmp-step-3-{dead.pid}" / COMPLETE).unlink()  # killed before the marker
    assert train(config_from_dict(raw), resume=True, progress=False).steps == 4
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".")) == []
