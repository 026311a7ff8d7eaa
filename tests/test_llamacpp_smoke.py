"""The default tier's llama.cpp smoke checks: they run whenever llama-cpp-python is importable (`make test` installs
it from ../shared/wheels when a wheel is there); the full llama.cpp tier is test_export_llamacpp.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: the llama.cpp checks need `make llamacpp`")


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    from bittune.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


def test_tiny_llama_f16_verified_in_llamacpp(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    result = _cli(
        ["export", str(tiny_llama_dir), "--type", "f16", "--out", str(tmp_path / "m.gguf"), "--verify"], capsys
    )
    v = result["verify"]
    assert v["passed"] and v["tokenization_equal"] and v["top1_agreement"] == 1.0, v
    assert v["relative_diff"] < 0.02 and v["greedy_equal"] and v["eos_id_gguf"] == v["eos_id_hf"], v
    assert (tmp_path / "m.gguf").is_file()


def test_a_quantized_folder_runs_in_llamacpp_as_it_computes(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    """`bittune quantize` -> `export --verify`: llama.cpp computes what the quantized folder computes."""
    import gguf
    import numpy as np

    from bittune.artifacts import load
    from bittune.export.gguf_writer import permute_for_rotary

    q = tmp_path / "q"
    _cli(["quantize", str(tiny_llama_dir), "--bits", "3", "--method", "int", "--group-size", "32", "--out", str(q)],
         capsys)  # fmt: skip
    result = _cli(["export", str(q), "--type", "f32", "--out", str(tmp_path / "q.gguf"), "--verify"], capsys)
    v = result["verify"]
    assert result["dequantized_from"] == "int3-g32" and v["passed"] and v["max_abs_logit_diff"] < 1e-3, v
    model = load(q, as_="merged", device="cpu").model  # the quantized folder's values as float weights
    want = permute_for_rotary(model.model.layers[0].self_attn.q_proj.weight.detach().numpy(), 4)
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}["blk.0.attn_q.weight"]
    assert np.array_equal(np.asarray(stored.data).reshape(want.shape), want)  # the 3-bit values, exactly
