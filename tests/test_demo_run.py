"""The demo driver's cheap parts: its config is valid, and it only ever replaces its own earlier run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bittune.config import load_config
from bittune.demo.run import DEMO_MARKER, QUICK, _prepare_run_dir, default_config_path
from bittune.errors import BittuneError


def test_demo_configs_are_valid(tmp_path: Path) -> None:
    path = default_config_path()
    assert path.name == "demo.yaml"
    cfg = load_config(path, ["model.path=/m", "data.train=/d.jsonl", f"output_dir={tmp_path}", *QUICK["overrides"]])
    assert (cfg.model.path, cfg.output_dir, cfg.train.max_steps) == ("/m", str(tmp_path), 6)
    assert cfg.method == "lora" and cfg.data.format == "chat" and cfg.model.task == "causal-lm"
    full = load_config(path)
    assert full.train.max_steps and full.train.batch_size
    cls = load_config(path.with_name("demo_classify.yaml"))
    assert cls.model.task == "classification" and cls.data.format == "classification"


def test_run_dir_is_replaced_only_when_the_demo_owns_it(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = _prepare_run_dir(out)
    assert run == out / "run" and (out / DEMO_MARKER).is_file() and not run.exists()
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    assert not _prepare_run_dir(out).exists()

    foreign = tmp_path / "foreign"
    (foreign / "run").mkdir(parents=True)
    with pytest.raises(BittuneError, match="not written by `bittune demo`"):
        _prepare_run_dir(foreign)
    assert (foreign / "run").is_dir()
