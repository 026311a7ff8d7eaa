"""Shared fixtures: every test runs offline on tiny in-process models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning (bittune.threads, as the CLI does): on shared cores spinning made
# the in-process quick demo ~10x slower. Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tests run as on a CPU without fast bf16 (float32, the same on every machine; subprocesses inherit it); the tests
# of the bf16 path force bfloat16 (bittune.plan.device.FORCE_CPU_DTYPE_ENV).
os.environ.setdefault("BITTUNE_FORCE_CPU_DTYPE", "float32")
sys.path.insert(0, str(Path(__file__).parent))

from skip_guard import (  # noqa: F401  (hooks: a skip the README does not name fails the run)
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_sessionstart,
    pytest_terminal_summary,
)
from tiny import make_tiny_bert, make_tiny_llama, make_tokenizer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), tokenizer)
