"""The one output-path rule: never over a user's files; an earlier output of bittune's only when it may be replaced."""

from __future__ import annotations

from pathlib import Path

import pytest

from bittune.errors import ConfigError, StorageError
from bittune.storage import COMPLETE, atomic_dir, atomic_file, check_output_path, is_complete


def test_a_missing_or_empty_folder_is_fine(tmp_path):
    assert check_output_path(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_output_path(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".lock").write_text("{}")  # bittune's own hidden files are not the user's
    check_output_path(tmp_path / "hidden")


def test_a_folder_with_other_files_is_never_written_over(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    for may_replace in (False, True):
        with pytest.raises(StorageError, match=r"--out .*busy already holds other files \(the folder is not empty"):
            check_output_path(tmp_path / "busy", ours=("marker.json",), may_replace=may_replace)


def test_an_earlier_output_is_replaced_only_when_allowed(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "notes.txt").write_text("the user's notes in a run folder")
    rule = {"flag": "output_dir", "noun": "a run", "ours": ("checkpoints", "run_config.yaml"), "error": ConfigError}
    with pytest.raises(ConfigError, match=r"output_dir .*run already holds a run \(checkpoints\)") as err:
        check_output_path(run, replace_hint="pass --resume", **rule)
    assert err.value.hint == "pass --resume"
    assert check_output_path(run, may_replace=True, **rule) == run
    # Files of ours that do not make an earlier output (a run_config.yaml before the first step) need no permission.
    early = tmp_path / "early"
    early.mkdir()
    (early / "run_config.yaml").write_text("x")
    check_output_path(early, earlier=("checkpoints",), **rule)


def test_file_outputs(tmp_path):
    with pytest.raises(StorageError, match="is a directory") as err:
        check_output_path(tmp_path, file="model.gguf")
    assert "--out model.gguf" in err.value.hint
    with pytest.raises(StorageError, match="does not exist") as err:
        check_output_path(tmp_path / "no" / "m.gguf", file="model.gguf", parent_must_exist=True)
    assert "mkdir -p" in err.value.hint
    with pytest.raises(StorageError, match=r"does not end in \.gguf"):
        check_output_path(tmp_path / "m.bin", file="model.gguf", suffix=".gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(StorageError, match="already exists"):
        check_output_path(tmp_path / "m.gguf", file="model.gguf")
    assert check_output_path(tmp_path / "m.gguf", file="model.gguf", may_replace=True) == tmp_path / "m.gguf"
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="is a file"):
        check_output_path(tmp_path / "f")


def test_atomic_dir_marks_complete_and_leaves_nothing_on_failure(tmp_path):
    atomic_dir(tmp_path / "a", lambda tmp: (tmp / "x.json").write_text("{}"))
    assert is_complete(tmp_path / "a", "x.json") and not is_complete(tmp_path / "a", "y.json")
    assert (tmp_path / "a" / COMPLETE).is_file()

    def fail(tmp):
        (tmp / "half").write_text("...")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "b", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_atomic_file_replaces_only_a_complete_file_and_names_a_write_error(tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    with pytest.raises(StorageError, match=r"could not write .*model\.gguf"), atomic_file(out) as tmp:
        raise OSError(28, "No space left on device")
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    with atomic_file(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_weights_size_counts_a_gguf_file_and_a_folders_weight_files(tmp_path: Path) -> None:
    from bittune.quant.report import weights_size

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"x" * 7)
    assert weights_size(tmp_path / "m") == 10 and weights_size(tmp_path / "m.gguf") == 7
    assert weights_size(tmp_path / "m" / "config.json") is None and weights_size("owner/name") is None
