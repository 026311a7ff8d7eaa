"""Post-training quantization: HQQ vs round-to-nearest, the packed layer, save/reload, NF4 codes, merge, compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bittune.quant import quantize
from bittune.quant.intq import dequantize, pack_codes, quantize_dequantize, quantize_int, unpack_codes
from bittune.quant.spec import BnbSpec, CastSpec, GptqSpec, HqqSpec, IntSpec, spec_from_cli
from tiny import color_chat_rows, run_cli, write_jsonl

IDS = torch.tensor([[1, 5, 9, 20, 33, 4, 17, 60, 2, 11]])


def heavy_tailed(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with 1% outliers 8x larger, as trained LLM weights have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[torch.rand(rows, cols, generator=g) < 0.01] *= 8
    return w


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------------------
# Quantizers on random matrices


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.01), (4, 0.14), (3, 0.28), (2, 0.55)])
def test_round_trip_relative_error_is_bounded_per_bit_width(bits: int, bound: float) -> None:
    from bittune.quant.hqq import quantize_hqq

    w = heavy_tailed()
    codes, scale, zero = quantize_hqq(w, bits, 64)
    assert int(codes.max()) <= 2**bits - 1
    assert rel_error(dequantize(codes, scale, zero, w.shape), w) < bound
    assert rel_error(quantize_dequantize(w, bits, 64), w) < bound


@pytest.mark.parametrize("bits", [3, 2])
def test_hqq_beats_round_to_nearest_at_low_bits(bits: int) -> None:
    from bittune.quant.hqq import quantize_hqq

    for seed in range(3):
        w = heavy_tailed(seed=seed)
        rtn = rel_error(quantize_dequantize(w, bits, 64), w)
        codes, scale, zero = quantize_hqq(w, bits, 64)
        hqq = rel_error(dequantize(codes, scale, zero, w.shape), w)
        assert hqq < 0.95 * rtn, (seed, hqq, rtn)


def test_hqq_scales_and_zeros_are_float16_exact() -> None:
    from bittune.quant.hqq import quantize_hqq

    _, scale, zero = quantize_hqq(heavy_tailed(), 3, 32)
    for t in (scale, zero):
        assert torch.equal(t.half().float(), t)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_quantized_linear_fast_unpack_matches_unpack_codes(bits: int) -> None:
    from bittune.quant.linear import _unpack

    codes = torch.randint(0, 2**bits, (1003,), dtype=torch.uint8)  # not a whole number of 8-code words
    packed = pack_codes(codes, bits)
    assert torch.equal(_unpack(packed, bits, 1003), codes)
    assert torch.equal(_unpack(packed, bits, 1003), unpack_codes(packed, bits, 1003))


def test_quantized_linear_computes_with_the_dequantized_weight() -> None:
    from bittune.quant.linear import QuantizedLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24, bias=True)
    codes, scale, zero = quantize_int(lin.weight, 3, 16)
    q = QuantizedLinear.from_codes(lin, codes, scale, zero, bits=3, group_size=16)
    assert q.qweight.numel() == 64 * 24 * 3 // 8  # densely packed: 3 bits per weight
    x = torch.randn(5, 64)
    expected = torch.nn.functional.linear(x, dequantize(codes, scale, zero, lin.weight.shape), lin.bias)
    assert torch.equal(q(x), expected)


# ---------------------------------------------------------------------------------------------------------------
# Specs


def test_spec_from_cli_defaults_and_refusals() -> None:
    from bittune.errors import ConfigError

    assert spec_from_cli(bits=4) == BnbSpec(method="nf4")
    assert spec_from_cli(bits=8) == BnbSpec(method="llm-int8")
    assert spec_from_cli(bits=16) == CastSpec(method="fp16")
    assert spec_from_cli(bits=3, method="gptq").calibration_tokens == 8192  # the README's and --help's default
    # The data-free default at 3 and 2 bits is round-to-nearest, chosen by bench/quant_float_causal.py (README).
    assert spec_from_cli(bits=3) == IntSpec(bits=3, group_size=64)
    assert spec_from_cli(bits=2) == IntSpec(bits=2, group_size=64)
    assert spec_from_cli(bits=3, method="hqq") == HqqSpec(bits=3, group_size=64)
    assert spec_from_cli(bits=3, method="int") == IntSpec(bits=3, group_size=64)
    assert spec_from_cli(bits=2, method="int", group_size=32, symmetric=True) == IntSpec(
        bits=2, group_size=32, symmetric=True
    )
    for kwargs, needle in [
        ({"bits": 3, "method": "nf4"}, "stores 4 bits"),
        ({"bits": 4, "method": "awq"}, "unknown --method"),
        ({"bits": 5}, "not supported"),
        ({"bits": 4, "method": "int", "group_size": 0}, "not a number of columns"),
        ({"bits": 4, "method": "nf4", "group_size": 32}, "applies to --method int|hqq|gptq"),
        ({"bits": 1, "method": "hqq"}, "2..8 bits"),
    ]:
        with pytest.raises(ConfigError, match=needle) as err:
            spec_from_cli(**kwargs)
        assert err.value.hint


# ---------------------------------------------------------------------------------------------------------------
# Whole models: quantize -> save -> reload


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_int_method_stores_exactly_the_qat_quantizer_codes(tiny_llama_dir: Path) -> None:
    from bittune.quant.select import quantizable_linears

    model = _load(tiny_llama_dir)
    originals = {n: lin.weight.detach().clone() for n, lin in quantizable_linears(model)}
    quantize(model, IntSpec(bits=3, group_size=16, symmetric=True))
    for name, w in originals.items():
        layer = model.get_submodule(name)
        codes, scale, zero = quantize_int(w, 3, 16, symmetric=True)
        assert torch.equal(layer.codes(), codes)
        assert torch.equal(layer.scale.float(), scale) and torch.equal(layer.zero.float(), zero)
    assert type(model.lm_head).__name__ == "Linear"  # the head stays full precision


SPECS = {
    "int4": IntSpec(bits=4, group_size=16),
    "int2-sym-row": IntSpec(bits=2, group_size=-1, symmetric=True),
    "hqq3": HqqSpec(bits=3, group_size=16),
    "nf4": BnbSpec(method="nf4"),
    "fp4-no-dq": BnbSpec(method="fp4", double_quant=False),
    "llm-int8": BnbSpec(method="llm-int8"),
    "fp16": CastSpec(method="fp16"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_quantize_save_reload_gives_identical_outputs(
    tiny_llama_dir: Path, tokenizer, tmp_path: Path, name: str
) -> None:
    from bittune.artifacts import load
    from bittune.quant.io import save_quantized

    spec = SPECS[name]
    model = _load(tiny_llama_dir)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    quantize(model, spec)
    reference = model
    if isinstance(spec, CastSpec):
        # CPU computes in float32: the reloaded model is the fp32 model with its weights rounded to fp16.
        reference = _load(tiny_llama_dir)
        for p in reference.parameters():
            p.data = p.data.half().float()
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
    assert not torch.equal(expected, before)  # quantization did something
    save_quantized(model, tmp_path, spec=spec, task="causal-lm", tokenizer=tokenizer)
    del model
    # Through the same loader `bittune eval` / `generate` use, and with no access to the original weights.
    reloaded, _, task = load(str(tmp_path), device="cpu")
    assert task == "causal-lm"
    with torch.no_grad():
        got = reloaded(input_ids=IDS).logits
    assert torch.equal(got, expected)


def test_int_reload_needs_no_original_weights_and_keeps_ties(tiny_llama_dir: Path, tokenizer, tmp_path: Path) -> None:
    import shutil

    from bittune.artifacts import load
    from bittune.quant.io import save_quantized

    copy = tmp_path / "orig"
    shutil.copytree(tiny_llama_dir, copy)
    model = _load(copy)
    quantize(model, IntSpec(bits=4, group_size=16))
    out = tmp_path / "q"
    out.mkdir()
    save_quantized(model, out, spec=IntSpec(bits=4, group_size=16), task="causal-lm", tokenizer=tokenizer)
    shutil.rmtree(copy)
    reloaded = load(out).model
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert all(p.device.type == "cpu" for p in reloaded.parameters())
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


# ---------------------------------------------------------------------------------------------------------------
# NF4: the codes are bitsandbytes' own

NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230731010437,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def nf4_reference_codes(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Plain-torch NF4: per block of 64 values, the nearest of the 16 NF4 levels to ``w / absmax``; packed 2/byte."""
    blocks = w.float().reshape(-1, blocksize)
    normed = blocks / blocks.abs().amax(dim=1, keepdim=True)
    codes = (normed.unsqueeze(-1) - NF4_LEVELS).abs().argmin(dim=-1).reshape(-1).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]  # bitsandbytes: first value in the high nibble


