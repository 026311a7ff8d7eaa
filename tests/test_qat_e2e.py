"""QAT and distillation through the recipe on tiny models: stages, checkpoints, resume, convert, teacher checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bittune.config import config_from_dict
from bittune.quant.qat import convert
from bittune.recipes.finetune import stop_after, train
from bittune.training.metrics import read_metrics
from tiny import color_chat_rows, make_tiny_llama, make_tokenizer, sentiment_rows, write_jsonl

pytestmark = pytest.mark.e2e


def config(model_dir: Path, data_file: Path, out: Path, **sections) -> dict:
    raw = {
        "model": {"path": str(model_dir)},
        "method": "qat",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "qat": {"schedule": [8, 4], "steps_per_stage": 8, "group_size": 16},
        "data": {"train": str(data_file), "format": "chat", "max_length": 64, "eval_fraction": 0.1},
        "train": {"batch_size": 8, "lr": 3e-3, "seed": 1, "scheduler": "constant"},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    if raw["qat"] is None:  # qat=None: a run without QAT
        del raw["qat"]
    if raw["method"] not in ("lora", "qlora"):  # full fine-tuning and QAT train no adapter: no lora section
        raw.pop("lora", None)
    return raw


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def eval_converted(run_dir: Path) -> dict[str, float]:
    """Load a finished QAT run, convert it to its final bit-width and evaluate it on the run's own eval rows."""
    from bittune.artifacts import load, resolve
    from bittune.config import load_config
    from bittune.data import make_collator
    from bittune.preflight import prepare_run_data
    from bittune.quant.qat import convert
    from bittune.training.evaluate import evaluate

    cfg = load_config(run_dir / "run_config.yaml")
    model, tokenizer, task = load(str(run_dir), device="cpu")
    q = resolve(run_dir).qat
    model = convert(model, bits=q.bits, group_size=q.group_size, symmetric=q.symmetric)
    data = prepare_run_data(cfg, tokenizer)
    collate = make_collator(task, tokenizer.pad_token_id, data.packed)
    batches = (collate(data.eval[i : i + 8]) for i in range(0, len(data.eval), 8))
    return evaluate(model, batches, task=task, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(64))


@pytest.fixture(scope="module")
def sentiment_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sentiment.jsonl", sentiment_rows(96))


def test_qat_stages_switch_bits_keep_checkpoints_and_convert_reproduces_the_final_eval(
    tiny_llama_dir, chat_file, tmp_path
):
    raw = config(tiny_llama_dir, chat_file, tmp_path / "run", train={"save_every": 3, "keep_last": 1})
    result = train(config_from_dict(raw), progress=False)
    run = result.run_dir
    steps = step_records(run)
    assert [r["step"] for r in steps] == list(range(1, 17))  # no max_steps: 2 stages x 8 steps
    assert [r["qat_bits"] for r in steps] == [8] * 8 + [4] * 8
    assert mean([r["loss"] for r in steps[-3:]]) < 0.7 * mean([r["loss"] for r in steps[:3]])
    # Stage 0 ends at step 8: an eval at 8 bits is recorded, and its checkpoint survives pruning (keep_last 1).
    stage_evals = [r for r in read_metrics(run / "metrics.jsonl") if "qat_stage" in r]
    assert [(r["step"], r["qat_stage"], r["qat_bits"]) for r in stage_evals] == [(8, 0, 8), (16, 1, 4)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-15", "step-8"]
    assert json.loads((run / "checkpoints" / "step-8" / "state.json").read_text())["qat_stages"][0]["bits"] == 8
    stages = result.final_metrics["qat"]["stages"]
    assert [(s["stage"], s["bits"], s["end_step"]) for s in stages] == [(0, 8, 8), (1, 4, 16)]
    assert all("eval_loss" in s for s in stages)
    qat_json = json.loads((result.final_dir / "qat.json").read_text())
    assert qat_json == {"bits": 4, "group_size": 16, "symmetric": False, "method": "int", "schedule": [8, 4],
                        "stage_ends": [8, 16]}  # fmt: skip
    # The saved model holds the latent float weights under their usual names; converting it to 4 bits gives back
    # exactly the model the last stage evaluated.
    assert (result.final_dir / "model.safetensors").is_file()
    again = eval_converted(run)
    assert again["eval_loss"] == pytest.approx(result.final_metrics["eval_loss"], rel=1e-6)

    # `bittune quantize RUN_DIR` with no settings takes qat.json's, stores real packed codes, and the reloaded
    # low-bit model computes what the last stage evaluated (no original weights needed).
    from bittune.artifacts import load, resolve
    from bittune.quant.flows import quantize_path
    from bittune.quant.spec import IntSpec, spec_for_source

    spec = spec_for_source(str(run), bits=None, method=None, group_size=None, symmetric=False)
    assert spec == IntSpec(bits=4, group_size=16, symmetric=False)
    quantize_path(str(run), spec, tmp_path / "q4")
    quantized, _, _ = load(str(tmp_path / "q4"), device="cpu")
    converted, _, _ = load(str(run), device="cpu")
    q = resolve(run).qat
    converted = convert(converted, bits=q.bits, group_size=q.group_size, symmetric=q.symmetric)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 11]])
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, converted(ids).logits)


