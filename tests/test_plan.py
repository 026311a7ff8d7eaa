"""``bittune plan``: parameter counts, weights, activations and the CLI, on tiny in-process configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bittune.config import config_from_dict
from bittune.plan import estimate, model_shape
from bittune.plan.activations import ActivationSpec, layer_bytes_per_token
from bittune.plan.shapes import meta_shape
from tiny import color_chat_rows, write_jsonl

LLAMA = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def llama_config(layers: int = 2, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, **{**LLAMA, **kw})


def config_dir(tmp_path: Path, config, name: str = "m") -> Path:
    """A model folder with only config.json: planning must not need weights."""
    path = tmp_path / name
    config.save_pretrained(path)
    return path


def plan_cfg(model_dir: Path, **sections):
    raw = {
        "model": {"path": str(model_dir)},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": "unused.jsonl", "format": "chat", "max_length": 64, "packing": True},
        "train": {"batch_size": 4, "device": "cpu"},
        "output_dir": "unused",
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    if raw["method"] not in ("lora", "qlora"):  # full fine-tuning and QAT train no adapter: no lora section
        raw.pop("lora", None)
    return config_from_dict(raw)


def plan(model: Path, **sections):
    # A fixed matmul rate: these tests are about memory, and skip the probe.
    return estimate(plan_cfg(model, **sections), matmul_flops=1e11)


def test_more_layers_need_more_memory(tmp_path):
    small = plan(config_dir(tmp_path, llama_config(2), "l2"))
    big = plan(config_dir(tmp_path, llama_config(6), "l6"))
    assert big.peak_mb > small.peak_mb
    assert big.component("activations") > small.component("activations")
    assert big.total_parameters > small.total_parameters


def test_longer_rows_need_more_activation_memory(tmp_path):
    model = config_dir(tmp_path, llama_config(2))
    short = plan(model, data={"max_length": 64})
    long = plan(model, data={"max_length": 256})
    assert long.component("activations") > 2 * short.component("activations")
    # The head runs at label positions in chunks of HEAD_CHUNK (512) tokens: 256 tokens -> 1,024 tokens is 2x, not 4x.
    assert long.component("logits + loss") == pytest.approx(2 * short.component("logits + loss"), rel=0.05)


def test_full_logits_grow_with_every_token_and_the_head_at_targets_stops_at_one_chunk():
    from bittune.plan.activations import logits_bytes
    from bittune.training.loss import HEAD_CHUNK

    shape = model_shape(llama_config(2))
    full = [logits_bytes(shape, tokens=n, act_bytes=4, classification=False) for n in (256, 1024, 4096)]
    assert full[1] == 4 * full[0] and full[2] == 16 * full[0]
    chunked = [logits_bytes(shape, tokens=n, act_bytes=4, classification=False, head_at_targets=True)
               for n in (256, 1024, 4096)]  # fmt: skip
    assert chunked[0] < full[0] and chunked[1] == chunked[2] == HEAD_CHUNK * 300 * (4 + 4)


def test_the_pass_budget_sets_the_activations_alive_at_once_not_the_work(tmp_path):
    """On CPU a step's padded rows run as passes of at most CPU_TOKENS_PER_PASS tokens (train.max_tokens_per_pass:
    auto): long rows two to a pass (half a 4-row micro-batch's activations), short padded rows pooled across the
    step's micro-batches (8 rows of 64 in one pass), packed rows split within their micro-batch; the FLOPs per step
    are the same either way."""
    from bittune.data.collate import CPU_TOKENS_PER_PASS

    model = config_dir(tmp_path, llama_config(2))
    train = {"grad_accum": 2}
    # Packed rows are split within their micro-batch, never pooled: 8 rows of 64 stay 4 to a pass.
    cases = [(False, 256, CPU_TOKENS_PER_PASS // 256), (False, 64, 8), (True, 256, CPU_TOKENS_PER_PASS // 256),
             (True, 64, 4)]  # fmt: skip
    for packing, length, rows in cases:
        data = {"max_length": length, "packing": packing}
        per_batch = plan(model, data=data, train={**train, "max_tokens_per_pass": None})
        passes = plan(model, data=data, train=train)
        ratio = passes.component("activations") / per_batch.component("activations")
        assert ratio == pytest.approx(rows / 4, rel=0.02), (packing, length)
        assert passes.flops_per_step == per_batch.flops_per_step


def test_gradient_checkpointing_saves_activation_memory(tmp_path):
    model = config_dir(tmp_path, llama_config(8))
    plain = plan(model, data={"max_length": 256})
    ckpt = plan(model, data={"max_length": 256}, train={"gradient_checkpointing": True})
    assert ckpt.component("activations") < plain.component("activations") / 3
    assert ckpt.peak_mb < plain.peak_mb
    assert ckpt.flops_per_step > plain.flops_per_step  # the recompute


def test_kbit_weights_are_smaller_and_double_quant_smaller_still(tmp_path):
    model = config_dir(tmp_path, llama_config(4, hidden_size=256, intermediate_size=512))
    fp32 = plan(model).component("weights")
    int8 = plan(model, method="qlora", quant={"bits": 8}).component("weights")
    nf4 = plan(model, method="qlora", quant={"bits": 4, "double_quant": False}).component("weights")
    nf4_dq = plan(model, method="qlora", quant={"bits": 4, "double_quant": True}).component("weights")
    assert nf4_dq < nf4 < int8 < fp32


def test_full_fine_tuning_trains_every_parameter(tmp_path):
    from transformers import LlamaForCausalLM

    config = llama_config(2)
    report = plan(config_dir(tmp_path, config), method="full")
    n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert report.trainable_parameters == report.total_parameters == n


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["down_proj"]])
@pytest.mark.parametrize("tied", [True, False])
def test_lora_counts_match_peft(tmp_path, targets, tied):
    from transformers import LlamaForCausalLM

    from bittune.model import attach_lora, count_parameters

    config = llama_config(3, tie_word_embeddings=tied)
    report = plan(config_dir(tmp_path, config), lora={"r": 8, "target_modules": targets})
    peft_model = attach_lora(
        LlamaForCausalLM(config), task="causal-lm", r=8, alpha=16, dropout=0.0, target_modules=targets
    )
    assert (report.trainable_parameters, report.total_parameters) == count_parameters(peft_model)


def test_classification_counts_match_peft(tiny_bert_dir, tiny_llama_dir):
    from bittune.model import attach_lora, count_parameters, load_model

    for folder in (tiny_bert_dir, tiny_llama_dir):
        for method in ("lora", "full"):
            cfg = plan_cfg(
                folder,
                method=method,
                model={"task": "classification", "num_labels": 3},
                data={"format": "classification", "packing": False},
            )
            report = estimate(cfg, matmul_flops=1e11)
            model = load_model(str(folder), task="classification", dtype=torch.float32, label_names=["a", "b", "c"])
            if method == "lora":
                lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
                model = attach_lora(model, task="classification", **lora)
            counted = count_parameters(model)
            assert (report.trainable_parameters, report.total_parameters) == counted, (folder.name, method)


@pytest.mark.parametrize(
    "config",
    [
        llama_config(2),
        llama_config(2, tie_word_embeddings=False),
        llama_config(2, attention_bias=True, mlp_bias=True),
    ],
    ids=["llama-tied", "llama-untied", "llama-bias"],
)
def test_config_formula_matches_a_meta_device_count(config):
    formula = model_shape(config)
    meta = meta_shape(config)
    assert formula.source == "config" and meta.source == "meta"
    assert formula.total_params == meta.total_params
    assert formula.linear_params == meta.linear_params


def test_qwen2_and_bert_formulas_match_meta_counts():
    from transformers import BertConfig, Qwen2Config

    qwen = Qwen2Config(**{**LLAMA, "num_hidden_layers": 2})
    assert model_shape(qwen).total_params == meta_shape(qwen).total_params
    bert = BertConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    formula = model_shape(bert, task="classification", num_labels=3)
    assert formula.total_params == meta_shape(bert, task="classification", num_labels=3).total_params


def test_unknown_architecture_falls_back_to_meta_count(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    shape = model_shape(config)
    assert shape.source == "meta" and shape.layers == 2
    assert shape.total_params == sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    report = plan(config_dir(tmp_path, config), method="full")
    assert report.shape_source == "meta" and any("meta-device" in n for n in report.notes)


def test_kbit_weights_match_the_loaded_footprint(tiny_llama_dir):
    """The 4-bit/8-bit weight bytes, scales included, equal what bitsandbytes really allocates."""
    from bittune.model import load_model
    from bittune.quant.api import bnb_config
    from bittune.quant.spec import BnbSpec
    from bittune.training.memory import weights_footprint

    for quant in ({"bits": 4, "double_quant": True}, {"bits": 4, "double_quant": False}, {"bits": 8}):
        report = plan(tiny_llama_dir, method="qlora", quant=quant)
        q = bnb_config(BnbSpec.model_validate(quant))  # the config's old {bits, ...} spelling, translated
        model = load_model(
            str(tiny_llama_dir), task="causal-lm", dtype=torch.float32, quantization=q, device=torch.device("cpu")
        )
        real = weights_footprint(model)
        expected = {k: v * 2**20 for k, v in report.weights_mb_by_dtype.items()}
        lora = report.trainable_parameters * 4  # the plan includes the float32 adapters; the bare model has none
        expected["float32"] -= lora
        assert set(real) == set(expected), quant
        for key, value in real.items():
            assert expected[key] == pytest.approx(value, abs=0.006 * 2**20), (quant, key)


def _saved_bytes_per_layer(config, *, method: str, batch: dict, tokens: int) -> float:
    """Bytes autograd saves per block per token (difference of a 1- and a 3-block model, parameters excluded)."""
    from transformers import LlamaForCausalLM

    from bittune.model import attach_lora
    from bittune.training.loss import loss_sum

    totals = []
    for layers in (1, 3):
        torch.manual_seed(0)
        config.num_hidden_layers = layers
        model = LlamaForCausalLM(config)
        model.config.use_cache = False
        if method == "lora":
            model = attach_lora(model, task="causal-lm", r=8, alpha=16, dropout=0.0, target_modules="all-linear")
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, seen=seen, params=params) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(**batch).logits
            loss_sum("causal-lm", logits, batch["input_ids"])
        totals.append(sum(seen.values()))
    return (totals[1] - totals[0]) / 2 / tokens


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("packed", [True, False])
def test_activation_formula_matches_what_autograd_saves(method, packed):
    config = llama_config(1)
    b, t = 2, 32
    ids = torch.randint(0, 300, (b, t), generator=torch.Generator().manual_seed(0))
    if packed:  # two examples per row: a block-diagonal mask is built and k/v are repeated for sdpa
        batch = {"input_ids": ids, "position_ids": torch.arange(t).remainder(16).expand(b, t), "use_cache": False}
    else:  # no padding: no mask, grouped-query attention inside sdpa
        batch = {"input_ids": ids, "attention_mask": torch.ones(b, t, dtype=torch.long)}
    measured = _saved_bytes_per_layer(config, method=method, batch=batch, tokens=b * t)
    spec = ActivationSpec(
        act_bytes=4,
        resid_bytes=4,
        full=method == "full",
        lora_rank_per_layer=8 * 7 if method == "lora" else 0,
        mask=packed,
        seq=t,
        checkpointing=False,
    )
    assert layer_bytes_per_token(model_shape(config), spec) == pytest.approx(measured, rel=0.03)


def test_report_renders_and_serializes(tmp_path):
    report = plan(config_dir(tmp_path, llama_config(2)), method="qlora")
    text = report.table()
    assert "peak RSS" in text and "activations" in text and "fits:" in text
    data = json.loads(json.dumps(report.as_dict()))
    assert data["peak_mb"] == report.peak_mb and data["device"] == "cpu"
    assert report.seconds_per_step and report.seconds_per_step > 0


def test_missing_model_config_is_a_user_error(tmp_path):
    from bittune.errors import BittuneError

    with pytest.raises(BittuneError, match="does not exist"):
        plan(tmp_path / "nowhere")


def _write_yaml(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_plan_prints_a_table(tmp_path):
    model = config_dir(tmp_path, llama_config(2))
    raw = {
        "model": {"path": str(model)},
        "method": "lora",
        "data": {"train": "unused.jsonl", "format": "chat", "max_length": 64},
        "output_dir": str(tmp_path / "run"),
    }
    cfg = _write_yaml(tmp_path / "cfg.yaml", raw)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bittune", "plan", str(cfg), "--device", "cpu", "--set", "train.batch_size=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "peak RSS" in proc.stdout and "fits:" in proc.stdout and "micro-batch 2 x 64" in proc.stdout
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["batch_size"] == 2


def plans_with_and_without_data(cfg: Path, capsys) -> tuple[dict, dict]:
    """``bittune plan CFG --json`` reading the data, and with ``--no-data`` (a fixed matmul rate: no probe)."""
    from tiny import run_cli

    plans = []
    for extra in ([], ["--no-data"]):
        code, out, err = run_cli(["plan", str(cfg), "--matmul-tflops", "0.1", "--json", *extra], capsys)
        assert code == 0, err
        plans.append(json.loads(out))
    return plans[0], plans[1]


def test_cli_plan_counts_the_rows_of_a_data_file_that_is_here(tiny_llama_dir, tmp_path, capsys):
    """With the data file here, the plan replays its first epoch: the step's time follows the rows' own tokens
    (short chat rows, far under max_length), the activations the largest pass; ``--no-data`` keeps every row at
    max_length. A data file that is not here with ``--data`` is one clear error."""
    from tiny import run_cli

    data = write_jsonl(tmp_path / "chat.jsonl", color_chat_rows(24))
    raw = {
        "model": {"path": str(tiny_llama_dir)},
        "method": "lora",
        "data": {"train": str(data), "format": "chat", "max_length": 256},
        "train": {"batch_size": 4, "grad_accum": 2, "device": "cpu"},
        "output_dir": str(tmp_path / "run"),
    }
    cfg = _write_yaml(tmp_path / "cfg.yaml", raw)
    rows, full = plans_with_and_without_data(cfg, capsys)
    work = rows["workload"]
    assert full["workload"] is None and full["tokens_per_step"] == 4 * 256 * 2
    assert work["steps"] == 3 and 0 < work["real_tokens"] < 4 * 64 * 2  # short rows: well under max_length
    assert rows["tokens_per_step"] == round(work["real_tokens"])
    assert work["computed_tokens"] < work["real_tokens"]  # the chat template's system prompt runs once per pass
    assert rows["flops_per_step"] < full["flops_per_step"] / 4
    assert rows["seconds_per_step"] < full["seconds_per_step"] / 4
    acts = {c["name"]: c["mb"] for c in rows["components"]}["activations"]
    assert 0 < acts < {c["name"]: c["mb"] for c in full["components"]}["activations"]
    code, _, err = run_cli(["plan", str(cfg), "--data", "--set", f"data.train={tmp_path / 'gone.jsonl'}"], capsys)
    assert code != 0 and "gone.jsonl" in err and "Traceback" not in err


@pytest.mark.e2e
def test_estimate_is_near_a_real_runs_peak(tiny_llama_dir, tmp_path):
    """A tiny LoRA run in its own process: the estimate is within a loose factor of the measured peak RSS.

    On a tiny model the process baseline dominates, so this checks the runtime constant and that nothing is
    wildly off, without timing anything (the machine may be busy).
    """
    data = write_jsonl(tmp_path / "chat.jsonl", color_chat_rows(32))
    raw = {
        "model": {"path": str(tiny_llama_dir)},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data), "format": "chat", "max_length": 64},
        "train": {"batch_size": 4, "max_steps": 3, "device": "cpu"},
        "output_dir": str(tmp_path / "run"),
    }
    cfg = _write_yaml(tmp_path / "cfg.yaml", raw)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bittune", "train", str(cfg)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads((tmp_path / "run" / "summary.json").read_text())["memory"]["peak_rss_mb"]
    estimated = estimate(config_from_dict(raw), matmul_flops=1e11).peak_mb
    assert measured / 2 < estimated < measured * 2, (estimated, measured)


def test_plan_sizes_a_classifier_head_by_the_labels_in_the_data(tiny_bert_dir, tmp_path, capsys):
    """Read, the data says how many labels the head has (3 here); unread, the plan guesses 2 and says so."""

    rows = [{"text": f"{w} movie number {i}", "label": w} for i, w in enumerate(["good", "bad", "meh"] * 6)]
    data = write_jsonl(tmp_path / "three.jsonl", rows)
    raw = {
        "model": {"path": str(tiny_bert_dir), "task": "classification"},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(data), "format": "classification", "max_length": 32},
        "train": {"batch_size": 4, "device": "cpu"},
        "output_dir": str(tmp_path / "run"),
    }
    read, guessed = plans_with_and_without_data(_write_yaml(tmp_path / "cfg.yaml", raw), capsys)
    hidden = 32  # the tiny BERT's; the head is trained (modules_to_save): hidden x labels + labels more per label
    assert read["trainable_parameters"] - guessed["trainable_parameters"] == hidden + 1
    assert not any("sized for 2 labels" in n for n in read["notes"])
    assert any("sized for 2 labels" in n for n in guessed["notes"])
