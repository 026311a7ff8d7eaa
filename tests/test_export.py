"""GGUF and Hugging Face export, model card and push, checked without llama.cpp (that tier: test_export_llamacpp.py).

The GGUF of a tiny model is read back with gguf's own reader: tensor names, shapes, types, metadata (tokenizer,
chat template, eos), the rotary Q/K reordering, and the Q8_0/Q4_0 blocks within their format's error bound.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tiny import (
    CHATML_TEMPLATE,
    GPT2_PRE,
    SMOLLM_PRE,
    color_chat_rows,
    make_tiny,
    run_cli,
    split_then_bytelevel,
    tokenizer_with_pre,
    write_jsonl,
)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A finished 3-step LoRA run on the tiny Llama, with an eval file (so the card has metrics)."""
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    tmp = tmp_path_factory.mktemp("export-run")
    data = write_jsonl(tmp / "chat.jsonl", color_chat_rows(16))
    raw = {
        "model": {"path": str(tiny_llama_dir)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "eval": str(data), "format": "chat", "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 4, "seed": 1, "lr": 0.05},
        "output_dir": str(tmp / "run"),
    }
    return train(config_from_dict(raw), progress=False).run_dir


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    """The tiny Llama exported in every type through the library call the CLI uses."""
    from bittune.export.commands import export_model

    out = tmp_path_factory.mktemp("gguf")
    return {
        t: Path(export_model(str(tiny_llama_dir), fmt="gguf", qtype=t, out=out / f"tiny-{t}.gguf")["path"])
        for t in ("f32", "f16", "q8_0", "q4_0")
    }


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def _tensors(reader) -> dict:
    """name -> (numpy array in HF (rows, cols) order, GGML type name), dequantized."""
    import gguf

    out = {}
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists dimensions innermost first
        out[t.name] = (gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), t.tensor_type.name)
    return out