@pytest.mark.parametrize("method", ["qat", "lora"])
def test_resume_across_a_stage_boundary_is_bit_identical(tiny_llama_dir, chat_file, tmp_path, method):
    from safetensors.torch import load_file

    def cfg(out: Path):
        return config_from_dict(
            config(tiny_llama_dir, chat_file, out, method=method, lora={"dropout": 0.1},
                   qat={"schedule": [8, 3], "steps_per_stage": 6},
                   train={"save_every": 4, "eval_every": 5, "scheduler": "cosine", "warmup_steps": 2})
        )  # fmt: skip

    straight = train(cfg(tmp_path / "straight"), progress=False)
    with stop_after(5):
        stopped = train(cfg(tmp_path / "resumed"), progress=False)
    assert stopped.stopped_early
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-4"]
    resumed = train(cfg(tmp_path / "resumed"), resume=True, progress=False)  # from step 4 (8 bits) into 3 bits
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(straight.final_dir / name), load_file(resumed.final_dir / name)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    s, r = step_records(straight.run_dir), step_records(resumed.run_dir)
    assert [x["qat_bits"] for x in r] == [8] * 6 + [3] * 6
    assert [x["loss"] for x in s] == [x["loss"] for x in r]
    assert straight.final_metrics["qat"]["stages"] == resumed.final_metrics["qat"]["stages"]


