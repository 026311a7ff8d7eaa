"""One resolver, one loader, typed sidecars and one quantization vocabulary (no training here: folders are built
by hand, so each test reads in a second what ``resolve`` sees)."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from bittune.artifacts import AdapterDir, GgufFile, HubId, ModelDir, QuantizedDir, RunDir, load, resolve
from bittune.config import config_from_dict, dump_config, read_run_config
from bittune.errors import ConfigError, ModelLoadError
from bittune.quant.spec import METHODS, BnbSpec, IntSpec, spec_from_cli
from bittune.sidecars import (
    QAT_SETTINGS_FILE,
    QUANTIZED_MANIFEST_FILE,
    TRAINING_QUANT_FILE,
    read_manifest,
    read_qat_settings,
    read_training_quant,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "bittune"
# What bittune wrote before the one vocabulary (QuantConfig.model_dump() and the old manifest), kept byte for byte.
OLD_NF4 = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "auto"}
OLD_INT8 = {"bits": 8, "type": "nf4", "double_quant": True, "compute_dtype": "auto"}
OLD_QAT = {"bits": 4, "group_size": 16, "symmetric": False, "method": "int", "schedule": [8, 4], "stage_ends": [8, 16]}


def _adapter(folder: Path, base: str, task_type: str = "CAUSAL_LM", **sidecars: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "task_type": task_type}))
    for name, content in sidecars.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def _run(tmp: Path, model_dir: Path, final: str = "adapter", **config) -> Path:
    run = tmp / "run"
    raw = {"model": {"path": str(model_dir)}, "data": {"train": "t.jsonl"}, "output_dir": str(run), **config}
    if final == "adapter":
        _adapter(run / "adapter", str(model_dir), **{TRAINING_QUANT_FILE: OLD_NF4} if config.get("quant") else {})
    else:
        shutil.copytree(model_dir, run / "model")
    (run / "run_config.yaml").write_text(yaml.safe_dump(raw))
    return run


def test_resolve_names_every_kind_without_reading_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "model.safetensors").write_bytes(b"not weights")  # resolve must not care
    assert resolve(model) == ModelDir(str(model), task="causal-lm", base=str(model))
    adapter = resolve(_adapter(tmp_path / "a", str(model)))
    assert isinstance(adapter, AdapterDir) and adapter.base == str(model) and adapter.adapter == str(tmp_path / "a")
    assert resolve("owner/name") == HubId("owner/name", base="owner/name")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert isinstance(resolve(tmp_path / "m.gguf"), GgufFile)
    run = resolve(_run(tmp_path, model, method="qlora", quant={"bits": 4}))
    assert isinstance(run, RunDir) and run.adapter == str(tmp_path / "run" / "adapter") and run.base == str(model)
    assert run.training_quant == BnbSpec(method="nf4", double_quant=True)
    assert run.run_config.method == "qlora" and run.run_config.quant == BnbSpec()
    with pytest.raises(Exception):  # noqa: B017 - only load() reads the weights
        load(model, device="cpu")


def test_resolve_refuses_what_is_not_a_model_with_one_clear_message(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cases = {
        "does not exist": tmp_path / "nope",
        "no config.json": tmp_path,
        "is a file": tmp_path / "x.txt",
        "no finished adapter/ or model/": tmp_path / "unfinished",
        "the base model of the adapter": _adapter(tmp_path / "orphan", str(tmp_path / "gone")),
    }
    (tmp_path / "x.txt").write_text("hi")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "run_config.yaml").write_text("{}")
    for needle, path in cases.items():
        with pytest.raises(ModelLoadError, match=needle) as err:
            resolve(path)
        assert err.value.hint, needle


def test_adapter_option_puts_an_adapter_on_the_given_base(tiny_llama_dir: Path, tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "a", str(tmp_path / "moved-away"))  # its recorded base is gone
    got = resolve(tiny_llama_dir, adapter=adapter)
    assert isinstance(got, AdapterDir) and got.base == str(tiny_llama_dir) and got.adapter == str(adapter)
    with pytest.raises(ModelLoadError, match="not a PEFT adapter folder"):
        resolve(tiny_llama_dir, adapter=tiny_llama_dir)


def test_old_sidecars_and_run_configs_keep_loading(tiny_llama_dir: Path, tmp_path: Path) -> None:
    nf4 = _adapter(tmp_path / "nf4", str(tiny_llama_dir), **{TRAINING_QUANT_FILE: OLD_NF4, QAT_SETTINGS_FILE: OLD_QAT})
    assert read_training_quant(nf4) == BnbSpec(method="nf4", double_quant=True, compute_dtype="auto")
    assert read_qat_settings(nf4).spec == IntSpec(bits=4, group_size=16, symmetric=False)
    int8 = _adapter(tmp_path / "int8", str(tiny_llama_dir), **{TRAINING_QUANT_FILE: OLD_INT8})
    assert read_training_quant(int8).method == "llm-int8" and resolve(int8).training_quant.bits == 8
    # An old run_config.yaml of an 8-bit QLoRA run (every key written out) loads through the typed config.
    run = _run(tmp_path, tiny_llama_dir, method="qlora", quant=OLD_INT8)
    assert read_run_config(run).quant == BnbSpec(method="llm-int8")
    # A quantized folder's manifest from before compute_dtype existed.
    q = tmp_path / "q"
    shutil.copytree(tiny_llama_dir, q)
    manifest = {"format_version": 1, "spec": {"method": "nf4", "double_quant": True}, "task": "causal-lm",
                "layers": [], "source": None}  # fmt: skip
    (q / QUANTIZED_MANIFEST_FILE).write_text(json.dumps(manifest))
    assert read_manifest(q).spec == BnbSpec(method="nf4") and isinstance(resolve(q), QuantizedDir)


def test_a_damaged_sidecar_is_named_with_a_fix(tiny_llama_dir: Path, tmp_path: Path) -> None:
    bad = _adapter(tmp_path / "a", str(tiny_llama_dir), **{TRAINING_QUANT_FILE: {"method": "nf4", "colour": "red"}})
    with pytest.raises(ModelLoadError, match=re.escape(TRAINING_QUANT_FILE) + " is unreadable .*colour") as err:
        resolve(bad)
    assert err.value.hint
    q = tmp_path / "q"
    shutil.copytree(tiny_llama_dir, q)
    (q / QUANTIZED_MANIFEST_FILE).write_text(json.dumps({"format_version": 7, "spec": {"method": "fp16"}}))
    with pytest.raises(ModelLoadError, match="format version 7"):
        resolve(q)


def test_a_model_folders_json_cut_short_is_named_by_file_and_line(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    (model / "config.json").write_text('{\n  "architectures": ["LlamaForCausalLM"],\n  "hidden_size": ')
    with pytest.raises(ModelLoadError, match=re.escape(f"{model / 'config.json'}:3: not valid JSON")) as err:
        resolve(model)
    assert err.value.hint
    adapter = _adapter(tmp_path / "a", str(tiny_llama_dir))
    (adapter / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=re.escape("adapter_config.json is not a JSON object")):
        resolve(adapter)


def test_qlora_config_speaks_the_quantize_vocabulary_and_translates_the_old_one() -> None:
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output_dir": "o", "method": "qlora"}
    new = config_from_dict({**base, "quant": {"method": "fp4", "double_quant": False}})
    old = config_from_dict({**base, "quant": {"bits": 4, "type": "fp4", "double_quant": False}})
    assert new.quant == old.quant == BnbSpec(method="fp4", double_quant=False)
    assert (
        config_from_dict({**base, "quant": {"bits": 8}}).quant
        == config_from_dict({**base, "quant": {"method": "llm-int8"}}).quant
    )
    assert spec_from_cli(bits=4, method="fp4") == BnbSpec(method="fp4")  # the same type the CLI builds
    # The resolved config round-trips (run_config.yaml is read back through the same validation).
    assert config_from_dict(yaml.safe_load(dump_config(new))) == new
    with pytest.raises(ConfigError, match=r"quant\.colour: unknown key.*known keys here: method, double_quant"):
        config_from_dict({**base, "quant": {"method": "nf4", "colour": "red"}})


def test_cli_flags_are_checked_by_the_spec_models_and_named_by_flag() -> None:
    for kwargs, start in [
        ({"bits": 4, "method": "int", "group_size": 0}, "--group-size 0: "),
        ({"bits": 9, "method": "int"}, "--bits 9: "),
        ({"bits": 3, "method": "gptq", "calibration_tokens": 8}, "--calib-tokens 8: "),
        ({"bits": 4, "method": "hqq", "symmetric": True}, "--symmetric applies to --method int|gptq"),
    ]:
        with pytest.raises(ConfigError) as err:
            spec_from_cli(**kwargs)
        assert err.value.message.startswith(start) and err.value.hint, err.value.message


def test_every_method_has_a_quantizer_and_one_bnb_builder() -> None:
    from bittune.quant.api import QUANTIZERS, bnb_config

    assert set(QUANTIZERS) == set(METHODS)
    nf4 = bnb_config(BnbSpec(method="nf4", double_quant=False), "cpu")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and not nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.float32  # auto on CPU
    assert nf4.llm_int8_skip_modules is None  # a QLoRA base: transformers' own choice of full-precision modules
    assert bnb_config(BnbSpec(method="llm-int8"), "cpu").load_in_8bit
    with pytest.raises(ModelLoadError, match="50x slower"):
        bnb_config(BnbSpec(compute_dtype="bfloat16"), "cpu")


def test_no_import_cycle_and_no_crossed_private_helpers() -> None:
    def imports(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {f"{node.module}.{a.name}" for a in node.names}
        return found

    assert not [m for m in imports(SRC / "model.py") if m.startswith("bittune.quant")]
    crossed = [(p.name, m) for p in SRC.rglob("*.py") for m in imports(p) if m.rsplit(".", 1)[-1].startswith("_")]
    assert crossed == [], crossed


def test_merging_a_qlora_run_into_4_bits_does_not_default_to_its_own_nf4_grid(tiny_llama_dir: Path) -> None:
    """Re-quantizing ``dequantized NF4 base + LoRA delta`` to NF4 rounds every weight whose delta is under half a
    grid step back onto the base (the demo's tuned perplexity 4.9 went back to the base's 2,876): the default
    4-bit merge of a QLoRA run uses another grid."""
    import bitsandbytes.functional as bnbf

    from bittune.quant.flows import merge_spec

    torch.manual_seed(0)
    w = torch.randn(64, 256)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    base = bnbf.dequantize_4bit(packed, state, blocksize=64, quant_type="nf4")
    tuned = base + 1e-3 * torch.randn_like(base)  # a LoRA-sized change
    codes, _ = bnbf.quantize_4bit(tuned, blocksize=64, quant_type="nf4")
    assert (codes != packed).float().mean() < 0.01  # the same grid points: the fine-tune is (nearly) gone

    qlora = AdapterDir("run/adapter", base=str(tiny_llama_dir), adapter="run/adapter", training_quant=BnbSpec())
    assert merge_spec(qlora, 4, None, None, False) == IntSpec(bits=4)
    assert merge_spec(qlora, 4, "nf4", None, False) == BnbSpec(method="nf4")  # asked for: still possible
    int8 = AdapterDir(
        "r/adapter", base=str(tiny_llama_dir), adapter="r/adapter", training_quant=BnbSpec(method="llm-int8")
    )
    assert merge_spec(int8, 4, None, None, False) == IntSpec(bits=4)


def test_weight_files_are_checked_from_their_headers(tiny_llama_dir: Path, tmp_path: Path):
    """A whole file passes; one cut short, one with a garbled header length, or one that is no safetensors at all
    is refused naming the file; a valid file with no tensors passes."""
    import shutil
    import struct

    from bittune.errors import ModelLoadError
    from bittune.model import check_weight_files

    check_weight_files(tiny_llama_dir)
    weights = (tiny_llama_dir / "model.safetensors").read_bytes()
    for name, content in {
        "cut": weights[: len(weights) - 1],
        "garbled": struct.pack("<Q", 2**60) + weights[8:],
        "text": b"not a safetensors file",
    }.items():
        folder = tmp_path / name
        shutil.copytree(tiny_llama_dir, folder)
        (folder / "model.safetensors").write_bytes(content)
        with pytest.raises(ModelLoadError, match=r"model.safetensors is damaged or incomplete"):
            check_weight_files(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    check_weight_files(empty)
