"""GGUF the way people ship it, the parts that need no llama.cpp: importance matrix, GGUF LoRA layout, refusals,
names. (llama.cpp itself loads the results in test_export_llamacpp.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny import color_chat_rows, write_jsonl


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    tmp = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(tmp / "chat.jsonl", color_chat_rows(16))
    raw = {
        "model": {"path": str(tiny_llama_dir)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "format": "chat", "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 4, "seed": 1, "lr": 0.05},
        "output_dir": str(tmp / "run"),
    }
    return train(config_from_dict(raw), progress=False).run_dir


# --- importance matrix ------------------------------------------------------------------------------------------


def test_imatrix_sums_the_squared_inputs_of_each_linear_under_llamacpp_names(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from bittune.export.imatrix import collect_imatrix, gguf_linear_names

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    names = gguf_linear_names(model)
    assert names["model.layers.1.mlp.down_proj"] == "blk.1.ffn_down.weight"
    assert names["model.layers.0.self_attn.q_proj"] == "blk.0.attn_q.weight"
    assert len(names) == 7 * model.config.num_hidden_layers and "lm_head" not in names  # no --process-output

    batches = [{"input_ids": torch.tensor([[1, 5, 9, 13, 2, 7]])}, {"input_ids": torch.tensor([[4, 4, 8]])}]
    seen: list[torch.Tensor] = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    imatrix = collect_imatrix(model, batches, names)
    hook.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    assert imatrix.counts["blk.1.ffn_down.weight"] == 9 and imatrix.chunks == 2
    np.testing.assert_allclose(imatrix.sums["blk.1.ffn_down.weight"], (x * x).sum(0).numpy(), rtol=1e-12)
    mean = imatrix.mean_squares()["blk.1.ffn_down.weight"]
    assert mean.dtype == np.float32 and np.allclose(mean, (x * x).mean(0).numpy(), rtol=1e-6)


def test_imatrix_comes_from_the_named_data(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bittune.export.imatrix import compute_for_export

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    a = write_jsonl(tmp_path / "a.jsonl", color_chat_rows(8))
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"numbers {i} {i * 7} and more words {i}"} for i in range(20)])
    ma = compute_for_export(str(tiny_llama_dir), model, tok, str(a), tokens=256)
    mb = compute_for_export(str(tiny_llama_dir), model, tok, str(b), tokens=256)
    assert ma.dataset == "a.jsonl" and mb.dataset == "b.jsonl"
    name = "blk.0.ffn_up.weight"
    assert not np.allclose(ma.sums[name] / ma.counts[name], mb.sums[name] / mb.counts[name])
    assert ma.metadata() == {"dataset": "a.jsonl", "entries_count": 14, "chunks_count": 1}


def test_imatrix_gguf_file_round_trip(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from bittune.export.imatrix import (
        collect_imatrix,
        gguf_linear_names,
        is_imatrix_gguf,
        read_imatrix_gguf,
        write_imatrix_gguf,
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    m = collect_imatrix(model, [{"input_ids": torch.tensor([[1, 5, 9, 13]])}], gguf_linear_names(model))
    m.dataset = "train.jsonl"
    write_imatrix_gguf(m, tmp_path / "m.imatrix.gguf")
    assert is_imatrix_gguf(str(tmp_path / "m.imatrix.gguf"))
    back = read_imatrix_gguf(tmp_path / "m.imatrix.gguf")
    assert back.dataset == "train.jsonl" and back.counts == m.counts and back.chunks == 1
    for name, sums in m.sums.items():
        np.testing.assert_allclose(back.sums[name], sums.astype(np.float32))


def test_imatrix_auto_needs_a_run_and_a_bad_file_is_named(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from bittune.errors import BittuneError
    from bittune.export.imatrix import imatrix_data

    with pytest.raises(BittuneError, match="not a run directory"):
        imatrix_data(str(tiny_llama_dir), "auto")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    assert imatrix_data(str(tiny_llama_dir), str(bad)) == str(bad)  # the first row is fine
    with pytest.raises(BittuneError, match="not found"):
        imatrix_data(str(tiny_llama_dir), str(tmp_path / "missing.jsonl"))


# --- refusals before any weight is read -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"qtype": "q4_k_m"}, "make llamacpp"),
        ({"qtype": "q4_0", "imatrix": "auto"}, "--imatrix applies to the types llama.cpp"),
        ({"qtype": "iq2_xs"}, "needs an importance matrix"),
        ({"qtype": "q4_k_m", "fmt": "gguf-lora"}, "unknown --type 'q4_k_m' for --format gguf-lora"),
        ({"qtype": "q5_k_x"}, "unknown --type"),
    ],
)
def test_refusals(
    monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path, tmp_path: Path, kwargs: dict, message: str
) -> None:
    from bittune.errors import BittuneError
    from bittune.export.commands import export_model

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    args = {"fmt": "gguf", **kwargs}
    with pytest.raises(BittuneError, match=message):
        export_model(str(tiny_llama_dir), out=tmp_path / "m.gguf", **args)
    assert not list(tmp_path.iterdir())


def test_the_cli_names_the_fix_for_kquants_without_llamacpp(
    monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bittune.cli import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tiny_llama_dir), "--type", "q4_k_m", "--out", str(tmp_path / "m.gguf")])
    assert exit_info.value.code == 2
    assert "make llamacpp" in capsys.readouterr().err


# --- GGUF LoRA adapters -----------------------------------------------------------------------------------------


def test_gguf_lora_layout(lora_run: Path, tmp_path: Path) -> None:
    import gguf
    from safetensors.torch import load_file

    from bittune.export.commands import export_model
    from bittune.export.gguf_writer import permute_for_rotary

    result = export_model(str(lora_run), fmt="gguf-lora", qtype="f32", out=tmp_path / "a.gguf")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    assert result["name"] == fields["general.name"] == f"{Path(result['base']).name}-lora"
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 7 * 2 and result["tensors"] == len(tensors)
    state = load_file(str(lora_run / "adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0."
    a = tensors["blk.0.attn_q.weight.lora_a"].data.reshape(4, 32)  # [r, in], as PEFT's lora_A
    b = tensors["blk.0.attn_q.weight.lora_b"].data.reshape(32, 4)  # [out, r], Q rows reordered for llama.cpp
    np.testing.assert_array_equal(a, state[prefix + "self_attn.q_proj.lora_A.weight"].numpy())
    np.testing.assert_array_equal(b, permute_for_rotary(state[prefix + "self_attn.q_proj.lora_B.weight"].numpy(), 4))
    v = tensors["blk.0.attn_v.weight.lora_b"].data.reshape(16, 4)  # V is not rotated: as it is
    np.testing.assert_array_equal(v, state[prefix + "self_attn.v_proj.lora_B.weight"].numpy())


def test_gguf_lora_refusals(lora_run: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    from bittune.errors import BittuneError
    from bittune.export.commands import export_model

    with pytest.raises(BittuneError, match="no LoRA adapter"):
        export_model(str(tiny_llama_dir), fmt="gguf-lora", out=tmp_path / "a.gguf")
    dora = tmp_path / "dora"
    shutil.copytree(lora_run / "adapter", dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(BittuneError, match="DoRA"):
        export_model(str(dora), fmt="gguf-lora", out=tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_rslora_alpha_gives_peft_scaling() -> None:
    from bittune.export.gguf_lora import lora_alpha

    assert lora_alpha({"lora_alpha": 32, "r": 16}) / 16 == 2.0
    assert lora_alpha({"lora_alpha": 32, "r": 16, "use_rslora": True}) / 16 == pytest.approx(32 / 16**0.5)


# --- general.name -------------------------------------------------------------------------------------------------


def test_a_runs_gguf_is_named_after_its_base_and_method(lora_run: Path, tmp_path: Path) -> None:
    import gguf

    from bittune.export.commands import export_model

    export_model(str(lora_run), fmt="gguf", qtype="f32", out=tmp_path / "m.gguf")
    name = gguf.GGUFReader(tmp_path / "m.gguf").fields["general.name"].contents()
    base = Path(json.loads((lora_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert name == f"{base.name}-lora" and name != lora_run.name
