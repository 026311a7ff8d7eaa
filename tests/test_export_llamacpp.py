"""The slow tier: llama.cpp itself (llama-cpp-python) loads the exported GGUF and agrees with transformers.

Excluded from the default run (pyproject addopts ``-m "not llamacpp"``). Run it with ``make test-llamacpp``, which
installs llama-cpp-python from ../shared/wheels when that folder has the wheel, else builds it (~15 min), then runs
``pytest -m llamacpp tests/test_export_llamacpp.py``. Without llama_cpp installed every test here is skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tiny import GPT2_PRE, SMOLLM_PRE, color_chat_rows, make_tiny, split_then_bytelevel, tokenizer_with_pre, write_jsonl

pytestmark = pytest.mark.llamacpp
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make test-llamacpp`")

QTYPES = ("f32", "f16", "q8_0", "q4_0")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tokenizer) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("arch")
    return {
        "llama": tiny_llama_dir,
        "mistral": make_tiny(tmp / "mistral", tokenizer, "mistral"),
        "qwen2": make_tiny(tmp / "qwen2", tokenizer, "qwen2"),
    }


def _export(model: Path, out: Path, qtype: str) -> dict:
    from bittune.export.commands import export_model

    return export_model(str(model), fmt="gguf", qtype=qtype, out=out, verify=True)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llamacpp_agrees_with_transformers(models: dict[str, Path], tmp_path: Path, arch: str, qtype: str) -> None:
    result = _export(models[arch], tmp_path / "m.gguf", qtype)
    v = result["verify"]
    assert v["passed"], v["problems"]
    assert v["tokenization_equal"] and v["eos_id_gguf"] == v["eos_id_hf"] and v["chat_template_equal"]
    if qtype == "f32":
        assert v["max_abs_logit_diff"] < 1e-3 and v["greedy_equal"], v
    if qtype == "f16":
        assert v["top1_agreement"] == 1.0 and v["relative_diff"] < 0.02, v
    if qtype in ("q8_0", "q4_0"):
        assert 0 < v["weight_error"] <= 1.0 and v["relative_diff_vs_dequantized"] < 0.5, v


@pytest.mark.parametrize(("qtype", "symptom"), [("f32", "max |Δlogit|"), ("q4_0", "rounding bound")])
def test_a_missing_rotary_permutation_is_caught(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qtype: str, symptom: str
) -> None:
    """The check must be able to fail: without the Q/K reordering the export loads and talks, but wrongly."""
    from bittune.errors import BittuneError
    from bittune.export import gguf_writer

    monkeypatch.setattr(gguf_writer, "permute_for_rotary", lambda w, n: w)
    with pytest.raises(BittuneError, match=re.escape(symptom)):
        _export(models["llama"], tmp_path / "bad.gguf", qtype)
    assert not list(tmp_path.iterdir()), "a GGUF that failed verification must not be left behind"


@pytest.mark.parametrize(
    "pre",
    [
        pytest.param(GPT2_PRE, id="gpt-2"),
        pytest.param(SMOLLM_PRE, id="smollm"),
        pytest.param("llama3", id="llama-bpe"),
        pytest.param("qwen2", id="qwen2"),
    ],
)
def test_each_pre_tokenizer_tokenizes_as_in_transformers(tmp_path: Path, pre: dict | str) -> None:
    from bittune.artifacts import load
    from bittune.export.gguf_writer import write_gguf
    from bittune.export.tokenizer_meta import _LLAMA3_REGEX, _QWEN2_REGEX
    from bittune.export.verify import compare_with_llamacpp
    from tiny import make_tiny_llama

    if isinstance(pre, str):
        pre = split_then_bytelevel(_LLAMA3_REGEX if pre == "llama3" else _QWEN2_REGEX)
    tok = tokenizer_with_pre(pre)
    model_dir = make_tiny_llama(tmp_path / "m", tok)
    model, tokenizer, _ = load(model_dir, as_="merged", device="cpu")
    write_gguf(model, tokenizer, tmp_path / "m.gguf", qtype="f32")
    texts = (
        "In 1994 I'm sure we'll pay 24690 dollars.\n\nThey've 3.14 x7",
        "What color is the sky?  It's   blue\t\t(12 345 6789)\r\n",
    )
    res = compare_with_llamacpp(tmp_path / "m.gguf", model, tokenizer, qtype="f32", texts=texts)
    assert res.tokenization_equal, res.tokenization_mismatches
    assert res.passed, res.problems


def test_lora_run_round_trip_through_the_cli(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bittune.cli import main
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    data = write_jsonl(tmp_path / "chat.jsonl", color_chat_rows(16))
    raw = {
        "model": {"path": str(tiny_llama_dir)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "format": "chat", "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 4, "seed": 1, "lr": 0.05},
        "output_dir": str(tmp_path / "run"),
    }
    run = train(config_from_dict(raw), progress=False).run_dir
    main(["export", str(run), "--out", str(tmp_path / "run.gguf"), "--type", "f16", "--verify"])
    result = json.loads(capsys.readouterr().out)
    assert result["merged_adapter"] and result["verify"]["passed"] and result["verify"]["top1_agreement"] == 1.0


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from bittune.demo.assets import prepare_smollm2
    from bittune.errors import BittuneError

    try:
        return prepare_smollm2()
    except BittuneError as exc:
        pytest.skip(f"SmolLM2 is not available: {exc}")


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_smollm2_gguf_round_trip(smollm2: Path, tmp_path_factory: pytest.TempPathFactory, qtype: str) -> None:
    """GGUF (the bundled Q4_1) -> HF folder -> a short LoRA tune -> GGUF, checked in llama.cpp."""
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    tmp = tmp_path_factory.mktemp(f"smol-{qtype}")
    data = write_jsonl(tmp / "chat.jsonl", color_chat_rows(8))
    raw = {
        "model": {"path": str(smollm2)},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data), "format": "chat", "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 4, "seed": 1, "lr": 1e-3},
        "output_dir": str(tmp / "run"),
    }
    run = train(config_from_dict(raw), progress=False).run_dir
    v = _export(run, tmp / "smol.gguf", qtype)["verify"]
    assert v["passed"] and v["tokenization_equal"] and v["eos_id_gguf"] == 2, v
