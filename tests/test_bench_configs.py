"""The benchmark scripts' run configs pass bittune's own config validation (a bench that builds a config the CLI
refuses fails only on the machine it was meant for: the GPU benchmark's full fine-tuning row did, on an H200)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bittune.config import config_from_dict

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_qlora = load_bench("gpu_qlora")


@pytest.mark.parametrize("name", list(gpu_qlora.CONFIGS))
def test_gpu_benchmark_configs_validate(name, tmp_path):
    raw = gpu_qlora.run_config(
        gpu_qlora.CONFIGS[name], tmp_path / "model", tmp_path / "text.jsonl", tmp_path / "run", 5, 8, 512
    )
    cfg = config_from_dict(raw)
    assert cfg.method == raw.get("method", "lora")
    assert (cfg.lora is None) == (cfg.method == "full")
