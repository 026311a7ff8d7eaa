"""``bittune ladder``: rungs in order, stopping at the first that meets the target (tiny model, real training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_evaluation import label_rows
from tiny import write_jsonl

pytestmark = pytest.mark.e2e


def write_config(tmp: Path, model: Path, out: Path) -> Path:
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    raw = {
        "model": {"path": str(model)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "train": str(write_jsonl(data / "train.jsonl", label_rows(32, 1))),
            "eval": str(write_jsonl(data / "eval.jsonl", label_rows(12, 2))),
            "format": "chat",
            "max_length": 64,
        },
        "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-2, "seed": 1, "device": "cpu"},
        "output_dir": str(out),
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_target_parsing():
    from bittune.errors import ConfigError
    from bittune.ladder import parse_target

    t = parse_target("accuracy>=0.85")
    assert (t.metric, t.op, t.value) == ("accuracy", ">=", 0.85) and t.met(0.9) and not t.met(0.8)
    assert parse_target("loss < 1.5").met(1.0)
    with pytest.raises(ConfigError, match="metrics: accuracy"):
        parse_target("acc=0.8")


def test_ladder_stops_at_the_first_rung_that_meets_the_target(tiny_llama_dir: Path, tmp_path: Path, capsys):
    pytest.importorskip("bitsandbytes")
    from bittune.cli import main
    from bittune.ladder import run_ladder

    # An unreachable target: every rung runs, none is chosen, and each is measured.
    every = run_ladder(write_config(tmp_path, tiny_llama_dir, tmp_path / "all"), "loss<=0")
    assert [r["rung"] for r in every["rungs"]] == ["qlora", "lora", "full"] and every["met"] is None
    loss = {r["rung"]: r["loss"] for r in every["rungs"]}
    assert all(r["peak_memory_mb"] and r["train_s"] > 0 for r in every["rungs"])
    # A target between the rungs' (seeded, repeatable) results: QLoRA misses it, a later rung reaches it.
    if loss["lora"] < loss["qlora"]:
        expect, threshold = "lora", (loss["lora"] + loss["qlora"]) / 2
    else:
        assert loss["full"] < min(loss["qlora"], loss["lora"])
        expect, threshold = "full", (loss["full"] + min(loss["qlora"], loss["lora"])) / 2
    config = write_config(tmp_path, tiny_llama_dir, tmp_path / "ladder")
    main(["ladder", str(config), "--target", f"loss<={threshold}"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["met"] == expect and printed["rungs"][-1] == expect and printed["rungs"][0] == "qlora"
    saved = json.loads((tmp_path / "ladder" / "ladder.json").read_text())
    assert [r["met"] for r in saved["rungs"]] == [False] * (len(saved["rungs"]) - 1) + [True]
    assert saved["rungs"][-1]["loss"] == pytest.approx(loss[expect])
    md = (tmp_path / "ladder" / "ladder.md").read_text()
    assert f"Stopped at: **{expect}**" in md and md.count("\n| ") == 1 + len(saved["rungs"])
    assert not (tmp_path / "ladder" / "full").exists() or expect == "full"


def test_ladder_needs_an_eval_file(tiny_llama_dir: Path, tmp_path: Path):
    from bittune.errors import ConfigError
    from bittune.ladder import run_ladder

    config = write_config(tmp_path, tiny_llama_dir, tmp_path / "noeval")
    raw = yaml.safe_load(config.read_text())
    del raw["data"]["eval"]
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data\.eval"):
        run_ladder(config, "accuracy>=0.5")
    assert not (tmp_path / "noeval").exists()  # refused before anything was written
