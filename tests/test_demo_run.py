"""The demo driver's cheap parts: its config is valid, its sizes apply, and it only ever replaces its own outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bittune.config import load_config
from bittune.demo.run import (
    DEMO_MARKER,
    OUTPUTS,
    SIZES,
    DemoData,
    _prepare_out_dir,
    default_config_path,
    overrides,
    run_config,
)
from bittune.errors import BittuneError


def test_demo_configs_are_valid(tmp_path: Path) -> None:
    path = default_config_path()
    assert path.name == "demo.yaml"
    quick = SIZES["quick"]
    cfg = load_config(path, ["model.path=/m", "data.train=/d.jsonl", f"output_dir={tmp_path}", *overrides(quick)])
    assert (cfg.model.path, cfg.output_dir, cfg.train.max_steps) == ("/m", str(tmp_path), quick.steps)
    assert (cfg.train.batch_size, cfg.train.eval_batch_size) == (quick.batch_size, quick.eval_batch)
    assert cfg.method == "qlora" and cfg.quant is not None and cfg.quant.method == "nf4"
    assert cfg.data.format == "chat" and cfg.model.task == "causal-lm"
    full = load_config(path, overrides(SIZES["full"]))
    assert full.train.max_steps == SIZES["full"].steps and full.train.batch_size
    cls = load_config(path.with_name("demo_classify.yaml"))
    assert cls.model.task == "classification" and cls.data.format == "classification"


def test_the_classifier_config_takes_the_demo_sizes(tmp_path: Path) -> None:
    from bittune.demo import sentiment

    for mode, sizes in SIZES.items():
        cfg, files = sentiment.run_config(tmp_path / "cache", tmp_path / "out", sizes, quick=mode == "quick", fp32=True)
        assert cfg.model.task == "classification" and cfg.method == "lora" and cfg.data.format == "classification"
        assert (cfg.train.max_steps, cfg.train.batch_size) == (sizes.cls_steps, sizes.cls_batch)
        assert cfg.train.mixed_precision == "no" and cfg.output_dir == str(tmp_path / "out" / "sentiment" / "run")
        assert files.n_heldout == sizes.cls_n_eval and (sizes.cls_n_train is None or files.n_train == sizes.cls_n_train)
        assert (cfg.data.train, cfg.data.eval) == (str(files.train), str(files.heldout))
    lines = sentiment.confusion_lines({"labels": ["negative", "positive"], "matrix": [[196, 45], [45, 214]]})
    assert lines[1].split() == ["negative", "196", "45"] and len({len(x) for x in lines}) == 1  # aligned


def test_outputs_are_replaced_only_when_the_demo_owns_them(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = _prepare_out_dir(out)
    assert run == out / "run" and (out / DEMO_MARKER).is_file() and not run.exists()
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (out / "smollm2-trec.gguf").write_bytes(b"GGUF")
    (out / "mine.txt").write_text("a user's file beside the demo's outputs\n")
    assert not _prepare_out_dir(out).exists()
    assert not (out / "smollm2-trec.gguf").exists() and (out / "mine.txt").is_file()

    for name in ("run", "merged"):
        foreign = tmp_path / f"foreign-{name}"
        (foreign / name).mkdir(parents=True)
        (foreign / "run" / "keep.txt").parent.mkdir(exist_ok=True)
        (foreign / "run" / "keep.txt").write_text("x")
        with pytest.raises(BittuneError, match="not written by `bittune demo`"):
            _prepare_out_dir(foreign)
        assert (foreign / name).is_dir() and (foreign / "run" / "keep.txt").is_file()
    assert "run" in OUTPUTS and "sentiment" in OUTPUTS and "demo.json" in OUTPUTS


def test_run_config_points_at_the_demo_files_and_fp32_forces_float32(tmp_path: Path) -> None:
    data = DemoData(tmp_path / "train.jsonl", tmp_path / "eval.jsonl", [], 0)
    sizes = SIZES["full"]
    cfg = run_config(None, tmp_path / "model", data, tmp_path / "run", sizes, fp32=True)
    assert cfg.train.mixed_precision == "no" and cfg.train.max_steps == sizes.steps
    assert (cfg.data.train, cfg.data.eval) == (str(data.train), str(data.eval))
    default = run_config(None, tmp_path / "model", data, tmp_path / "run", sizes, fp32=False)
    assert default.train.mixed_precision == "auto"
