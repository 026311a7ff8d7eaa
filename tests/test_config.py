from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bittune.config import RunConfig, config_from_dict, dump_config, load_config
from bittune.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def minimal() -> dict:
    return {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output_dir": "runs/x"}


def test_minimal_config_gets_defaults():
    cfg = config_from_dict(minimal())
    assert cfg.method == "lora" and cfg.lora.target_modules == "all-linear"
    assert cfg.train.lr > 0 and cfg.data.format == "chat"


def test_all_errors_reported_together_with_dotted_paths_and_lines(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(
        "model:\n  path: m\n  tsk: causal-lm\nlora:\n  r: 0\ndata:\n  train: t.jsonl\n"
        "train:\n  lr: -1\n  batch_size: many\noutput_dir: o\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert "4 problems" in msg
    assert f"{f}:3: model.tsk: unknown key (did you mean 'task'?)" in msg
    assert f"{f}:5: lora.r:" in msg
    assert f"{f}:9: train.lr:" in msg and "greater than 0" in msg
    assert f"{f}:10: train.batch_size:" in msg


def test_missing_required_sections():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {}})
    msg = str(err.value)
    assert "model.path: required but missing" in msg
    assert "data: required but missing" in msg and "output_dir: required but missing" in msg


def test_overrides_are_typed_like_yaml():
    cfg = config_from_dict(
        minimal(),
        [
            "train.max_steps=50",
            "lora.r=8",
            "train.lr=1e-4",
            "lora.target_modules=[q_proj, v_proj]",
            "data.packing=true",
        ],
    )
    assert cfg.train.max_steps == 50 and cfg.lora.r == 8 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.packing is True


@pytest.mark.parametrize("override", ["train.max_steps", "=3", "train.max_steps=[1,"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError):
        config_from_dict(minimal(), [override])


def test_override_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match=r"train.max_step: unknown key \(did you mean 'max_steps'\?\)"):
        config_from_dict(minimal(), ["train.max_step=5"])


def test_contradictory_options_are_refused():
    raw = minimal()
    raw["model"]["task"] = "classification"
    with pytest.raises(ConfigError, match=r"data\.format 'classification' exactly when"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="warmup_steps or warmup_ratio"):
        config_from_dict(minimal(), ["train.warmup_steps=5", "train.warmup_ratio=0.1"])


def test_bad_yaml_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  path: m\n data: [\n")
    with pytest.raises(ConfigError, match=rf"{f}:\d+: invalid YAML"):
        load_config(f)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "e.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(tmp_path / "e.yaml")


def test_gradient_checkpointing_auto_is_on_for_a_kbit_base_only():
    """QLoRA is chosen for memory: auto turns checkpointing on there (as peft's prepare_model_for_kbit_training
    does) and nowhere else; an explicit value is kept; the resolved bool is what the run config records."""
    assert config_from_dict({**minimal(), "method": "qlora"}).train.gradient_checkpointing is True
    assert config_from_dict(minimal()).train.gradient_checkpointing is False
    assert config_from_dict({**minimal(), "method": "full"}).train.gradient_checkpointing is False
    kept = config_from_dict({**minimal(), "method": "qlora"}, ["train.gradient_checkpointing=false"])
    assert kept.train.gradient_checkpointing is False
    assert config_from_dict(minimal(), ["train.gradient_checkpointing=true"]).train.gradient_checkpointing is True
    assert "gradient_checkpointing: true" in dump_config(config_from_dict({**minimal(), "method": "qlora"}))


def test_resolved_config_round_trips():
    cfg = config_from_dict(minimal(), ["train.max_steps=7"])
    again = RunConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_fixed_dotted_names_exist():
    """Scripts outside the package rely on these names; renaming one is a breaking change."""
    cfg = config_from_dict(minimal())
    for dotted in [
        "model.path", "model.task", "method", "lora.r", "lora.alpha", "data.train", "data.eval", "data.format",
        "data.template", "data.max_length", "train.max_steps", "train.batch_size", "train.grad_accum", "train.lr",
        "train.seed", "train.save_every", "output_dir",
    ]:  # fmt: skip
        node = cfg
        for part in dotted.split("."):
            assert hasattr(node, part), dotted
            node = getattr(node, part)


def _leaves(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    out = []
    for key, value in node.items():
        if isinstance(value, dict) and key != "columns":  # data.columns is a value (a mapping), not a section
            out += _leaves(value, (*prefix, key))
        else:
            out.append(((*prefix, key), value))
    return out


def test_there_are_example_configs():
    assert len(CONFIGS) >= 5, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # Every value the file sets is the value the config holds: no key renamed, dropped or silently re-read.
    raw = yaml.safe_load(path.read_text())
    leaves = _leaves(raw)
    assert len(leaves) >= 8, leaves
    for dotted, value in leaves:
        got = cfg
        for part in dotted:
            got = getattr(got, part)
        if isinstance(value, str) and value.startswith("~"):
            value = str(Path(value).expanduser())  # model.path and data files: ~ is expanded
        assert got == value, (".".join(dotted), got, value)
    # What a run writes as run_config.yaml loads back to the same config.
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def readme_sections() -> dict[str, Any]:
    """Each config section's prefix in the README's config table, and its pydantic model."""
    from bittune.config import (
        DataConfig,
        DistillConfig,
        DistributedConfig,
        LoraConfig,
        ModelConfig,
        QatConfig,
        TrackingConfig,
        TrainConfig,
    )
    from bittune.quant.spec import BnbSpec

    return {"model": ModelConfig, "lora": LoraConfig, "quant": BnbSpec, "qat": QatConfig, "distill": DistillConfig,
            "data": DataConfig, "train": TrainConfig, "distributed": DistributedConfig,
            "tracking": TrackingConfig}  # fmt: skip


README = Path(__file__).parent.parent / "README.md"


def test_every_config_key_is_documented_in_the_readme():
    readme = README.read_text()
    missing = [f"{s}.{k}" for s, m in readme_sections().items() for k in m.model_fields if f"`{s}.{k}`" not in readme]
    assert not missing, f"README config reference lacks: {missing}"


def test_readme_config_defaults_are_the_code_defaults():
    """The README's config table states each key's default; every one that is a plain value (a number, a bool,
    a word, none) must be the pydantic field's default (a changed default with a stale README misleads silently)."""
    import re

    sections = readme_sections()
    readme = README.read_text()

    def value(cell: str):
        cell = cell.strip().strip("`")
        if cell in ("none", "null"):
            return None
        if cell in ("true", "false"):
            return cell == "true"
        try:
            return int(cell) if re.fullmatch(r"-?\d+", cell) else float(cell)
        except ValueError:
            return cell if re.fullmatch(r"[a-z][a-z0-9_-]*", cell) else ...  # ...: not a plain value

    checked, wrong = 0, []
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([a-z_]+)\.([a-z_0-9]+)`", cells[0])
        defaults = [d for d in re.split(r",\s*", cells[1])]
        if not keys or len(defaults) != len(keys):
            continue
        for (section, key), cell in zip(keys, defaults, strict=True):
            model = sections.get(section) or RunConfig
            field = model.model_fields.get(key)
            want = value(cell)
            if field is None or want is ... or field.default_factory is not None or field.is_required():
                continue
            checked += 1
            have = field.default
            if want is None and have == "none":  # a field whose values are words, one of them "none"
                continue
            if have is None and want in ("all", "batch_size"):  # null, stated by what it means
                continue
            close = isinstance(have, float) and isinstance(want, (int, float)) and abs(have - want) < 1e-12
            if not (have == want or close):
                wrong.append(f"{section}.{key}: README {cell!r}, code {have!r}")
    assert checked >= 30, checked  # the table was found and read
    assert not wrong, "\n".join(wrong)