def _hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of the export's rotary reordering (written independently: pairs back to halves)."""
    head = w.shape[0] // n_heads
    return w.reshape(n_heads, head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_permute_for_rotary_interleaves_the_halves_of_each_head() -> None:
    from bittune.export.gguf_writer import permute_for_rotary

    rows = np.arange(8).reshape(8, 1)  # two heads of 4: [0 1 | 2 3], [4 5 | 6 7]
    assert permute_for_rotary(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert permute_for_rotary(np.arange(8), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]  # biases too


def test_gguf_reads_back_with_tensors_metadata_and_tokenizer(ggufs: dict[str, Path], tiny_llama_dir: Path, tokenizer):
    import gguf

    reader = gguf.GGUFReader(str(ggufs["f32"]))
    f = _fields(reader)
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 32, 64)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.dimension_count"] == 8 and f["llama.rope.freq_base"] == 10000.0
    assert f["llama.context_length"] == 256
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    # tokenizer
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tokenizer) == 300
    assert tokens[tokenizer.convert_tokens_to_ids("<|im_end|>")] == "<|im_end|>"
    assert tokens[10] == tokenizer.convert_ids_to_tokens(10)
    types = f["tokenizer.ggml.token_type"]
    for special in ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"):
        assert types[tokenizer.convert_tokens_to_ids(special)] == gguf.TokenType.CONTROL, special
    assert types[50] == gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>") == 4
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.padding_token_id"] == 0
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == CHATML_TEMPLATE
    # tensors: tied embeddings -> no output.weight; every HF weight present with the right shape
    tensors = _tensors(reader)
    hf = _hf_weights(tiny_llama_dir)
    assert "output.weight" not in tensors and len(tensors) == len(hf) - ("lm_head.weight" in hf)
    assert tensors["token_embd.weight"][0].shape == (300, 32)
    assert tensors["blk.1.attn_k.weight"][0].shape == (16, 32)  # 2 kv heads x head_dim 8
    assert tensors["blk.0.ffn_down.weight"][0].shape == (32, 64)
    np.testing.assert_array_equal(tensors["token_embd.weight"][0], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(tensors["blk.0.ffn_gate.weight"][0], hf["model.layers.0.mlp.gate_proj.weight"])
    # Q/K reordered for llama.cpp's interleaved rotary; V and O untouched
    q, k = tensors["blk.0.attn_q.weight"][0], tensors["blk.0.attn_k.weight"][0]
    assert not np.array_equal(q, hf["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(_unpermute(q, 4), hf["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(_unpermute(k, 2), hf["model.layers.0.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight"][0], hf["model.layers.0.self_attn.v_proj.weight"])


@pytest.mark.parametrize(
    ("qtype", "matrix_type", "file_type"),
    [("f16", "F16", "MOSTLY_F16"), ("q8_0", "Q8_0", "MOSTLY_Q8_0"), ("q4_0", "Q4_0", "MOSTLY_Q4_0")],
)
def test_types_and_error_bounds(ggufs: dict[str, Path], qtype: str, matrix_type: str, file_type: str) -> None:
    """Each type stores matrices as promised, 1-D tensors as F32, and every value within the format's bound."""
    import gguf

    ref = _tensors(gguf.GGUFReader(str(ggufs["f32"])))
    reader = gguf.GGUFReader(str(ggufs[qtype]))
    assert _fields(reader)["general.file_type"] == getattr(gguf.LlamaFileType, file_type)
    got = _tensors(reader)
    assert got.keys() == ref.keys()
    for name, (values, kind) in got.items():
        exact, _ = ref[name]
        if exact.ndim == 1:
            assert kind == "F32", name
            np.testing.assert_array_equal(values, exact)
            continue
        # q4_0 keeps the output projection (here the tied embedding) at Q8_0
        expected = "Q8_0" if qtype == "q4_0" and name == "token_embd.weight" else matrix_type
        assert kind == expected, name
        err = np.abs(values - exact)
        if kind == "F16":
            assert (err <= np.abs(exact) * 2**-11 + 6e-8).all(), name
            continue
        # Per block of 32: scale d = amax/127 (Q8_0, rounding error <= d/2) or amax/8 (Q4_0, <= d: the largest
        # value maps to -8 and the opposite end is clipped to 7). d is stored as fp16 (relative error <= 2**-11),
        # which moves a code q by at most |q| * d * 2**-11 (|q| <= 127 or 8).
        amax = np.abs(exact.reshape(-1, 32)).max(axis=1, keepdims=True)
        d, rounding, qmax = (amax / 127, 0.5, 127) if kind == "Q8_0" else (amax / 8, 1.0, 8)
        bound = d * (rounding + qmax * 2**-11) + 1e-7
        assert (err.reshape(-1, 32) <= bound).all(), name
        assert err.max() > 0, f"{name}: a quantized tensor identical to the original is not quantized"


def test_gguf_of_a_lora_run_holds_the_merged_weights(lora_run: Path, tmp_path: Path) -> None:
    import gguf
    import torch

    from bittune.artifacts import load
    from bittune.export.commands import export_model

    result = export_model(str(lora_run), fmt="gguf", qtype="f32", out=tmp_path / "run.gguf")
    assert result["merged_adapter"] is True
    model, _, _ = load(str(lora_run))
    merged = model.merge_and_unload().state_dict()
    tensors = _tensors(gguf.GGUFReader(str(tmp_path / "run.gguf")))
    base = _hf_weights(
        Path(json.loads((lora_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"])
    )
    name = "model.layers.0.mlp.up_proj.weight"
    assert not np.allclose(merged[name].numpy(), base[name]), "the LoRA run did not change the weights"
    np.testing.assert_allclose(tensors["blk.0.ffn_up.weight"][0], merged[name].numpy(), atol=1e-6)
    q = merged["model.layers.1.self_attn.q_proj.weight"].numpy()
    np.testing.assert_allclose(_unpermute(tensors["blk.1.attn_q.weight"][0], 4), q, atol=1e-6)
    assert torch.is_tensor(merged[name])
    # Exported again to the same file: an earlier GGUF there is replaced (a user's other file never is).
    again = export_model(str(lora_run), fmt="gguf", qtype="q8_0", out=tmp_path / "run.gguf")
    assert again["path"] == str(tmp_path / "run.gguf") and gguf.GGUFReader(str(tmp_path / "run.gguf")).tensors


def test_qwen2_keeps_qk_layout_and_biases_mistral_maps_to_llama(tmp_path: Path, tokenizer) -> None:
    import gguf

    from bittune.export.commands import export_model

    qwen = make_tiny(tmp_path / "qwen2", tokenizer, "qwen2")
    export_model(str(qwen), fmt="gguf", qtype="f32", out=tmp_path / "q.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    assert _fields(reader)["general.architecture"] == "qwen2"
    tokens, types = _fields(reader)["tokenizer.ggml.tokens"], _fields(reader)["tokenizer.ggml.token_type"]
    assert len(tokens) == 304 and tokens[303] == "[PAD303]" and types[303] == gguf.TokenType.UNUSED
    t, hf = _tensors(reader), _hf_weights(qwen)
    np.testing.assert_array_equal(t["blk.0.attn_q.weight"][0], hf["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(t["blk.1.attn_k.bias"][0], hf["model.layers.1.self_attn.k_proj.bias"])

    mistral = make_tiny(tmp_path / "mistral", tokenizer, "mistral")
    export_model(str(mistral), fmt="gguf", qtype="f16", out=tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert _fields(reader)["general.architecture"] == "llama"
    assert "output.weight" in _tensors(reader)  # untied head is written


@pytest.mark.parametrize(
    ("pre_tokenizer", "expected"),
    [(GPT2_PRE, "gpt-2"), (SMOLLM_PRE, "smollm"), ({"type": "Whitespace"}, None)],
)
def test_pre_tokenizer_detection(pre_tokenizer: dict, expected: str | None) -> None:
    from bittune.export.tokenizer_meta import detect_pre

    assert detect_pre({"pre_tokenizer": pre_tokenizer, "normalizer": None}) == expected


def test_split_regex_pre_tokenizers_map_to_llama3_and_qwen2() -> None:
    from bittune.export.tokenizer_meta import _LLAMA3_REGEX, _QWEN2_REGEX, detect_pre

    for regex, name in ((_LLAMA3_REGEX, "llama-bpe"), (_QWEN2_REGEX, "qwen2")):
        tok = tokenizer_with_pre(split_then_bytelevel(regex))
        assert tok("year 2024").input_ids  # the regex is valid for the tokenizers library
        assert detect_pre(json.loads(tok.backend_tokenizer.to_str())) == name
    other = split_then_bytelevel(_QWEN2_REGEX.replace("\\p{N}|", "\\p{N}{1,2}|"))
    assert detect_pre({"pre_tokenizer": other}) is None, "an unknown split regex must be refused, not guessed"


def test_hf_export_of_a_lora_run_reloads_with_the_same_outputs_and_a_card(lora_run: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from bittune.artifacts import load
    from bittune.export.commands import export_model

    out = tmp_path / "hf"
    result = export_model(str(lora_run), fmt="hf", out=out)
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md", "generation_config.json"} <= set(
        result["files"]
    )
    assert not list(out.glob("adapter_*")), "a merged export must not be an adapter"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHATML_TEMPLATE
    assert GenerationConfig.from_pretrained(out).eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    peft_model, _, _ = load(str(lora_run))
    ids = torch.tensor([tok("What color is the sky?").input_ids])
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)

    card = (out / "README.md").read_text()
    summary = json.loads((lora_run / "summary.json").read_text())
    assert "library_name: transformers" in card and "| method | lora |" in card and "| lora.r | 4 |" in card
    assert "| max_steps | 3 |" in card and "| lr | 0.05 |" in card
    assert f"| eval_loss | {summary['eval_loss']:.4g} |" in card
    assert "train loss (last logged)" in card and "| train | chat.jsonl |" in card
    assert str(tmp_path) not in card and "/tmp" not in card, "a card must not leak local paths"
    # A second export to the same folder replaces the first (it carries bittune's marker).
    export_model(str(lora_run), fmt="hf", out=out)


def test_card_of_a_quantize_or_merge_folder_carries_its_measured_report(lora_run: Path, tmp_path: Path) -> None:
    """An HF export of a ``bittune quantize`` folder (and of a ``bittune merge --into-quantized`` one) puts the report
    that command measured into the card: each model's size and quality change against its reference."""
    from bittune.export.commands import export_model
    from bittune.quant.flows import merge_run, quantize_path
    from bittune.quant.spec import IntSpec

    data = str(lora_run / "chat.jsonl") if (lora_run / "chat.jsonl").is_file() else None
    quantize_path(str(lora_run), IntSpec(bits=4, group_size=16), tmp_path / "q", data=data, device="cpu")
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    export_model(str(tmp_path / "q"), fmt="hf", out=tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "## Quantization" in card and "int4-g16 quantization of run, as measured by bittune" in card, card
    quantized = report["models"][-1]
    assert quantized["name"] == "int4-g16" and quantized["delta"], report  # measured: the card shows its change
    row = next(line for line in card.splitlines() if line.startswith("| int4-g16 |"))
    assert f"{quantized['size_mb']:.2f}" in row and f"{quantized['delta']['perplexity_pct']:+.2f}% ppl" in row
    assert "/tmp" not in card and "chat.jsonl" in card  # local paths are reduced to their names in a card

    merge_run(str(lora_run), tmp_path / "mq", into_bits=4, method="int", group_size=16, device="cpu")
    export_model(str(tmp_path / "mq"), fmt="hf", out=tmp_path / "hf-merged")
    card = (tmp_path / "hf-merged" / "README.md").read_text()
    assert "## Quantization" in card and "| merged int4-g16 |" in card, card
    # A plain run's export has no such section.
    export_model(str(lora_run), fmt="hf", out=tmp_path / "hf-run")
    assert "## Quantization" not in (tmp_path / "hf-run" / "README.md").read_text()


def hf_api_binder() -> Callable[..., dict[str, Any]]:
    """``bind(method, *args, **kw)``: a call to ``HfApi.<method>`` bound to the real signature (taken now, before
    the test replaces the method), as the arguments it would receive; TypeError where the real call would fail."""
    import huggingface_hub

    real = {m: inspect.signature(getattr(huggingface_hub.HfApi, m)) for m in ("create_repo", "upload_folder")}

    def bind(method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        bound = real[method].bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    return bind


def test_push_uploads_the_staged_folder_and_never_writes_the_token(
    lora_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The network call is replaced; everything up to it runs for real."""
    import huggingface_hub

    from bittune.cli import main

    secret = "hf_" + "x7" * 17
    monkeypatch.setenv("HF_TOKEN", secret)
    calls: dict[str, dict] = {}
    bound_call = hf_api_binder()

    def create_repo(*args, **kw):
        calls["create_repo"] = bound_call("create_repo", *args, **kw)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{calls['create_repo']['repo_id']}")

    def upload_folder(*args, **kw):
        call = bound_call("upload_folder", *args, **kw)
        folder = Path(call["folder_path"])
        calls["upload_folder"] = {**call, "files": {p.name: p.read_bytes() for p in folder.iterdir()}}

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    main(["push", str(lora_run), "--repo", "alice/tiny-colors", "--private"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["repo"] == "alice/tiny-colors" and printed["private"] is True
    assert printed["url"] == "https://huggingface.co/alice/tiny-colors"
    assert calls["create_repo"]["repo_id"] == "alice/tiny-colors" and calls["create_repo"]["repo_type"] == "model"
    assert calls["create_repo"]["private"] is True and calls["create_repo"]["exist_ok"] is True
    assert calls["create_repo"]["token"] is None  # huggingface_hub finds the token itself; bittune never holds it
    files = calls["upload_folder"]["files"]
    assert calls["upload_folder"]["repo_id"] == "alice/tiny-colors" and calls["upload_folder"]["repo_type"] == "model"
    assert calls["upload_folder"]["path_in_repo"] is None and calls["upload_folder"]["token"] is None
    assert {"README.md", "model.safetensors", "tokenizer.json", "config.json"} <= files.keys()
    assert b"# alice/tiny-colors" in files["README.md"]
    assert not any(secret.encode() in data for data in files.values())
    assert not Path(calls["upload_folder"]["folder_path"]).exists(), "the staging folder is removed"


@pytest.mark.parametrize("failing", ["create_repo", "upload_folder"])
def test_push_failure_is_one_clean_error_without_the_token(
    lora_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], failing: str
) -> None:
    """A refused upload: exit 2, one error line, no traceback, no token in any output, the staging folder removed."""
    import huggingface_hub

    secret = "hf_" + "q4" * 17
    monkeypatch.setenv("HF_TOKEN", secret)
    staged: list[Path] = []
    bound_call = hf_api_binder()

    def create_repo(*args, **kw):
        call = bound_call("create_repo", *args, **kw)
        if failing == "create_repo":
            # As an HTTP client error may echo the request: the token must not reach the user's terminal or logs.
            raise OSError(f"401 Unauthorized for {call['repo_id']} (Authorization: Bearer {secret})")
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{call['repo_id']}")

    def upload_folder(*args, **kw):
        staged.append(Path(bound_call("upload_folder", *args, **kw)["folder_path"]))
        raise ConnectionError(f"connection reset while sending with token={secret}\nsecond line")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    code, out, err = run_cli(["push", str(lora_run), "--repo", "alice/tiny-colors"], capsys)
    assert code == 2, err
    assert "Traceback" not in err and secret not in err and secret not in out
    message = err[err.index("error: ") :]
    assert message.startswith("error: upload to alice/tiny-colors failed"), err
    assert ("OSError: 401 Unauthorized" if failing == "create_repo" else "ConnectionError: connection reset") in message
    assert "\n  fix: " in message and "second line" not in message
    assert staged == [] if failing == "create_repo" else (len(staged) == 1 and not staged[0].exists())
    assert out == ""


def test_push_dry_run_stages_the_folder(lora_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from bittune.export.push import push_to_hub

    def no_network(*a, **k):
        raise AssertionError("a dry run must not touch the network")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    result = push_to_hub(str(lora_run), "alice/tiny", dry_run=tmp_path / "staged")
    assert result["dry_run"] and (tmp_path / "staged" / "README.md").is_file()


def test_hf_export_of_a_lora_classifier_run(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """A classification run merges too (its head is a saved module) and reloads with its labels."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bittune.artifacts import load
    from bittune.config import config_from_dict
    from bittune.export.commands import export_model
    from tiny import sentiment_rows

    raw = {
        "model": {"path": str(tiny_bert_dir), "task": "classification"},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(write_jsonl(tmp_path / "s.jsonl", sentiment_rows(16))), "format": "classification"},
        "train": {"max_steps": 2, "batch_size": 4, "seed": 1},
        "output_dir": str(tmp_path / "run"),
    }
    from bittune.recipes.finetune import train

    run = train(config_from_dict(raw), progress=False).run_dir
    export_model(str(run), fmt="hf", out=tmp_path / "hf")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert reloaded.config.id2label == {0: "neg", 1: "pos"}
    peft_model, _, _ = load(str(run))
    enc = AutoTokenizer.from_pretrained(tmp_path / "hf")(["good movie, the sky"], return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(reloaded.eval()(**enc).logits, peft_model(**enc).logits, atol=1e-5, rtol=1e-5)
    assert "pipeline_tag: text-classification" in (tmp_path / "hf" / "README.md").read_text()


def test_eos_is_where_generation_stops_with_the_tokenizers_own_first() -> None:
    from types import SimpleNamespace as NS

    from bittune.export.tokenizer_meta import eos_ids

    tok = NS(eos_token_id=9)
    assert eos_ids(NS(eos_token_id=1), NS(eos_token_id=[1, 8, 9]), tok) == [9, 1, 8]  # Llama 3 Instruct style
    assert eos_ids(NS(eos_token_id=1), NS(eos_token_id=2), tok) == [2]  # the generation config wins
    assert eos_ids(NS(eos_token_id=3), NS(eos_token_id=None), tok) == [3]
    assert eos_ids(NS(eos_token_id=None), None, tok) == [9]


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_of_a_quantized_folder_writes_its_quantized_values(
    fmt: str, tiny_llama_dir: Path, tokenizer, tmp_path: Path
) -> None:
    # A `bittune quantize` folder stores packed codes: read as a plain model it would load random weights.
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from bittune.artifacts import load
    from bittune.export.commands import export_model
    from bittune.quant import quantize
    from bittune.quant.io import save_quantized
    from bittune.quant.spec import GptqSpec

    spec = GptqSpec(bits=3, group_size=16)
    calib = [
        {"input_ids": torch.randint(3, 100, (1, 48), generator=torch.Generator().manual_seed(i))} for i in range(4)
    ]
    model = quantize(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), spec, calibration=calib)
    folder = tmp_path / "q"
    folder.mkdir()
    save_quantized(model, folder, spec=spec, task="causal-lm", tokenizer=tokenizer)
    quantized = load(folder).model
    original = _hf_weights(tiny_llama_dir)
    name = "model.layers.0.self_attn.v_proj.weight"
    v = quantized.get_submodule(name.removesuffix(".weight")).dequantized_weight().numpy()
    assert not np.allclose(v, original[name])
    ids = torch.tensor([[1, 5, 9, 20, 33, 4]])
    if fmt == "hf":
        result = export_model(str(folder), fmt="hf", out=tmp_path / "hf")
        assert result["files"] and "gptq3-g16 quantized values" in (tmp_path / "hf" / "README.md").read_text()
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        with torch.inference_mode():
            torch.testing.assert_close(reloaded(ids).logits, quantized(ids).logits, atol=1e-5, rtol=1e-5)
    else:
        result = export_model(str(folder), fmt="gguf", qtype="f32", out=tmp_path / "q.gguf")
        assert result["dequantized_from"] == "gptq3-g16"
        tensors = _tensors(gguf.GGUFReader(str(tmp_path / "q.gguf")))
        np.testing.assert_array_equal(tensors["blk.0.attn_v.weight"][0], v)


def test_hf_export_of_an_nf4_folder_holds_its_dequantized_weights(tiny_llama_dir: Path, tokenizer, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from bittune.artifacts import load
    from bittune.export.commands import export_model
    from bittune.quant import quantize
    from bittune.quant.io import save_quantized
    from bittune.quant.spec import BnbSpec

    spec = BnbSpec(method="nf4")
    folder = tmp_path / "q"
    folder.mkdir()
    save_quantized(quantize(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), spec), folder, spec=spec,
                   task="causal-lm", tokenizer=tokenizer)  # fmt: skip
    quantized = load(folder).model
    export_model(str(folder), fmt="hf", out=tmp_path / "hf")  # transformers must not try to re-pack bnb weights
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert getattr(reloaded.config, "quantization_config", None) is None
    ids = torch.tensor([[1, 5, 9, 20, 33, 4]])
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, quantized(ids).logits, atol=1e-5, rtol=1e-5)
