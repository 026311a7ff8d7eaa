"""Outputs of quantize, merge and export survive a process dying while it writes them (deterministic kills).

``bench/kill_outputs.py`` SIGKILLs the commands at random moments; here a driver process dies (``os._exit``, so no
``finally`` or cleanup runs, as under SIGKILL) at a chosen point: half-way through writing the weights, just
before the rename into place, or just after the first rename that touches the output path (where replacing an
earlier output could leave the path empty). After the death the output path holds nothing, the earlier output
byte for byte, or (after the rename) the complete new one; then a normal re-run writes exactly the uninterrupted
output.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tiny import run_cli

pytestmark = pytest.mark.e2e

HARNESS = Path(__file__).parent.parent / "bench" / "kill_outputs.py"

# argv: MODE OUT BITTUNE-ARGV...   The patches go in before bittune (and transformers) import what they patch.
DRIVER = """
import os, sys
from pathlib import Path

mode, out, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]


def die():
    os._exit(137)


if mode == "mid-write":
    import gguf
    import safetensors.torch as st

    real_save = st.save_file

    def half_then_die(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        die()

    st.save_file = half_then_die
    gguf.GGUFWriter.write_tensors_to_file = lambda self, *a, **k: die()  # header and metadata are on disk
else:
    # The renames that put the output in place, whatever makes them: os.rename/os.replace raise the audit event
    # "os.rename"; an atomic swap (renameat2 through ctypes) raises no event of its own, but looking the function
    # up does, just before the call ("ctypes.dlsym"), and the swap is only ever used to put an output in place.
    after = []

    def touches_out(event, args):
        if event == "os.rename":
            return Path(args[0]) == out or Path(args[1]) == out
        return event == "ctypes.dlsym" and args[1] == "renameat2"

    def hook(event, args):
        if after:  # the first event after the rename that touched the output
            die()
        if touches_out(event, args):
            if mode == "before-rename":
                die()
            after.append(event)  # "after-rename": die once that call has returned

    sys.addaudithook(hook)

from bittune.cli import main

main(argv)
sys.exit(3)  # the command finished: the kill point was never reached
"""


def _load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kill_outputs", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_outputs"] = module
    spec.loader.exec_module(module)
    return module


ko = _load_harness()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ko.build_run(tmp_path_factory.mktemp("kill-outputs"))


def _argv(name: str, source: Path, out: Path) -> list[str]:
    template, _ = ko.COMMANDS[name]
    return [a.format(run=source, out=out) for a in template]


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# (command, kill point, what the output path held before: nothing, or an earlier output of another source/type)
CASES = [
    ("quantize int4", "mid-write", None),
    ("merge", "before-rename", None),
    ("export gguf q8_0", "mid-write", "f16 of the run"),
    ("export hf", "after-rename", "export of the base model"),
]


@pytest.mark.parametrize(("name", "point", "earlier"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_death_mid_write_leaves_nothing_or_the_earlier_output(
    run_dir: Path, tmp_path: Path, capsys, name: str, point: str, earlier: str | None
) -> None:
    _, suffix = ko.COMMANDS[name]
    leaf = f"out{suffix}"
    reference = tmp_path / "ref" / leaf
    reference.parent.mkdir()
    code, _, err = run_cli(_argv(name, run_dir, reference), capsys)
    assert code == 0, err
    want = ko.comparable(reference)

    out = tmp_path / "killed" / leaf
    out.parent.mkdir()
    if earlier == "f16 of the run":
        argv = ["export", str(run_dir), "--format", "gguf", "--type", "f16", "--out", str(out)]
    elif earlier == "export of the base model":
        argv = _argv(name, run_dir.parent / "tiny-llama", out)  # build_run's base model
    if earlier:
        code, _, err = run_cli(argv, capsys)
        assert code == 0, err
    before = ko.comparable(out)
    assert before != want

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, point, str(out), *_argv(name, run_dir, out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 137, f"the kill point was not reached (exit {proc.returncode}): {proc.stderr[-2000:]}"
    # Under the real name: what was there before (nothing, or the earlier output intact), or, once the rename into
    # place has happened, the complete new output; never a part of one, and never nothing instead of the earlier.
    left = ko.comparable(out)
    assert left == (want if point == "after-rename" else before), f"{point}: {out} holds {_visible(out.parent)}"

    # A normal re-run is not confused by the dead job's leftovers and writes the uninterrupted output.
    code, _, err = run_cli(_argv(name, run_dir, out), capsys)
    assert code == 0, err
    assert ko.comparable(out) == want
