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


# --- K-quants and IQ types through llama.cpp's own quantizer ------------------------------------------------------

# Per type: the largest max |Δlogit| against transformers running the file's own dequantized weights, as a fraction
# of the logit std (measured on this model: 0.11-0.15 for all of them; llama.cpp quantizes activations to Q8_K in
# these matmuls), and a GGML type the file must hold.
KQUANTS = {
    "q2_k": (0.3, "Q2_K"),
    "q3_k_m": (0.3, "Q3_K"),
    "q4_k_m": (0.3, "Q4_K"),
    "q5_k_m": (0.3, "Q5_K"),
    "q6_k": (0.3, "Q6_K"),
    "iq4_xs": (0.3, "IQ4_XS"),
}


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """Rows of 256 and 512 weights, which K-quants (256-weight super-blocks) hold without fallbacks."""
    return make_tiny(tmp_path_factory.mktemp("wide") / "llama", tokenizer, "llama", hidden=256, init=0.05)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(64))


@pytest.mark.parametrize("qtype", list(KQUANTS))
def test_kquants_load_in_llamacpp_within_their_tolerance(wide_llama: Path, tmp_path: Path, qtype: str) -> None:
    import gguf

    limit, kind = KQUANTS[qtype]
    result = _export(wide_llama, tmp_path / "m.gguf", qtype)
    v = result["verify"]
    assert v["passed"], v["problems"]
    assert v["relative_diff_vs_dequantized"] < limit and 0 < v["weight_error"] <= 1.0, v
    assert kind in result["types"], result["types"]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.file_type"].contents() == int(getattr(gguf.LlamaFileType, "MOSTLY_" + qtype.upper()))


def test_an_iq2_type_with_the_importance_matrix(wide_llama: Path, tmp_path: Path, chat_file: Path) -> None:
    from bittune.export.commands import export_model

    result = export_model(str(wide_llama), fmt="gguf", qtype="iq2_xs", out=tmp_path / "m.gguf", verify=True,
                          imatrix=str(chat_file))  # fmt: skip
    assert result["verify"]["passed"], result["verify"]["problems"]
    assert "IQ2_XS" in result["types"] and result["imatrix"]["tensors"] == 14


def test_the_imatrix_changes_the_quantized_weights(wide_llama: Path, tmp_path: Path, chat_file: Path) -> None:
    import gguf

    from bittune.export.commands import export_model

    other = write_jsonl(tmp_path / "other.jsonl", [{"text": f"In {1990 + i} we paid {i * 12345}."} for i in range(64)])
    files = {}
    for label, imatrix in (("none", None), ("chat", str(chat_file)), ("other", str(other))):
        files[label] = tmp_path / f"{label}.gguf"
        export_model(str(wide_llama), fmt="gguf", qtype="q3_k_m", out=files[label], imatrix=imatrix)
    data = {k: {t.name: bytes(t.data) for t in gguf.GGUFReader(f).tensors} for k, f in files.items()}
    for a, b in (("none", "chat"), ("chat", "other")):
        changed = [n for n in data[a] if data[a][n] != data[b][n]]
        assert len(changed) >= 12, (a, b, changed)  # every quantized block matrix, not only a few
    fields = gguf.GGUFReader(files["chat"]).fields
    assert fields["quantize.imatrix.dataset"].contents() == "chat.jsonl"
    assert fields["quantize.imatrix.entries_count"].contents() == 14
    assert "quantize.imatrix.dataset" not in gguf.GGUFReader(files["none"]).fields


# --- GGUF LoRA adapters -------------------------------------------------------------------------------------------