def test_nf4_codes_agree_with_bitsandbytes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from bittune.quant.io import save_quantized

    torch.manual_seed(0)
    w = torch.randn(96, 128)
    bnb_codes, _ = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(nf4_reference_codes(w), bnb_codes.reshape(-1))

    model = _load(tiny_llama_dir)
    original = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    quantize(model, BnbSpec(method="nf4"))
    save_quantized(model, tmp_path, spec=BnbSpec(method="nf4"), task="causal-lm")
    stored = load_file(tmp_path / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    expected, _ = bnb.functional.quantize_4bit(original, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(stored.reshape(-1), expected.reshape(-1))
    assert torch.equal(stored.reshape(-1), nf4_reference_codes(original))


# ---------------------------------------------------------------------------------------------------------------
# Flows: quantize with a report, merge, compare (tiny trained runs)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(24))


def _train(model_dir: Path, data: Path, out: Path, method: str) -> Path:
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    raw = {
        "model": {"path": str(model_dir)},
        "method": method,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "eval": str(data), "format": "chat", "max_length": 64},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 2e-2, "seed": 1, "device": "cpu"},
        "output_dir": str(out),
    }
    if method == "qlora":
        raw["quant"] = {"bits": 4}
    return train(config_from_dict(raw), progress=False).run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, chat_file: Path) -> Path:
    return _train(tiny_llama_dir, chat_file, tmp_path_factory.mktemp("lora") / "run", "lora")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, chat_file: Path) -> Path:
    return _train(tiny_llama_dir, chat_file, tmp_path_factory.mktemp("qlora") / "run", "qlora")