@pytest.fixture(scope="module")
def classifier_teacher(tmp_path_factory, tiny_bert_dir, sentiment_file) -> Path:
    """A fully fine-tuned tiny BERT sentiment classifier (a run directory)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    raw = config(tiny_bert_dir, sentiment_file, out, method="full", qat=None, model={"task": "classification"},
                 data={"format": "classification", "eval_fraction": 0.2},
                 train={"lr": 1e-3, "max_steps": 30})  # fmt: skip
    return train(config_from_dict(raw), progress=False).run_dir


def test_lora_qat_classifier_distilled_from_a_teacher_run(classifier_teacher, sentiment_file, tmp_path):
    raw = config(
        classifier_teacher / "model",
        sentiment_file,
        tmp_path / "run",
        method="lora",
        model={"task": "classification"},
        data={"format": "classification", "eval_fraction": 0.2},
        qat={"schedule": [8, 4], "steps_per_stage": 10, "symmetric": True},
        distill={"teacher": str(classifier_teacher), "temperature": 2.0, "alpha": 0.5},
    )
    result = train(config_from_dict(raw), progress=False)
    steps = step_records(result.run_dir)
    assert all("task_loss" in r for r in steps) and [r["qat_bits"] for r in steps] == [8] * 10 + [4] * 10
    assert any(r["task_loss"] != pytest.approx(r["loss"]) for r in steps)  # the KL term is really in the loss
    assert result.final_metrics["eval_accuracy"] >= 0.9
    assert json.loads((result.final_dir / "qat.json").read_text())["symmetric"] is True
    assert result.final_metrics["distill"]["alpha"] == 0.5
    again = eval_converted(result.run_dir)
    assert again["eval_accuracy"] == result.final_metrics["eval_accuracy"]
    assert again["eval_loss"] == pytest.approx(result.final_metrics["eval_loss"], rel=1e-5)


def test_causal_lm_distillation_from_a_teacher_run_dir(tiny_llama_dir, chat_file, tmp_path):
    from bittune.training.distill import load_teacher

    teacher_raw = config(tiny_llama_dir, chat_file, tmp_path / "teacher", method="lora", qat=None,
                         train={"max_steps": 6})  # fmt: skip
    teacher_run = train(config_from_dict(teacher_raw), progress=False).run_dir
    teacher = load_teacher(
        str(teacher_run), student_tokenizer=make_tokenizer(), task="causal-lm", label_names=None,
        device=torch.device("cpu"),
    )  # fmt: skip
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    raw = config(tiny_llama_dir, chat_file, tmp_path / "student", method="full", qat=None, train={"max_steps": 12},
                 distill={"teacher": str(teacher_run), "alpha": 0.7, "temperature": 1.5})  # fmt: skip
    result = train(config_from_dict(raw), progress=False)
    steps = step_records(result.run_dir)
    assert "qat_bits" not in steps[0] and all("task_loss" in r for r in steps)
    assert mean([r["task_loss"] for r in steps[-3:]]) < 0.7 * mean([r["task_loss"] for r in steps[:3]])


def test_distillation_with_alpha_zero_trains_exactly_like_no_distillation(
    tiny_llama_dir, chat_file, tmp_path, monkeypatch
):
    import bittune.training.loss as loss_module

    def losses(out: Path, **sections) -> list[float]:
        raw = config(tiny_llama_dir, chat_file, out, method="full", qat=None, train={"max_steps": 4}, **sections)
        return [r["loss"] for r in step_records(train(config_from_dict(raw), progress=False).run_dir)]

    plain = losses(tmp_path / "plain")  # the default: the output head only at label positions
    alpha0 = losses(tmp_path / "alpha0", distill={"teacher": str(tiny_llama_dir), "alpha": 0.0})  # full logits
    # Bit for bit against a plain run on distillation's own path (the full logits); within float rounding of the
    # default path.
    monkeypatch.setattr(loss_module, "targets_only", lambda loss_fn, model: False)
    assert losses(tmp_path / "full-logits") == alpha0
    assert plain == pytest.approx(alpha0, rel=1e-5)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from bittune.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["vocabulary", "special-ids", "task"])
def test_cli_refuses_an_incompatible_teacher(tiny_llama_dir, tiny_bert_dir, chat_file, tmp_path, capsys, kind):
    import yaml

    if kind == "vocabulary":
        tok = make_tokenizer()
        tok.add_tokens(["zebra"])
        teacher, expect = make_tiny_llama(tmp_path / "teacher", tok), "tokens, the student's"
    elif kind == "special-ids":
        teacher, expect = make_tiny_llama(tmp_path / "teacher", make_tokenizer(pad_equals_eos=True)), "pad_token_id"
    else:
        teacher, expect = tiny_bert_dir, "is a causal-lm model"  # a bare encoder is no causal LM...
        from transformers import AutoModelForSequenceClassification

        AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).save_pretrained(
            tmp_path / "teacher"
        )
        make_tokenizer().save_pretrained(tmp_path / "teacher")
        teacher, expect = tmp_path / "teacher", "is a classification model but the student is trained for causal-lm"
    raw = config(tiny_llama_dir, chat_file, tmp_path / "run", distill={"teacher": str(teacher)})
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    code, err = run_cli(["train", str(cfg_file)], capsys)
    assert code == 2, err
    assert err.startswith("error: distill.teacher") and expect in err and "fix:" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_refuses_a_classifier_teacher_whose_labels_are_in_another_order(
    tiny_bert_dir, sentiment_file, tmp_path, capsys
):
    """A teacher that predicts the student's labels in another order would teach each class the other's name."""
    import yaml
    from transformers import AutoModelForSequenceClassification

    teacher = tmp_path / "teacher"
    AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=2, id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1}
    ).save_pretrained(teacher)
    make_tokenizer().save_pretrained(teacher)
    raw = config(tiny_bert_dir, sentiment_file, tmp_path / "run", method="lora", qat=None,
                 model={"task": "classification"}, data={"format": "classification"},
                 distill={"teacher": str(teacher)})  # fmt: skip
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    code, err = run_cli(["train", str(cfg_file)], capsys)
    assert code == 2 and "predicts the labels ['pos', 'neg']" in err and "['neg', 'pos']" in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_cli_refuses_a_teacher_with_another_output_size(tiny_llama_dir, chat_file, tmp_path, capsys):
    """Same tokenizer, but the teacher's output embedding was resized (padded to a multiple of 64): its logits
    cover other token ids than the student's. Refused once the weights are loaded, before the first step; the
    run directory is not left behind."""
    import yaml
    from transformers import AutoModelForCausalLM

    teacher = tmp_path / "teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.resize_token_embeddings(model.config.vocab_size + 1, pad_to_multiple_of=64)
    model.save_pretrained(teacher)
    make_tokenizer().save_pretrained(teacher)
    raw = config(tiny_llama_dir, chat_file, tmp_path / "run", method="lora", qat=None,
                 distill={"teacher": str(teacher)})  # fmt: skip
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    code, err = run_cli(["train", str(cfg_file)], capsys)
    assert code == 2 and "logits per token, the student" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # a retry with a fixed teacher needs no --resume
