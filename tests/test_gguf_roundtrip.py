"""GGUF -> fine-tune -> GGUF: a .gguf file as model.path is converted once and trains; its run exports back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e


def _chat_rows(path: Path, n: int = 16) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"colour {i}?"}, {"role": "assistant", "content": "blue green"}]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gguf_tune_gguf_round_trip(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from bittune.config import config_from_dict
    from bittune.export.commands import export_model
    from bittune.gguf_import import gguf_model_folder, is_complete
    from bittune.recipes.finetune import train

    monkeypatch.setenv("BITTUNE_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "tiny.gguf"
    export_model(str(tiny_llama_dir), fmt="gguf", out=first, qtype="f32")

    # The converted folder is the same model: equal logits (f32 all the way).
    folder = gguf_model_folder(first)
    assert is_complete(folder) and folder.parent == tmp_path / "cache" / "models" / "gguf"
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
    assert (want - got).abs().max().item() < 1e-4
    assert gguf_model_folder(first) == folder  # cached: a second call converts nothing

    cfg = config_from_dict(
        {
            "model": {"path": str(first)},
            "method": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": str(_chat_rows(tmp_path / "train.jsonl")), "format": "chat", "max_length": 64},
            "train": {"max_steps": 3, "batch_size": 4, "seed": 1},
            "output_dir": str(tmp_path / "run"),
        }
    )
    result = train(cfg, progress=False)
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
    assert yaml.safe_load((result.run_dir / "run_config.yaml").read_text())["model"]["path"] == str(first)

    second = tmp_path / "tuned.gguf"
    export_model(str(result.run_dir), fmt="gguf", out=second, qtype="f32")
    a, b = gguf.GGUFReader(first), gguf.GGUFReader(second)
    assert {t.name: tuple(t.shape) for t in a.tensors} == {t.name: tuple(t.shape) for t in b.tensors}
    for key in ("general.architecture", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id"):
        assert a.fields[key].contents() == b.fields[key].contents(), key
    if "tokenizer.chat_template" in a.fields:
        assert a.fields["tokenizer.chat_template"].contents() == b.fields["tokenizer.chat_template"].contents()
    # The LoRA delta was merged: some weight changed.
    changed = [t.name for t, u in zip(a.tensors, b.tensors) if not (t.data == u.data).all()]
    assert changed


def test_a_rewritten_gguf_replaces_its_older_conversion(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each `bittune demo` writes its GGUF anew at the same path: the cache keeps one conversion per path, not one
    per write (a 135M model's folder is ~0.5 GB), and leaves other files' conversions alone."""
    import os

    from bittune.export.commands import export_model
    from bittune.gguf_import import gguf_model_folder, is_complete

    monkeypatch.setenv("BITTUNE_CACHE", str(tmp_path / "cache"))
    path, other = tmp_path / "model.gguf", tmp_path / "other.gguf"
    export_model(str(tiny_llama_dir), fmt="gguf", out=path, qtype="f32")
    export_model(str(tiny_llama_dir), fmt="gguf", out=other, qtype="f32")
    first, kept = gguf_model_folder(path), gguf_model_folder(other)
    export_model(str(tiny_llama_dir), fmt="gguf", out=path, qtype="f16")  # the same path, written again
    later = path.stat().st_mtime_ns + 10**9  # a later write, even on a coarse clock
    os.utime(path, ns=(later, later))
    second = gguf_model_folder(path)
    assert second != first and is_complete(second)
    assert not first.exists()  # the conversion of the file's earlier content is gone
    assert is_complete(kept)  # another file's conversion stays