def test_quantize_path_writes_model_and_measured_report(tiny_llama_dir: Path, chat_file: Path, tmp_path: Path):
    from bittune.inference import evaluate_on_data
    from bittune.quant.flows import quantize_path

    out = tmp_path / "q"
    report = quantize_path(str(tiny_llama_dir), HqqSpec(bits=3, group_size=16), out, data=str(chat_file), device="cpu")
    ref, q = report["models"]
    assert q["size_mb"] < ref["size_mb"] and q["weights_in_memory_mb"] < ref["weights_in_memory_mb"]
    assert q["latency_ms"] > 0 and q["tokens_per_s"] > 0
    assert math.isfinite(q["delta"]["loss"]) and q["delta"]["loss"] != 0
    assert q["delta"]["loss"] == pytest.approx(q["eval_loss"] - ref["eval_loss"])
    assert json.loads((out / "quant_report.json").read_text())["models"][1]["name"] == "hqq3-g16"
    assert "| hqq3-g16 |" in (out / "quant_report.md").read_text()
    # `bittune eval` on the folder reproduces the report's number.
    again = evaluate_on_data(str(out), data=str(chat_file))
    assert again["eval_loss"] == pytest.approx(q["eval_loss"], abs=1e-6)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.e2e
def test_merge_into_fp32_equals_adapter_outputs(lora_run: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from bittune.artifacts import load
    from bittune.quant.flows import merge_run

    adapter_model, _, _ = load(str(lora_run), device="cpu")
    expected = _logits(adapter_model)
    assert (expected - _logits(_load(tiny_llama_dir))).abs().max() > 1e-3  # the adapter is not a no-op
    report = merge_run(str(lora_run), tmp_path / "m", device="cpu")
    merged, _, _ = load(str(tmp_path / "m"), device="cpu")
    assert not hasattr(merged, "peft_config")
    assert (_logits(merged) - expected).abs().max() < 1e-4
    assert abs(report["models"][1]["delta"]["loss"]) < 1e-5
    assert report["warnings"] == []


@pytest.mark.e2e
def test_qlora_merge_dequantizes_the_nf4_base_first(qlora_run: Path, tmp_path: Path) -> None:
    from bittune.artifacts import load, resolve

    run = resolve(qlora_run)
    adapter_on_nf4, _, _ = load(run, device="cpu")
    merged, _, _ = load(run, as_="merged", device="cpu")
    assert run.training_quant.method == "nf4"
    assert (_logits(merged) - _logits(adapter_on_nf4)).abs().max() < 1e-4


@pytest.mark.e2e
def test_merge_and_hf_export_of_a_qlora_run_give_equal_weights(qlora_run: Path, tmp_path: Path) -> None:
    """One merge policy: `bittune merge` and `bittune export --format hf` write the same merged model."""
    from safetensors.torch import load_file

    from bittune.export.commands import export_model
    from bittune.quant.flows import merge_run

    merge_run(str(qlora_run), tmp_path / "merged", device="cpu")
    export_model(str(qlora_run), fmt="hf", out=tmp_path / "exported")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert merged.keys() == exported.keys() and len(merged) > 10
    for name, tensor in merged.items():
        assert torch.equal(tensor, exported[name]), name
    # ... and it is the adapter on its dequantized NF4 base, not on the float weights before quantization.
    assert "adapter merged into the dequantized nf4-dq base" in (tmp_path / "exported" / "README.md").read_text()


@pytest.mark.e2e
def test_merge_into_quantized_base_reports_a_measured_delta(qlora_run: Path, tmp_path: Path) -> None:
    from bittune.inference import evaluate_on_data
    from bittune.quant.flows import merge_run

    out = tmp_path / "mq"
    report = merge_run(str(qlora_run), out, into_bits=4, group_size=16, device="cpu")  # the tiny model is 32 wide
    # Not the run's own NF4 grid, which would round the merge back onto its base (test_artifacts.py).
    assert report["spec"]["method"] == "int"
    names = [m["name"] for m in report["models"]]
    assert names == ["adapter on base (as trained)", "merged fp32 (dequantized NF4 base)", "merged int4-g16"]
    final = report["models"][-1]
    assert math.isfinite(final["delta"]["loss"]) and final["delta"]["loss"] != 0
    assert bool(report["warnings"]) == final["delta"]["large"]
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["models"][-1]["delta"] == pytest.approx(final["delta"])
    again = evaluate_on_data(str(out), data=report["data"])
    assert again["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-6)


@pytest.mark.e2e
def test_merge_into_gptq_calibrates_on_the_runs_train_file(lora_run: Path, chat_file: Path, tmp_path: Path) -> None:
    from bittune.quant.flows import merge_run, quantize_path

    report = merge_run(str(lora_run), tmp_path / "mg", into_bits=3, method="gptq", group_size=16, device="cpu")
    assert report["spec"]["method"] == "gptq" and report["models"][-1]["name"] == "merged gptq3-g16"
    assert math.isfinite(report["models"][-1]["delta"]["loss"])
    # quantize on a run dir: the same default calibration text, recorded in the report.
    q = quantize_path(str(lora_run), GptqSpec(bits=3, group_size=16), tmp_path / "q", device="cpu")
    assert q["calibration"]["data"] == str(chat_file) and q["calibration"]["tokens"] > 0


@pytest.mark.e2e
def test_gptq_calibrates_on_the_train_file_and_quality_is_measured_on_the_eval_file(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A run with a train and an eval file of its own: GPTQ calibrates on the train rows (never on the rows it is
    then measured on), quantize and merge measure on the eval rows; a run without an eval file is merged and
    measured on its train file, and says so."""
    from bittune.config import config_from_dict
    from bittune.quant.flows import merge_run, quantize_path
    from bittune.recipes.finetune import train

    train_file = write_jsonl(tmp_path / "train.jsonl", color_chat_rows(16, seed=1))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", color_chat_rows(8, seed=2))
    raw = {
        "model": {"path": str(tiny_llama_dir)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(train_file), "eval": str(eval_file), "format": "chat", "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 2e-2, "seed": 1, "device": "cpu"},
        "output_dir": str(tmp_path / "run"),
    }
    run = train(config_from_dict(raw), progress=False).run_dir
    q = quantize_path(str(run), GptqSpec(bits=3, group_size=16), tmp_path / "q", device="cpu")
    assert q["calibration"]["data"] == str(train_file) and q["data"] == str(eval_file)
    m = merge_run(str(run), tmp_path / "m", into_bits=3, method="gptq", group_size=16, device="cpu")
    assert m["data"] == str(eval_file) and m["calibration"]["data"] == str(train_file)
    del raw["data"]["eval"]
    raw["output_dir"] = str(tmp_path / "run-no-eval")
    bare = train(config_from_dict(raw), progress=False).run_dir
    fallback = merge_run(str(bare), tmp_path / "m2", device="cpu")
    assert fallback["data"] == str(train_file) and any("train file" in n for n in fallback["notes"]), fallback


@pytest.mark.e2e
def test_quantize_path_measures_on_the_runs_eval_file_unless_told_not_to(lora_run: Path, tmp_path: Path) -> None:
    from bittune.quant.flows import quantize_path

    spec = IntSpec(bits=4, group_size=16)
    measured = quantize_path(str(lora_run), spec, tmp_path / "measured", device="cpu")
    assert measured["data"] is not None and "eval_loss" in measured["models"][-1]
    assert "latency_ms" in measured["models"][0] and "latency_ms" in measured["models"][-1]


@pytest.fixture
def loads_without_measuring(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``as_`` of every ``artifacts.load`` call; any quality or latency measurement fails the test."""
    import bittune.artifacts
    import bittune.quant.report

    loads: list[str] = []
    real_load = bittune.artifacts.load

    def counting_load(artifact, as_="trained", **kw):
        loads.append(as_)
        return real_load(artifact, as_=as_, **kw)

    def no_measure(*a, **kw):
        raise AssertionError("measure() called although measure=False")

    monkeypatch.setattr(bittune.artifacts, "load", counting_load)
    monkeypatch.setattr(bittune.quant.report, "measure", no_measure)
    return loads


def test_quantize_path_without_measuring_loads_once_and_measures_nothing(
    lora_run: Path, tmp_path: Path, loads_without_measuring: list[str]
) -> None:
    """measure=False is for a caller that measures the quantized model itself: no pass over data, no latency runs,
    no reload of the saved folder, and the adapter run is loaded once (merged), not once as trained and again."""
    from bittune.quant.flows import quantize_path

    bare = quantize_path(str(lora_run), IntSpec(bits=4, group_size=16), tmp_path / "bare", measure=False, device="cpu")
    assert loads_without_measuring == ["merged"]
    assert bare["data"] is None and [set(m) for m in bare["models"]] == [{"name", "size_mb"}] * 2
    assert bare["models"][-1]["size_mb"] > 0
    assert (tmp_path / "bare" / "quant_report.json").exists()


def test_merge_without_measuring_loads_the_merged_model_once_and_measures_nothing(
    lora_run: Path, tmp_path: Path, loads_without_measuring: list[str]
) -> None:
    """The same for merge_run (the quick demo measures the merged model's quantized forms in its report): the run
    is loaded once, merged, and written with its report; the adapter is not loaded as trained to measure it."""
    from safetensors.torch import load_file

    from bittune.export.commands import export_model
    from bittune.quant.flows import merge_run

    bare = merge_run(str(lora_run), tmp_path / "m", measure=False, device="cpu")
    assert loads_without_measuring == ["merged"]
    assert bare["data"] is None and [set(m) for m in bare["models"]] == [{"name", "size_mb"}] * 2
    assert bare["models"][-1]["size_mb"] > 0 and (tmp_path / "m" / "merge_report.json").exists()
    export_model(str(lora_run), fmt="hf", out=tmp_path / "exported")  # the merge policy's weights, written once more
    merged, exported = (
        load_file(tmp_path / "m" / "model.safetensors"),
        load_file(tmp_path / "exported" / "model.safetensors"),
    )
    assert merged.keys() == exported.keys() and all(torch.equal(merged[k], exported[k]) for k in merged)


@pytest.mark.e2e
def test_compare_writes_table_json_and_png(tiny_llama_dir: Path, lora_run: Path, chat_file: Path, tmp_path: Path):
    from bittune.compare import compare_models
    from bittune.quant.flows import quantize_path

    q = tmp_path / "int4"
    quantize_path(str(tiny_llama_dir), IntSpec(bits=4, group_size=16), q, device="cpu")
    out = tmp_path / "cmp"
    result = compare_models([str(tiny_llama_dir), str(lora_run), str(q)], data=str(chat_file), out=out, device="cpu")
    kinds = [m["kind"] for m in result["models"]]
    assert kinds == ["full precision", "adapter", "int4-g16"]
    for m in result["models"]:
        assert m["eval_perplexity"] > 1 and m["tokens_per_s"] > 0 and m["load_s"] >= 0
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert (out / "compare.md").read_text().count("\n| ") == 4  # header + 3 models


@pytest.mark.parametrize(
    ("task", "other", "large"),
    [
        ("causal-lm", {"eval_loss": 2.0199, "eval_perplexity": math.exp(2.0199)}, False),
        ("causal-lm", {"eval_loss": 2.0201, "eval_perplexity": math.exp(2.0201)}, True),
        ("causal-lm", {"eval_loss": float("nan"), "eval_perplexity": float("nan")}, True),
        ("classification", {"eval_loss": 2.0, "eval_accuracy": 0.891}, False),
        ("classification", {"eval_loss": 2.0, "eval_accuracy": 0.889}, True),
    ],
)
def test_large_change_threshold_is_the_one_the_readme_states(task: str, other: dict, large: bool) -> None:
    """README: a warning "when it is large (over ~2% perplexity or 1 point of accuracy)"."""
    from bittune.quant.report import quality_delta

    reference = {"eval_loss": 2.0, "eval_perplexity": math.exp(2.0), "eval_accuracy": 0.9}
    delta = quality_delta(reference, other, task)
    assert delta["large"] is large
    if task == "causal-lm" and math.isfinite(other["eval_loss"]):
        assert delta["perplexity_pct"] == pytest.approx(2.0, abs=0.05)  # the threshold sits at ~2% perplexity


@pytest.mark.e2e
def test_merge_into_quantized_warns_on_a_large_change(lora_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m2"
    argv = ["merge", str(lora_run), "--out", str(out), "--into-quantized", "2", "--method", "int", "--group-size", "16"]
    code, _, err = run_cli([*argv, "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads((out / "merge_report.json").read_text())
    final = report["models"][-1]
    assert final["name"] == "merged int2-g16" and final["delta"]["large"] and final["delta"]["loss"] > 0.02
    (warning,) = report["warnings"]
    assert warning.startswith("merged int2-g16 changed quality against the adapter on its base: perplexity +")
    assert f"warning: {warning}" in " ".join(err.split())  # printed, as the terminal wraps it