def _lora_run(model_dir: Path, tmp: Path) -> Path:
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    data = write_jsonl(tmp / "chat.jsonl", color_chat_rows(16))
    raw = {
        "model": {"path": str(model_dir)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "format": "chat", "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 4, "seed": 1, "lr": 0.05},
        "output_dir": str(tmp / "run"),
    }
    return train(config_from_dict(raw), progress=False).run_dir


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_gguf_lora_on_the_base_equals_the_merged_model(models: dict[str, Path], tmp_path: Path, arch: str) -> None:
    from bittune.export.commands import export_model

    run = _lora_run(models[arch], tmp_path)
    result = export_model(str(run), fmt="gguf-lora", qtype="f32", out=tmp_path / "a.gguf", verify=True)
    v = result["verify"]
    assert v["passed"] and v["top1_agreement"] == 1.0 and v["relative_diff"] < 1e-3, v
    assert v["greedy_equal"] and v["tokenization_equal"], v


def test_gguf_lora_without_the_qk_reordering_is_caught(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bittune.errors import BittuneError
    from bittune.export import gguf_lora
    from bittune.export.commands import export_model

    run = _lora_run(models["llama"], tmp_path)
    monkeypatch.setattr(gguf_lora, "permute_for_rotary", lambda w, n: w)  # the adapter only; the base is right
    with pytest.raises(BittuneError, match=re.escape("max |Δlogit|")):
        export_model(str(run), fmt="gguf-lora", qtype="f16", out=tmp_path / "a.gguf", verify=True)
    assert not (tmp_path / "a.gguf").exists()


# --- QAT on llama.cpp's grid ---------------------------------------------------------------------------------------


def test_qat_q4_0_export_computes_the_trained_model_in_llamacpp(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """llama.cpp's logits on the Q4_0 file against transformers running the QAT model as trained (its last stage's
    quantized weights; the tied head, which QAT leaves in float, at the Q8_0 the q4_0 export stores it in)."""
    import numpy as np
    import torch

    from bittune.artifacts import load
    from bittune.config import config_from_dict
    from bittune.quant.ggml_grid import ggml_quantize_dequantize
    from bittune.quant.qat import convert
    from bittune.recipes.finetune import train

    data = write_jsonl(tmp_path / "chat.jsonl", color_chat_rows(32))
    raw = {
        "model": {"path": str(tiny_llama_dir)},
        "method": "qat",
        "qat": {"schedule": [8, 4], "steps_per_stage": 3, "method": "gguf-q4_0"},
        "data": {"train": str(data), "format": "chat", "max_length": 64},
        "train": {"batch_size": 8, "lr": 3e-3, "seed": 1},
        "output_dir": str(tmp_path / "run"),
    }
    run = train(config_from_dict(raw), progress=False).run_dir
    result = _export(run, tmp_path / "m.gguf", "q4_0")
    assert result["verify"]["passed"], result["verify"]["problems"]

    model, tokenizer, _ = load(str(run), device="cpu")
    trained = convert(model, bits=4, group_size=32, symmetric=True, method="gguf-q4_0").eval()
    with torch.no_grad():
        emb = trained.get_input_embeddings().weight
        emb.copy_(ggml_quantize_dequantize(emb, 8))
    import llama_cpp

    ids = tokenizer("What colour is the sky? It is blue and green.", add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, logits_all=True, type_k=0, type_v=0,
                          verbose=False)  # fmt: skip
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    with torch.no_grad():
        want = trained(torch.tensor([ids])).logits[0].numpy()
    # What is left is llama.cpp rounding activations to 8 bits in its Q4_0/Q8_0 matmuls.
    assert np.abs(got - want).max() < 0.5 * want.std() and (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


# --- cross-check against llama.cpp's own converter ----------------------------------------------------------------

# Metadata that changes what llama.cpp does with the file (all of the architecture's hyperparameters are compared too).
BEHAVIOUR_KEYS = (
    "general.architecture",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.chat_template",
)


@pytest.fixture(scope="module")
def llamacpp_src() -> Path:
    """convert_hf_to_gguf.py and its packages, unpacked from the llama-cpp-python source by `make llamacpp-src`."""
    import llama_cpp

    from bittune.cache import cache_dir

    src = cache_dir() / f"llama.cpp-src-{llama_cpp.__version__}"
    if not (src / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's converter is not unpacked at {src}: run `make llamacpp-src`")
    return src


def _converter(src: Path, model_dir: Path, out: Path, outtype: str, pre: str | None) -> None:
    import subprocess
    import sys

    driver = Path(__file__).with_name("llamacpp_convert.py")
    cmd = [sys.executable, str(driver), str(src), pre or "-", str(model_dir), "--outfile", str(out)]
    proc = subprocess.run([*cmd, "--outtype", outtype], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _behaviour(path: Path, texts: tuple[str, ...]) -> list[list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:  # add_bos=True: llama.cpp adds bos only where the file (or its default for the vocabulary) says so
        return [llm.tokenize(t.encode(), add_bos=True, special=True) for t in texts] + [[llm.token_eos()]]
    finally:
        llm.close()


def assert_same_as_converter(ours: Path, theirs: Path) -> None:
    """Every tensor byte-identical, and the metadata that changes behaviour equal."""
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name, t in ta.items():
        u = tb[name]
        assert (t.tensor_type, tuple(t.shape)) == (u.tensor_type, tuple(u.shape)), name
        assert bytes(t.data) == bytes(u.data), name
    arch = a.fields["general.architecture"].contents()
    keys = [k for k in b.fields if k.startswith(f"{arch}.") or k in BEHAVIOUR_KEYS]
    for key in keys:
        if key in (f"{arch}.attention.key_length", f"{arch}.attention.value_length") and key not in a.fields:
            head = (
                b.fields[f"{arch}.embedding_length"].contents() // b.fields[f"{arch}.attention.head_count"].contents()
            )
            assert b.fields[key].contents() == head, key  # what llama.cpp assumes when the key is absent
            continue
        assert key in a.fields and a.fields[key].contents() == b.fields[key].contents(), key
    texts = ("Hello world 12345\n\nsecond", "<|im_start|>user\nhi<|im_end|>")
    assert _behaviour(ours, texts) == _behaviour(theirs, texts)  # incl. add_bos, which we always write


@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_export_equals_llamacpps_converter(
    models: dict[str, Path], llamacpp_src: Path, tmp_path: Path, arch: str, outtype: str
) -> None:
    from transformers import AutoTokenizer

    from bittune.export.commands import export_model
    from bittune.export.tokenizer_meta import check_tokenizer

    export_model(str(models[arch]), fmt="gguf", qtype=outtype, out=tmp_path / "ours.gguf")
    # The tiny test tokenizer is in no published model's table: give the converter the name bittune detected.
    pre = check_tokenizer(AutoTokenizer.from_pretrained(models[arch]))
    _converter(llamacpp_src, models[arch], tmp_path / "theirs.gguf", outtype, pre=pre)
    assert_same_as_converter(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")


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


def test_smollm2_export_equals_llamacpps_converter(smollm2: Path, llamacpp_src: Path, tmp_path: Path) -> None:
    """The converted SmolLM2 folder, through bittune and through llama.cpp's converter, with the converter's own
    tokenizer lookup: it recognises the imported tokenizer as SmolLM's (its hash of a fixed text), which it would
    not if the import had given the tokenizer GPT-2's split."""
    from bittune.export.commands import export_model

    export_model(str(smollm2), fmt="gguf", qtype="q8_0", out=tmp_path / "ours.gguf")
    _converter(llamacpp_src, smollm2, tmp_path / "theirs.gguf", "q8_0", pre=None)
    assert_same_as_converter(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")
