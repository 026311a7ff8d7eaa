"""Preflight: every problem of a run reported at once (train, validate, plan), before weights or output are touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bittune.config import config_from_dict, dump_config, load_config
from bittune.errors import ConfigError, PreflightError
from bittune.preflight import preflight
from tiny import color_chat_rows, sentiment_rows, write_jsonl


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(16))


def raw_config(model_dir: Path, data_file: Path, out: Path, **sections) -> dict:
    raw = {
        "model": {"path": str(model_dir)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data_file), "format": "chat", "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 4, "seed": 1},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


def three_problems(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A config file with a missing data file, a LoRA target the model lacks and a GPU-only optimizer."""
    raw = raw_config(
        tiny_llama_dir, tmp_path / "nope.jsonl", tmp_path / "out",
        lora={"target_modules": ["qkv_proj"]}, train={"optimizer": "paged_adamw_8bit"},
    )  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_every_problem_is_reported_at_once_with_where_and_fix(tiny_llama_dir, tmp_path):
    cfg_file = three_problems(tiny_llama_dir, tmp_path)
    checked = preflight(load_config(cfg_file))
    lines = cfg_file.read_text().splitlines()
    assert len(checked.problems) == 3, checked.problems
    # Each problem points at the line of its key in the YAML file.
    by_kind = {("optimizer" if "paged" in p.what else "lora" if "qkv_proj" in p.what else "data"): p
               for p in checked.problems}  # fmt: skip
    assert by_kind["data"].where == f"{cfg_file}:{lines.index('data:') + 1}" and "data file not found" in (
        by_kind["data"].what
    )
    assert by_kind["lora"].where == f"{cfg_file}:{lines.index('  target_modules:') + 1}"
    assert by_kind["optimizer"].where == f"{cfg_file}:{lines.index('  optimizer: paged_adamw_8bit') + 1}"
    assert all(p.fix for p in checked.problems)
    with pytest.raises(PreflightError) as err:
        checked.raise_problems()
    msg = str(err.value)
    assert msg.startswith("3 problems found before training:")
    assert msg.count("\n    fix: ") == 3 and "\n  fix: " in msg
    assert not (tmp_path / "out").exists()


def test_train_and_validate_report_the_same_problems_through_the_cli(tiny_llama_dir, tmp_path, capsys):
    from bittune.cli import main

    cfg_file = three_problems(tiny_llama_dir, tmp_path)
    for verb in ("train", "validate"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main([verb, str(cfg_file)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, err
        assert err.startswith("error: 3 problems found before training:") and err.count("error: ") == 1, err
        for needle in ("nope.jsonl", "qkv_proj", "paged_adamw_8bit", "\n  fix: "):
            assert needle in err, (verb, needle, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_single_problem_keeps_its_own_error(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(12))
    raw = raw_config(tiny_bert_dir, data, tmp_path / "out", model={"task": "classification", "num_labels": 3},
                     data={"format": "classification"})  # fmt: skip
    checked = preflight(config_from_dict(raw))
    assert [p.where for p in checked.problems] == ["model.num_labels"]
    with pytest.raises(ConfigError, match=r"model\.num_labels is 3 but the data has 2 labels"):
        checked.raise_problems()


def test_plan_runs_the_cheap_checks_only(tiny_llama_dir, tmp_path):
    cfg = config_from_dict(
        raw_config(tiny_llama_dir, tmp_path / "nope.jsonl", tmp_path / "out", lora={"target_modules": ["qkv"]},
                   train={"optimizer": "paged_adamw_8bit"})
    )  # fmt: skip
    checked = preflight(cfg, cheap=True)
    assert [p.where for p in checked.problems] == ["lora.target_modules"]  # no data read, no device checked
    assert checked.data is None and checked.tokenizer is None


def test_qat_schedule_that_does_not_fit_is_found_before_loading(tiny_llama_dir, chat_file, tmp_path):
    raw = raw_config(tiny_llama_dir, chat_file, tmp_path / "out", method="qat", qat={"schedule": [8, 6, 4]})
    del raw["lora"]
    checked = preflight(config_from_dict(raw))  # 2 steps, 3 stages
    assert [p.where for p in checked.problems] == ["qat.schedule"]
    assert "3 qat stages need at least 3 steps" in checked.problems[0].what


def test_training_tokenizes_the_data_once(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    import bittune.data
    from bittune.recipes.finetune import train

    calls = []
    real = bittune.data.prepare_data

    def counted(**kwargs):
        calls.append(kwargs["train"])
        return real(**kwargs)

    monkeypatch.setattr(bittune.data, "prepare_data", counted)
    train(config_from_dict(raw_config(tiny_llama_dir, chat_file, tmp_path / "run")), progress=False)
    assert calls == [str(chat_file)]


def test_validate_warns_about_an_earlier_run_instead_of_failing(tiny_llama_dir, chat_file, tmp_path):
    from bittune.validate import validate_run

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    report = validate_run(config_from_dict(raw_config(tiny_llama_dir, chat_file, run)))
    assert any("already holds a run (checkpoints)" in w and "--resume" in w for w in report["warnings"])
    with pytest.raises(ConfigError, match="already holds a run"):
        preflight(config_from_dict(raw_config(tiny_llama_dir, chat_file, run))).raise_problems()
    assert preflight(config_from_dict(raw_config(tiny_llama_dir, chat_file, run)), resume=True).problems == []


def test_an_output_dir_with_other_files_is_refused(tiny_llama_dir, chat_file, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not bittune's")
    checked = preflight(config_from_dict(raw_config(tiny_llama_dir, chat_file, mine)))
    assert [p.where for p in checked.problems] == ["output_dir"]
    assert "already holds other files" in checked.problems[0].what and "notes.txt" in checked.problems[0].what


# --- lora: only where there is an adapter ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "qat"])
def test_lora_section_without_an_adapter_is_a_config_error_naming_the_key(tmp_path, method):
    raw = {"model": {"path": "m"}, "method": method, "lora": {"r": 64}, "data": {"train": "d.jsonl"},
           "output_dir": "o", **({"qat": {"schedule": [4]}} if method == "qat" else {})}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    line = path.read_text().splitlines().index("lora:") + 1
    assert f"{path}:{line}: lora: lora is set but method is '{method}'" in str(err.value)
    assert "remove the lora section" in str(err.value)


def test_adapter_methods_get_default_lora_and_resolved_configs_round_trip(tmp_path):
    base = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "output_dir": "o"}
    assert config_from_dict({**base, "method": "qlora"}).lora.r == 16
    full = config_from_dict({**base, "method": "full"})
    assert full.lora is None
    path = tmp_path / "run_config.yaml"
    path.write_text(dump_config(full))
    assert load_config(path) == full


def test_an_older_run_config_that_lists_lora_for_full_still_loads(tmp_path):
    """run_config.yaml of earlier versions listed the LoRA defaults for every method."""
    old = {"model": {"path": "m"}, "method": "full", "lora": {"r": 16, "alpha": 32.0, "dropout": 0.05},
           "data": {"train": "d.jsonl"}, "output_dir": "o"}  # fmt: skip
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="lora is set but method is 'full'"):
        load_config(path)
    cfg = load_config(path, recorded=True)
    assert cfg.method == "full" and cfg.lora is None
    # A run's own run_config.yaml (`bittune train RUN/run_config.yaml --resume`) is read as resolved.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.yaml").write_text(path.read_text())
    assert load_config(tmp_path / "run" / "run_config.yaml") == cfg
