"""GPTQ: the column-wise solver on known matrices, whole models (causal LM and encoder), and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bittune.quant import quantize
from bittune.quant.gptq import HessianCollector, gptq_quantize_weight, inverse_cholesky_upper, layer_output_error
from bittune.quant.intq import dequantize, quantize_codes, quantize_dequantize, quantize_int
from bittune.quant.spec import GptqSpec, IntSpec, spec_from_cli
from tiny import color_chat_rows, run_cli, run_inproc, write_jsonl


def correlated_inputs(n: int = 2048, d: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and a few high-energy ones, as transformer activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5)
    x += 0.1 * torch.randn(n, d, generator=g)
    x[:, :4] *= 10
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    collector = HessianCollector(x.shape[1])
    for chunk in x.split(500):  # several calls: the running mean must equal the one-shot 2/n X^T X
        collector(None, (chunk,))
    return collector.h


def test_hessian_collector_is_two_over_n_xtx() -> None:
    x = correlated_inputs(n=1234, d=16)
    expected = 2 / x.shape[0] * x.double().T @ x.double()
    assert torch.allclose(hessian_of(x), expected, rtol=1e-10, atol=1e-10)


def test_inverse_cholesky_upper_is_the_upper_cholesky_factor_of_the_inverse() -> None:
    h = hessian_of(correlated_inputs(d=96))
    h += torch.eye(96, dtype=h.dtype) * 0.01 * torch.diag(h).mean()
    u = inverse_cholesky_upper(h)
    assert torch.equal(u, u.triu()) and bool((torch.diagonal(u) > 0).all())
    assert torch.allclose(u.T @ u, torch.linalg.inv(h), rtol=1e-9, atol=1e-12)
    # The textbook construction (Cholesky of the explicit inverse), which this replaces.
    textbook = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    assert torch.allclose(u, textbook, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(bits: int) -> None:
    # H diagonal: no column's error can be compensated by another, so GPTQ must pick exactly the RTN codes.
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(2)) + 0.5).double()
    codes, scale, zero = gptq_quantize_weight(w, h, bits=bits, group_size=32)
    assert torch.equal((codes, scale, zero)[0], quantize_int(w, bits, 32)[0])


@pytest.mark.parametrize(("bits", "ratio"), [(4, 0.5), (3, 0.5), (2, 0.6)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_cuts_layer_output_error_against_round_to_nearest(bits: int, ratio: float, act_order: bool) -> None:
    x = correlated_inputs()
    h = hessian_of(x)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    codes, scale, zero = gptq_quantize_weight(w, h, bits=bits, group_size=32, act_order=act_order)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    gptq = layer_output_error(w, dequantize(codes, scale, zero, w.shape), h)
    rtn = layer_output_error(w, quantize_dequantize(w, bits, 32), h)
    assert gptq < ratio * rtn, (gptq, rtn)
    # The definition of the measure: mean squared change of the outputs, times two.
    direct = 2 * ((x.double() @ (w - dequantize(codes, scale, zero, w.shape)).double().T) ** 2).sum() / x.shape[0]
    assert gptq == pytest.approx(float(direct), rel=1e-6)


def test_layers_fed_the_same_input_are_solved_as_one_stack() -> None:
    """q/k/v (or gate/up) see the same input, so the same Hessian: their stacked rows in one pass get exactly the
    codes of a pass each (rows are independent given H), and shared_inputs finds such groups by their Hessians."""
    from bittune.quant.gptq import shared_inputs

    x = correlated_inputs(n=600, d=64)
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(rows, 64, generator=g) for rows in (48, 16, 16)]
    h = hessian_of(x)
    stacked = gptq_quantize_weight(torch.cat(ws), h, bits=3, group_size=16)
    start = 0
    for w in ws:
        alone = gptq_quantize_weight(w, h, bits=3, group_size=16)
        for a, b in zip(alone, stacked, strict=True):
            assert torch.equal(a, b[start : start + w.shape[0]])
        start += w.shape[0]
    collectors = {n: HessianCollector(64) for n in ("q", "k", "o", "v")}
    for name, c in collectors.items():
        c(None, (x if name != "o" else x.flip(0)[:300],))
    assert shared_inputs(list(collectors), collectors) == [["q", "k", "v"], ["o"]]


def test_gptq_values_sit_on_the_stored_grid() -> None:
    # The stored codes reproduce the values GPTQ chose: re-quantizing the dequantized weight gives the same codes.
    x = correlated_inputs(d=64)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) * 0.05
    codes, scale, zero = gptq_quantize_weight(w, hessian_of(x), bits=3, group_size=16, symmetric=True)
    assert torch.equal(quantize_codes(dequantize(codes, scale, zero, w.shape), scale, zero, 3, 16), codes)
    assert torch.equal(scale.half().float(), scale) and torch.all(zero == 4)


def test_dead_inputs_get_zero_weights_and_no_nan() -> None:
    x = correlated_inputs(d=64)
    x[:, 10] = 0  # an input that is never used
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5)) * 0.05
    codes, scale, zero = gptq_quantize_weight(w, hessian_of(x), bits=3, group_size=16)
    deq = dequantize(codes, scale, zero, w.shape)
    assert torch.isfinite(deq).all()
    # The dead column is exactly zero (0 is on every asymmetric grid: lo <= 0 <= hi and the zero point is an
    # integer), though its float weights were not; its neighbours, fed real inputs, keep theirs.
    assert w[:, 10].abs().min() > 0 and torch.equal(deq[:, 10], torch.zeros(16))
    assert (deq[:, 9] != 0).any() and (deq[:, 11] != 0).any()


# ---------------------------------------------------------------------------------------------------------------
# Whole models


def _calibration(seed: int, n: int = 8, length: int = 48, vocab: int = 100) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (1, length), generator=g)} for _ in range(n)]


def _output_error(model, reference, batches) -> float:
    with torch.no_grad():
        return sum(float(((model(**b).logits - reference(**b).logits) ** 2).mean()) for b in batches)


def _load(path: Path, cls_name: str = "AutoModelForCausalLM"):
    import transformers

    kwargs = {"num_labels": 3} if "Sequence" in cls_name else {}
    torch.manual_seed(0)  # a classifier head is newly initialised on load: the same one every time
    return getattr(transformers, cls_name).from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def test_gptq_model_beats_rtn_and_reloads_identically(tiny_llama_dir: Path, tokenizer, tmp_path: Path) -> None:
    from bittune.artifacts import load
    from bittune.quant.io import save_quantized

    reference = _load(tiny_llama_dir)
    calib, held_out = _calibration(0), _calibration(1)
    spec = GptqSpec(bits=3, group_size=16)
    gptq = quantize(_load(tiny_llama_dir), spec, calibration=calib)
    rtn = quantize(_load(tiny_llama_dir), IntSpec(bits=3, group_size=16))
    assert type(gptq.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    assert type(gptq.lm_head).__name__ == "Linear"
    # Better than round-to-nearest on the calibration inputs and on inputs it never saw (a random 32-wide model
    # has nearly uncorrelated inputs, the case where GPTQ gains least: ~20% and ~5-15% here, 2-4 bits, 3 seeds).
    assert _output_error(gptq, reference, calib) < 0.9 * _output_error(rtn, reference, calib)
    assert _output_error(gptq, reference, held_out) < 0.97 * _output_error(rtn, reference, held_out)
    with torch.no_grad():
        expected = gptq(**held_out[0]).logits
    save_quantized(gptq, tmp_path, spec=spec, task="causal-lm", tokenizer=tokenizer)
    reloaded, _, _ = load(str(tmp_path), device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(**held_out[0]).logits, expected)


def test_gptq_encoder_classifier_blocks_take_keyword_inputs(tiny_bert_dir: Path) -> None:
    # BERT blocks get their attention mask by keyword and the pooler sits outside the block stack.
    cls = "AutoModelForSequenceClassification"
    reference = _load(tiny_bert_dir, cls)
    calib = [{"input_ids": b["input_ids"][:, :20]} for b in _calibration(0)]
    gptq = quantize(_load(tiny_bert_dir, cls), GptqSpec(bits=2, group_size=16), calibration=calib)
    rtn = quantize(_load(tiny_bert_dir, cls), IntSpec(bits=2, group_size=16))
    assert type(gptq.bert.pooler.dense).__name__ == "QuantizedLinear"
    assert type(gptq.classifier).__name__ == "Linear"
    assert _output_error(gptq, reference, calib) < _output_error(rtn, reference, calib)


def test_gptq_without_calibration_is_refused(tiny_llama_dir: Path) -> None:
    from bittune.errors import ConfigError

    with pytest.raises(ConfigError, match="needs calibration text") as err:
        quantize(_load(tiny_llama_dir), GptqSpec(bits=3, group_size=16))
    assert "--calib" in err.value.hint


def test_spec_from_cli_gptq() -> None:
    from bittune.errors import ConfigError

    assert spec_from_cli(bits=3, method="gptq") == GptqSpec(bits=3, group_size=64)
    assert spec_from_cli(bits=2, method="gptq", group_size=32, symmetric=True, calibration_tokens=1024) == GptqSpec(
        bits=2, group_size=32, symmetric=True, calibration_tokens=1024
    )
    with pytest.raises(ConfigError, match="--calib-tokens applies to --method gptq"):
        spec_from_cli(bits=3, method="hqq", calibration_tokens=1024)
    with pytest.raises(ConfigError, match="too few"):
        spec_from_cli(bits=3, method="gptq", calibration_tokens=10)


# ---------------------------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(24))


def test_quantize_cli_gptq_calibrates_on_calib_and_reports_it(
    tiny_llama_dir: Path, chat_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_llama_dir), "--bits", "3", "--method", "gptq", "--group-size", "16"]
    argv += ["--calib", str(chat_file), "--calib-tokens", "300", "--eval", str(chat_file), "--device", "cpu"]
    code, err = run_inproc([*argv, "--out", str(out)], capsys)
    assert code == 0, err
    assert "| gptq3-g16 |" in err and "gptq: block 2/2" in err
    report = json.loads((out / "quant_report.json").read_text())
    assert report["spec"]["method"] == "gptq" and report["spec"]["calibration_tokens"] == 300
    assert report["calibration"] == {"data": str(chat_file), "tokens": 300}
    assert report["models"][1]["name"] == "gptq3-g16"
    code, printed, err = run_cli(["eval", str(out), "--data", str(chat_file)], capsys)
    assert code == 0, err
    result, measured = json.loads(printed), report["models"][1]
    assert result["rows"] == measured["rows"] and result["eval_loss"] == pytest.approx(measured["eval_loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ([], "needs calibration text"),  # a plain model folder has no train file to fall back on
        (["--calib", "MISSING"], "MISSING"),
    ],
)
def test_quantize_cli_gptq_bad_calibration(
    extra: list[str], needle: str, tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    extra = [str(tmp_path / "none.jsonl") if e == "MISSING" else e for e in extra]
    needle = "none.jsonl" if needle == "MISSING" else needle
    argv = ["quantize", str(tiny_llama_dir), "--bits", "3", "--method", "gptq", "--group-size", "16"]
    argv += ["--out", str(tmp_path / "o"), *extra]
    code, err = run_inproc(argv, capsys)
    assert code == 2 and err.startswith("error: ") and needle in err and "fix:" in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_calib_with_another_method_is_refused(tiny_llama_dir: Path, chat_file: Path, tmp_path: Path, capsys):
    argv = ["quantize", str(tiny_llama_dir), "--bits", "3", "--method", "int", "--calib", str(chat_file)]
    code, err = run_inproc([*argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--calib applies to --method gptq" in err and not (tmp_path / "o").exists()
