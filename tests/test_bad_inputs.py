"""The bad-input catalogue, through the command line: one clear message, exit 2, no traceback, nothing written.

Each case builds one bad input and runs ``bittune train|validate|eval|generate`` on it, in-process through
``bittune.cli.main`` (fast) or, for a few, as ``python -m bittune`` (the real exit code). Every case must give:
exit code 2; stderr that starts with ``error: `` (or, for a failure in the middle of training, ends with that
one message after the progress lines); no traceback; the file and line, or the dotted field, in the message;
a ``fix:`` line; and nothing half-written: the output_dir is not created, or a run directory that already
existed is unchanged byte for byte. The function-level versions of many of these live in test_data_errors.py
and test_config.py; this file proves the CLI turns each into the promised message.
"""

from __future__ import annotations

import errno
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tiny import color_chat_rows, run_cli, run_inproc, run_subprocess, sentiment_rows, snapshot, write_jsonl

# ---------------------------------------------------------------------------------------------------------------
# Shared inputs


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", color_chat_rows(16))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, chat_file: Path) -> Path:
    """A 6-step LoRA run stopped (as if killed) after step 4, with checkpoints step-2 and step-4."""
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import stop_after, train

    out = tmp_path_factory.mktemp("stopped") / "run"
    raw = base_config(tiny_llama_dir, chat_file, out, max_steps=6, save_every=2)
    with stop_after(4):
        assert train(config_from_dict(raw), progress=False).stopped_early
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, chat_file: Path) -> Path:
    """A finished LoRA run without an eval file."""
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    out = tmp_path_factory.mktemp("finished") / "run"
    train(config_from_dict(base_config(tiny_llama_dir, chat_file, out, max_steps=2)), progress=False)
    return out


@pytest.fixture(scope="module")
def no_template_model(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny Llama beside a tokenizer without a chat template, as a base model ships."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("no-template")
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_llama_dir / name).is_file():
            shutil.copy(tiny_llama_dir / name, path / name)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = None
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """A finished 2-step LoRA sequence-classification run (labels neg/pos)."""
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    tmp = tmp_path_factory.mktemp("classifier-run")
    raw = base_config(tiny_bert_dir, write_jsonl(tmp / "s.jsonl", sentiment_rows(16)), tmp / "run", max_steps=2)
    raw["model"]["task"] = "classification"
    raw["data"]["format"] = "classification"
    return train(config_from_dict(raw), progress=False).run_dir


@pytest.fixture(scope="module")
def classifier_model(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """A 2-class sequence classifier saved by transformers with its default labels (LABEL_0, LABEL_1)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("classifier")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return path


def base_config(model: Path, data: Path, out: Path, *, max_steps: int = 3, save_every: int | None = None) -> dict:
    """A valid tiny LoRA config; cases break one thing in it."""
    train: dict[str, Any] = {"max_steps": max_steps, "batch_size": 4, "seed": 1}
    if save_every:
        train["save_every"] = save_every
    return {
        "model": {"path": str(model)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "format": "chat", "max_length": 64},
        "train": train,
        "output_dir": str(out),
    }


# ---------------------------------------------------------------------------------------------------------------
# The catalogue


@dataclass
class Env:
    """What a case can use to build its bad input."""

    tmp: Path
    fixtures: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch
    extra: dict[str, Any] = field(default_factory=dict)  # what a case hands to the checks after the run

    def __getattr__(self, name: str) -> Path:
        try:
            return self.fixtures[name]
        except KeyError:
            raise AttributeError(f"{name}: add it to the case's needs=") from None

    def data(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def config(self, raw: dict | str, name: str = "c.yaml") -> Path:
        path = self.tmp / name
        path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path

    def run_config(self, *, model_dir: Path | None = None, train_file: Path | None = None, **sections: Any) -> dict:
        """``base_config`` with ``sections`` merged in (dicts update the section, other values replace it)."""
        raw = base_config(model_dir or self.tiny_llama_dir, train_file or self.chat_file, self.tmp / "out")
        for key, value in sections.items():
            if isinstance(value, dict):
                raw.setdefault(key, {}).update(value)
            else:
                raw[key] = value
        return raw

    def copy_run(self, run: Path) -> Path:
        """A private copy of a module-level run (so that a bug writing into it cannot spoil other cases)."""
        dst = self.tmp / "out"
        shutil.copytree(run, dst)
        cfg = yaml.safe_load((dst / "run_config.yaml").read_text())
        cfg["output_dir"] = str(dst)
        (dst / "run_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        return dst


@dataclass
class Scenario:
    """One bad input, ready to run.

    Attributes:
        argv: Arguments after ``bittune``.
        where: The file:line, file, or dotted field the message must name.
        needles: Other text the message must contain (the problem, the fix).
        out: An output_dir that must not be created.
        protected: A folder that must be byte-identical afterwards.
        mid_run: The failure comes after training started, so progress lines may precede the message.
    """

    argv: list[str]
    where: str
    needles: list[str] = field(default_factory=list)
    out: Path | None = None
    protected: Path | None = None
    mid_run: bool = False


@dataclass(frozen=True)
class Case:
    """A catalogue entry: how to build the input, how to run the CLI, and the fixtures it needs."""

    build: Callable[[Env], Scenario]
    via: str = "inproc"  # or "subprocess"
    xfail: str | None = None
    needs: tuple[str, ...] = ()


CASES: dict[str, Case] = {}


def case(name: str, *, via: str = "inproc", xfail: str | None = None, needs: tuple[str, ...] = ()) -> Callable:
    """Register ``build`` as catalogue entry ``name``."""

    def register(build: Callable[[Env], Scenario]) -> Callable[[Env], Scenario]:
        assert name not in CASES, name
        CASES[name] = Case(build, via, xfail, needs)
        return build

    return register


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


U = {"role": "user", "content": "What color is the sky?"}
A = {"role": "assistant", "content": "The sky is blue."}


def data_case(name: str, file: str, content: str | bytes, fmt: str, where: str, *needles: str) -> None:
    """A training file with one bad row/field, run through ``bittune train`` with ``data.format: fmt``."""

    def build(env: Env) -> Scenario:
        path = env.data(file, content)
        cfg = env.config(env.run_config(train_file=path, **({"data": {"format": fmt}} if fmt != "chat" else {})))
        return Scenario(["train", str(cfg)], where.format(data=path), list(needles), out=env.tmp / "out")

    CASES[name] = Case(build)


# --- data files -------------------------------------------------------------------------------------------------
data_case(
    "malformed-jsonl-line", "t.jsonl", '{"text": "ok"}\n{"text": "unterminated}\n', "text",
    "{data}:2", "invalid JSON at column", "one complete JSON object",
)  # fmt: skip
data_case(
    "json-array-non-object-element", "t.json", '[{"text": "ok"}, "just a string"]', "text",
    "{data}[1]", "must be a JSON object", "got a str",
)  # fmt: skip
data_case(
    "missing-field", "t.jsonl", jsonl({"body": "a"}), "text",
    "{data}:1", "field 'text' is missing", "the row has: body", "data.format",
)  # fmt: skip
data_case(
    "misspelled-field", "t.jsonl", jsonl({"prompt": "a", "completion": "b"}, {"prompt": "a", "completions": "b"}),
    "completion", "{data}:2", "field 'completion' is missing", "did you mean 'completions'?",
    "data.columns: {completion: completions}",
)  # fmt: skip
data_case(
    "list-where-string-expected", "t.jsonl", jsonl({"text": ["a", "b"]}), "text",
    "{data}:1", "field 'text' should be a string, got a list",
)  # fmt: skip
data_case("empty-file", "t.jsonl", "", "text", "{data}", "the file is empty", "add some rows")
data_case(
    "empty-string-content", "t.jsonl",
    jsonl({"messages": [U, A]}, {"messages": [U, {"role": "assistant", "content": ""}]}), "chat",
    "{data}:2", "field 'messages' item 1: assistant message has an empty 'content'",
)  # fmt: skip
data_case(
    "non-utf8-bytes", "t.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n', "text",
    "{data}:3", "not valid UTF-8", "0xe9", "iconv",
)  # fmt: skip
data_case(
    "csv-ragged-row", "t.csv", "text\ngood movie\nbad, really\n", "text",
    "{data}:3", "row has 2 fields but the header has 1", "quote fields",
)  # fmt: skip
data_case(
    "unknown-extension", "t.txt", "hello\n", "text", "{data}", "unsupported data file extension '.txt'", ".jsonl"
)  # fmt: skip
data_case(
    "chat-unknown-role", "t.jsonl", jsonl({"messages": [U, {"role": "bot", "content": "x"}]}), "chat",
    "{data}:1", "field 'messages' item 1: role 'bot' is not one of system, user, assistant",
)  # fmt: skip
data_case(
    "sharegpt-unknown-from", "t.jsonl",
    jsonl({"conversations": [{"from": "humna", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}), "chat",
    "{data}:1", "from 'humna' is not one of", "did you mean 'human'?",
)  # fmt: skip
data_case(
    "json-lines-in-a-json-file", "t.json", jsonl({"text": "a"}, {"text": "b"}), "text",
    "{data}:2", "one JSON object per line", "rename it to t.jsonl",
)  # fmt: skip


@case("bad-rows-in-both-files-reported-together")
def _bad_rows_together(env: Env) -> Scenario:
    """validate lists every bad row of the train and eval files in one message, not only the first."""
    bot = {"messages": [U, {"role": "bot", "content": "x"}]}
    train = env.data("t.jsonl", jsonl({"messages": [U, A]}, bot, {"messages": [U, A]}, bot))
    held = env.data("e.jsonl", jsonl(bot, {"messages": [U, A]}))
    cfg = env.config(env.run_config(train_file=train, data={"eval": str(held)}))
    return Scenario(["validate", str(cfg)], "3 problems in the data", [f"{train}:2", f"{train}:4", f"{held}:1",
                    "role 'bot'"])  # fmt: skip


@case("missing-data-file")
def _missing_data_file(env: Env) -> Scenario:
    path = env.tmp / "nope.jsonl"
    cfg = env.config(env.run_config(train_file=path))
    return Scenario(["train", str(cfg)], str(path), ["data file not found", "check the path"], out=env.tmp / "out")


@case("malformed-jsonl-line-validate")
def _malformed_validate(env: Env) -> Scenario:
    path = env.data("t.jsonl", jsonl({"messages": [U, A]}) + "{not json\n")
    cfg = env.config(env.run_config(train_file=path))
    return Scenario(["validate", str(cfg)], f"{path}:2", ["invalid JSON"], out=env.tmp / "out")


@case("every-row-dropped-after-truncation")
def _all_dropped(env: Env) -> Scenario:
    long_prompt = {"role": "user", "content": " ".join(["What color is the apple?"] * 12)}
    path = env.data("t.jsonl", jsonl(*({"messages": [long_prompt, A]} for _ in range(4))))
    cfg = env.config(env.run_config(train_file=path, data={"max_length": 16}))
    return Scenario(
        ["train", str(cfg)],
        str(path),
        ["anything left to train on", "4 dropped", "data.max_length"],
        out=env.tmp / "out",
    )


@case("classification-eval-label-not-in-training", needs=("tiny_bert_dir",))
def _eval_label(env: Env) -> Scenario:
    train_file = env.data("train.jsonl", jsonl(*sentiment_rows(12)))
    eval_file = env.data("eval.jsonl", jsonl({"text": "good movie", "label": "pos"}, {"text": "meh", "label": "meh"}))
    raw = env.run_config(model_dir=env.tiny_bert_dir, train_file=train_file)
    raw["model"]["task"] = "classification"
    raw["data"].update(format="classification", eval=str(eval_file))
    cfg = env.config(raw)
    return Scenario(
        ["train", str(cfg)],
        f"{eval_file}:2",
        ["field 'label' is 'meh'", "not one of the training labels: neg, pos", "cannot be evaluated"],
        out=env.tmp / "out",
    )


@case("chat-without-chat-template", needs=("no_template_model",))
def _no_template(env: Env) -> Scenario:
    cfg = env.config(env.run_config(model_dir=env.no_template_model))
    return Scenario(
        ["train", str(cfg)],
        "data.template",
        [str(env.no_template_model), "has no chat template", "data.template: chatml"],
        out=env.tmp / "out",
    )


# --- config files and --set -------------------------------------------------------------------------------------
@case("bad-yaml-syntax", via="subprocess")
def _bad_yaml(env: Env) -> Scenario:
    cfg = env.config("model:\n  path: m\n data: [\n")
    return Scenario(["train", str(cfg)], f"{cfg}:3", ["invalid YAML", "fix the YAML syntax"], out=env.tmp / "out")


@case("unknown-config-key", via="subprocess")
def _unknown_key(env: Env) -> Scenario:
    raw = env.run_config()
    raw["train"]["warmup_step"] = 5
    cfg = env.config(raw)
    line = cfg.read_text().splitlines().index("  warmup_step: 5") + 1
    return Scenario(
        ["train", str(cfg)], f"{cfg}:{line}: train.warmup_step", ["unknown key (did you mean 'warmup_steps'?)"],
        out=env.tmp / "out",
    )  # fmt: skip


@case("wrong-config-value-type")
def _wrong_type(env: Env) -> Scenario:
    raw = env.run_config(train={"batch_size": "many"})
    cfg = env.config(raw)
    line = cfg.read_text().splitlines().index("  batch_size: many") + 1
    return Scenario(["train", str(cfg)], f"{cfg}:{line}: train.batch_size", ["valid integer"], out=env.tmp / "out")


@case("classification-task-with-chat-format")
def _task_vs_format(env: Env) -> Scenario:
    cfg = env.config(env.run_config(model={"task": "classification"}))
    return Scenario(
        ["train", str(cfg)],
        "model.task is 'classification' but data.format is 'chat'",
        [str(cfg), "use data.format 'classification' exactly when"],
        out=env.tmp / "out",
    )


@case("full-method-with-quant")
def _full_with_quant(env: Env) -> Scenario:
    raw = env.run_config(method="full", quant={"bits": 4})
    del raw["lora"]  # full fine-tuning has no adapter settings (a lora section is its own error, below)
    cfg = env.config(raw)
    return Scenario(
        ["train", str(cfg)], "quant is set but method is 'full'", [str(cfg), "use method: qlora"], out=env.tmp / "out"
    )


@case("lora-section-with-full-method")
def _full_with_lora(env: Env) -> Scenario:
    cfg = env.config(env.run_config(method="full"))
    line = cfg.read_text().splitlines().index("lora:") + 1
    return Scenario(
        ["train", str(cfg)], f"{cfg}:{line}: lora", ["method is 'full'", "remove the lora section"], out=env.tmp / "out"
    )


@case("warmup-steps-and-ratio")
def _two_warmups(env: Env) -> Scenario:
    cfg = env.config(env.run_config(train={"warmup_steps": 5, "warmup_ratio": 0.1}))
    line = cfg.read_text().splitlines().index("train:") + 1
    return Scenario(
        ["train", str(cfg)], f"{cfg}:{line}: train", ["warmup_steps or warmup_ratio, not both"], out=env.tmp / "out"
    )


@case("set-without-equals", via="subprocess")
def _set_no_equals(env: Env) -> Scenario:
    cfg = env.config(env.run_config())
    return Scenario(
        ["train", str(cfg), "--set", "train.max_steps"],
        "--set 'train.max_steps'",
        ["expected KEY=VALUE", "--set train.max_steps=50"],
        out=env.tmp / "out",
    )


@case("set-unknown-key")
def _set_unknown(env: Env) -> Scenario:
    cfg = env.config(env.run_config())
    return Scenario(
        ["train", str(cfg), "--set", "train.max_step=5"],
        "train.max_step",
        [str(cfg), "--set train.max_step=5: train.max_step: unknown key (did you mean 'max_steps'?)"],
        out=env.tmp / "out",
    )


@case("config-key-written-twice")
def _key_twice(env: Env) -> Scenario:
    raw = env.run_config()
    text = yaml.safe_dump(raw, sort_keys=False).replace("  r: 4\n", "  r: 4\n  alpha: 8\n  r: 64\n", 1)
    cfg = env.config(text)
    line = text.splitlines().index("  r: 64") + 1
    return Scenario(["train", str(cfg)], f"{cfg}:{line}", ["lora.r is set twice", "keep one"], out=env.tmp / "out")


@case("config-file-missing")
def _config_missing(env: Env) -> Scenario:
    path = env.tmp / "nope.yaml"
    return Scenario(["validate", str(path)], str(path), ["does not exist", "YAML run config"])


# --- models ---------------------------------------------------------------------------------------------------
@case("model-path-missing")
def _model_missing(env: Env) -> Scenario:
    path = env.tmp / "no-such-model"
    cfg = env.config(env.run_config(model_dir=path))
    return Scenario(["train", str(cfg)], f"model.path {path}", ["does not exist", "hub id"], out=env.tmp / "out")


@case("model-path-not-a-model")
def _not_a_model(env: Env) -> Scenario:
    (env.tmp / "empty").mkdir()
    cfg = env.config(env.run_config(model_dir=env.tmp / "empty"))
    return Scenario(
        ["train", str(cfg)], f"model.path {env.tmp / 'empty'}", ["no config.json", "save_pretrained"],
        out=env.tmp / "out",
    )  # fmt: skip


@case("model-path-is-a-file")
def _model_file(env: Env) -> Scenario:
    path = env.data("model.bin", b"\x00" * 16)
    cfg = env.config(env.run_config(model_dir=path))
    return Scenario(
        ["train", str(cfg)], f"model.path {path}", ["is a file, not a model directory", ".gguf file"],
        out=env.tmp / "out",
    )  # fmt: skip


def _quantized_folder(env: Env) -> Path:
    from transformers import AutoModelForCausalLM

    from bittune.quant import quantize
    from bittune.quant.io import save_quantized
    from bittune.quant.spec import IntSpec

    folder = env.tmp / "int4"
    folder.mkdir()
    spec = IntSpec(bits=4, group_size=16)
    model = quantize(AutoModelForCausalLM.from_pretrained(env.tiny_llama_dir), spec)
    save_quantized(model, folder, spec=spec, task="causal-lm", tokenizer=None)
    for f in env.tiny_llama_dir.iterdir():  # a quantize output carries its tokenizer
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


@case("model-path-is-a-quantized-folder")
def _model_quantized(env: Env) -> Scenario:
    # Training it would silently start from random weights: transformers finds none of the float names.
    path = _quantized_folder(env)
    cfg = env.config(env.run_config(model_dir=path))
    return Scenario(
        ["train", str(cfg)], f"model.path {path}", ["`bittune quantize` output", "full-precision model"],
        out=env.tmp / "out",
    )  # fmt: skip


@case("validate-a-quantized-folder")
def _validate_quantized(env: Env) -> Scenario:
    path = _quantized_folder(env)
    cfg = env.config(env.run_config(model_dir=path))
    return Scenario(["validate", str(cfg)], f"model.path {path}", ["`bittune quantize` output"], out=env.tmp / "out")


@case("gguf-truncated")
def _gguf_truncated(env: Env) -> Scenario:
    path = env.data("model.gguf", b"GGUF")
    cfg = env.config(env.run_config(model_dir=path))
    return Scenario(["train", str(cfg)], str(path), ["is not a readable GGUF file", "re-download"], out=env.tmp / "out")


@case("gguf-of-unsupported-architecture")
def _gguf_unsupported(env: Env) -> Scenario:
    import gguf
    import numpy as np

    path = env.tmp / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cfg = env.config(env.run_config(model_dir=path))
    return Scenario(
        ["train", str(cfg)], str(path), ["holds a 'bert' model", "llama", "qwen2", "original"], out=env.tmp / "out"
    )


@case("lora-target-modules-not-in-model-validate")
def _bad_targets_validate(env: Env) -> Scenario:
    cfg = env.config(env.run_config(lora={"target_modules": ["qkv_proj"]}))
    return Scenario(["validate", str(cfg)], "lora.target_modules", ["qkv_proj", "all-linear"], out=env.tmp / "out")


@case("lora-target-modules-not-in-model")
def _bad_targets(env: Env) -> Scenario:
    cfg = env.config(env.run_config(lora={"target_modules": ["qkv_proj"]}))
    return Scenario(["train", str(cfg)], "lora.target_modules", ["qkv_proj", "all-linear"], out=env.tmp / "out")


# --- devices and precision on CPU -------------------------------------------------------------------------------
@case("paged-optimizer-on-cpu")
def _paged(env: Env) -> Scenario:
    cfg = env.config(env.run_config(train={"optimizer": "paged_adamw_8bit"}))
    return Scenario(
        ["train", str(cfg)], "train.optimizer paged_adamw_8bit", ["on the CPU", "adamw_8bit"], out=env.tmp / "out"
    )


@case("qlora-bf16-compute-on-cpu")
def _bf16_compute(env: Env) -> Scenario:
    cfg = env.config(env.run_config(method="qlora", quant={"compute_dtype": "bfloat16"}))
    return Scenario(
        ["train", str(cfg)], "quant.compute_dtype bfloat16", ["on CPU", "auto or float32"], out=env.tmp / "out"
    )


@case("bf16-mixed-precision-on-cpu")
def _bf16_autocast(env: Env) -> Scenario:
    cfg = env.config(env.run_config(train={"mixed_precision": "bf16"}))
    return Scenario(
        ["train", str(cfg)], "train.mixed_precision 'bf16'", ["needs a GPU", "'auto' or 'no'"], out=env.tmp / "out"
    )


# --- several processes and trackers -----------------------------------------------------------------------------
@case("deepspeed-on-cpu")
def _deepspeed_cpu(env: Env) -> Scenario:
    cfg = env.config(env.run_config(distributed={"strategy": "deepspeed"}))
    return Scenario(
        ["train", str(cfg)], "distributed.strategy deepspeed", ["needs CUDA GPUs", "strategy fsdp"], out=env.tmp / "out"
    )


@case("zero-stage-without-deepspeed")
def _zero_stage_ddp(env: Env) -> Scenario:
    cfg = env.config(env.run_config(distributed={"strategy": "fsdp", "zero_stage": 3}))
    line = cfg.read_text().splitlines().index("distributed:") + 1
    return Scenario(["train", str(cfg)], f"{cfg}:{line}: distributed", ["deepspeed only"], out=env.tmp / "out")


@case("unknown-tracker")
def _unknown_tracker(env: Env) -> Scenario:
    cfg = env.config(env.run_config(tracking={"backends": ["tensorboard", "comet"]}))
    return Scenario(
        ["train", str(cfg)],
        "tracking.backends.1",
        ["'tensorboard', 'wandb', 'mlflow' or 'trackio'"],
        out=env.tmp / "out",
    )


@case("nproc-inside-a-launcher")
def _nproc_in_launcher(env: Env) -> Scenario:
    env.monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = env.config(env.run_config())
    return Scenario(
        ["train", str(cfg), "--nproc", "2"], "--nproc 2", ["started 3 processes", "drop --nproc"], out=env.tmp / "out"
    )


# --- output directories and resume ------------------------------------------------------------------------------
@case("output-dir-holds-a-finished-run", via="subprocess", needs=("finished_run",))
def _finished_without_resume(env: Env) -> Scenario:
    run = env.copy_run(env.finished_run)
    cfg = env.config(env.run_config())
    return Scenario(
        ["train", str(cfg)], f"output_dir {run}", ["already holds a run", "--resume", "never overwrites"],
        protected=run,
    )  # fmt: skip


@case("output-dir-in-use-by-a-live-job")
def _live_lock(env: Env) -> Scenario:
    run = env.tmp / "out"
    run.mkdir()
    holder = env.extra["holder"] = subprocess.Popen(["sleep", "120"])  # a live pid on this host
    (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}))
    cfg = env.config(env.run_config())
    return Scenario(
        ["train", str(cfg)], f"output_dir {run}", [f"in use by another bittune job (pid {holder.pid}", "wait for"],
        protected=run,
    )  # fmt: skip


@case("resume-with-corrupt-checkpoint", needs=("stopped_run",))
def _corrupt_checkpoint(env: Env) -> Scenario:
    run = env.copy_run(env.stopped_run)
    weights = run / "checkpoints" / "step-4" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = env.config(env.run_config(train={"max_steps": 6, "save_every": 2}))
    return Scenario(
        ["train", str(cfg), "--resume"],
        f"checkpoint {run / 'checkpoints' / 'step-4'} is corrupt",
        ["delete that step folder"],
        protected=run,
    )


@case("resume-a-finished-run", needs=("finished_run",))
def _resume_finished(env: Env) -> Scenario:
    run = env.copy_run(env.finished_run)
    cfg = env.config(env.run_config())
    return Scenario(
        ["train", str(cfg), "--resume"], str(run), ["has already finished", "another output_dir"], protected=run
    )


@case("disk-full-mid-checkpoint")
def _disk_full(env: Env) -> Scenario:
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}
    run = env.tmp / "out"

    def full_disk(tensors: dict, path: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            env.extra["before"] = snapshot(run / "checkpoints" / "step-2")  # the checkpoint that must survive
            real(tensors, path, *args, **kwargs)  # half a file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, *args, **kwargs)

    env.monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    cfg = env.config(env.run_config(train={"max_steps": 6, "save_every": 2}))
    return Scenario(
        ["train", str(cfg)],
        f"could not write {run / 'checkpoints' / 'step-4'}",
        ["No space left on device", "free disk space"],
        mid_run=True,
    )


# --- eval and generate ------------------------------------------------------------------------------------------
@case("report-folder-holds-a-users-file", needs=("finished_run",))
def _report_over_user_file(env: Env) -> Scenario:
    run = env.copy_run(env.finished_run)
    (run / "report").mkdir()
    (run / "report" / "my_notes.txt").write_text("mine")
    return Scenario(
        ["report", str(run), "--no-base"], f"the report folder {run / 'report'}",
        ["already holds other files", "my_notes.txt"], protected=run,
    )  # fmt: skip


@case("report-of-a-run-with-a-damaged-summary", needs=("finished_run",))
def _report_damaged_summary(env: Env) -> Scenario:
    run = env.copy_run(env.finished_run)
    (run / "summary.json").write_text('{"steps": 2,\n "memory": {bad')
    return Scenario(["report", str(run), "--no-base"], f"{run / 'summary.json'}:2", ["not valid JSON", "restore"],
                    protected=run)  # fmt: skip


@case("merge-into-bits-its-method-does-not-store", needs=("finished_run",))
def _merge_bits_method(env: Env) -> Scenario:
    run = env.copy_run(env.finished_run)
    out = env.tmp / "merged"
    return Scenario(["merge", str(run), "--out", str(out), "--into-quantized", "3", "--method", "nf4"],
                    "--method nf4", ["--into-quantized 4 with nf4"], out=out, protected=run)  # fmt: skip


@case("set-value-not-yaml")
def _set_not_yaml(env: Env) -> Scenario:
    cfg = env.config(env.run_config())
    item = "lora.target_modules=[q_proj"
    return Scenario(["validate", str(cfg), "--set", item], f"--set '{item}'", ["not valid YAML"])


@case("distill-teacher-missing")
def _teacher_missing(env: Env) -> Scenario:
    gone = env.tmp / "no-teacher"
    cfg = env.config(env.run_config(distill={"teacher": str(gone)}))
    return Scenario(["train", str(cfg)], "distill.teacher", [str(gone), "does not exist"], out=env.tmp / "out")


@case("eval-labels-name-no-label")
def _eval_labels_empty(env: Env) -> Scenario:
    return Scenario(["eval", str(env.tiny_llama_dir), "--data", str(env.chat_file), "--labels", ","], "--labels ','",
                    ["names 0 label(s)", "--labels a,b,c"])  # fmt: skip


@case("report-gguf-missing", needs=("finished_run",))
def _report_gguf_missing(env: Env) -> Scenario:
    run = env.copy_run(env.finished_run)
    gone = env.tmp / "gone.gguf"
    return Scenario(["report", str(run), "--no-base", "--gguf", str(gone)], f"--gguf {gone}", ["does not exist"],
                    protected=run)  # fmt: skip


@case("config-path-is-a-directory")
def _config_dir(env: Env) -> Scenario:
    return Scenario(["validate", str(env.tmp)], f"config file {env.tmp}", ["is a directory"])


@case("export-out-under-a-file")
def _export_out_under_file(env: Env) -> Scenario:
    (env.tmp / "afile").write_text("mine")
    out = env.tmp / "afile" / "m.gguf"
    return Scenario(["export", str(env.tiny_llama_dir), "--out", str(out)], f"--out {out}",
                    ["is a file, not a folder"])  # fmt: skip


@case("train-output-dir-under-a-file")
def _output_dir_under_file(env: Env) -> Scenario:
    (env.tmp / "afile").write_text("mine")
    cfg = env.config({**env.run_config(), "output_dir": str(env.tmp / "afile" / "run")})
    return Scenario(["train", str(cfg)], "output_dir", ["is a file, not a folder"], protected=env.tmp / "afile")


@case("quantize-out-under-a-file")
def _quantize_out_under_file(env: Env) -> Scenario:
    (env.tmp / "afile").write_text("mine")
    out = env.tmp / "afile" / "q"
    return Scenario(
        ["quantize", str(env.tiny_llama_dir), "--out", str(out), "--bits", "4", "--method", "int",
         "--group-size", "16"], f"--out {out}", ["is a file, not a folder"],
    )  # fmt: skip


def _truncated_model(env: Env) -> Path:
    """A copy of the tiny Llama whose weights file was cut short (an interrupted copy or download)."""
    model = env.tmp / "trunc"
    shutil.copytree(env.tiny_llama_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


for _command in ("train", "validate", "plan"):

    def _build(env: Env, command: str = _command) -> Scenario:
        model = _truncated_model(env)
        cfg = env.config(env.run_config(model={"path": str(model)}))
        return Scenario([command, str(cfg)], str(model / "model.safetensors"),
                        ["damaged or incomplete", "again"], out=env.tmp / "out", protected=model)  # fmt: skip

    CASES[f"truncated-weights-{_command}"] = Case(_build)


@case("model-folder-without-its-tokenizer")
def _no_tokenizer(env: Env) -> Scenario:
    model = env.tmp / "no-tok"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(env.tiny_llama_dir / name, model / name)
    cfg = env.config(env.run_config(model={"path": str(model)}))
    return Scenario(["validate", str(cfg)], str(model), ["could not load the model folder", "incomplete or damaged"],
                    protected=model)  # fmt: skip


@case("truncated-weights-export")
def _truncated_export(env: Env) -> Scenario:
    model = _truncated_model(env)
    return Scenario(["export", str(model), "--out", str(env.tmp / "m.gguf")], str(model / "model.safetensors"),
                    ["damaged or incomplete"], out=env.tmp / "m.gguf", protected=model)  # fmt: skip


@case("truncated-adapter-generate", needs=("finished_run",))
def _truncated_adapter(env: Env) -> Scenario:
    run = env.copy_run(env.finished_run)
    adapter = run / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])
    return Scenario(["generate", str(run), "--prompt", "hi"], str(adapter), ["damaged or incomplete"], protected=run)


@case("eval-without-data", needs=("finished_run",))
def _eval_no_data(env: Env) -> Scenario:
    run = env.copy_run(env.finished_run)
    return Scenario(["eval", str(run)], str(run), ["no evaluation data", "--data FILE"], protected=run)


@case(
    "generate-on-a-classifier-run",
    needs=("classifier_run",),
)
def _generate_classifier_run(env: Env) -> Scenario:
    run = env.copy_run(env.classifier_run)
    return Scenario(
        ["generate", str(run), "--prompt", "hello"], str(run), ["is a classifier", "bittune eval"], protected=run
    )


@case(
    "generate-on-a-classifier-folder",
    needs=("classifier_model",),
)
def _generate_classifier(env: Env) -> Scenario:
    return Scenario(
        ["generate", str(env.classifier_model), "--prompt", "hello"],
        str(env.classifier_model),
        ["is a classifier", "bittune eval"],
        protected=env.classifier_model,
    )


# --- export and push --------------------------------------------------------------------------------------------
@case("export-gguf-of-a-bert")
def _export_bert(env: Env) -> Scenario:
    from tiny import make_tiny_bert

    bert = make_tiny_bert(env.tmp / "bert", _tok())
    out = env.tmp / "m.gguf"
    return Scenario(
        ["export", str(bert), "--out", str(out)], str(bert),
        ["is a BertModel", "supports LlamaForCausalLM", "Qwen2ForCausalLM", "--format hf"], out=out, protected=bert,
    )  # fmt: skip


@case("export-gguf-of-a-gpt2")
def _export_gpt2(env: Env) -> Scenario:
    from tiny import make_tiny

    gpt2 = make_tiny(env.tmp / "gpt2", _tok(), "gpt2")
    out = env.tmp / "m.gguf"
    return Scenario(
        ["export", str(gpt2), "--out", str(out), "--type", "q8_0"], str(gpt2),
        ["is a GPT2LMHeadModel", "MistralForCausalLM (Mistral)"], out=out, protected=gpt2,
    )  # fmt: skip


def _tok() -> Any:
    from tiny import make_tokenizer

    return make_tokenizer()


@case("export-unknown-type")
def _export_type(env: Env) -> Scenario:
    out = env.tmp / "m.gguf"
    return Scenario(
        ["export", str(env.tiny_llama_dir), "--out", str(out), "--type", "q4_k"], "--type 'q4_k'",
        ["f32, f16, q8_0, q4_0"], out=out,
    )  # fmt: skip


@case("export-unknown-format")
def _export_format(env: Env) -> Scenario:
    out = env.tmp / "m.onnx"
    return Scenario(
        ["export", str(env.tiny_llama_dir), "--out", str(out), "--format", "onnx"], "--format 'onnx'",
        ["gguf, gguf-lora, hf"], out=out,
    )  # fmt: skip


@case("export-out-is-a-directory")
def _export_out_dir(env: Env) -> Scenario:
    (env.tmp / "models").mkdir()
    return Scenario(
        ["export", str(env.tiny_llama_dir), "--out", str(env.tmp / "models")], f"--out {env.tmp / 'models'}",
        ["is a directory", "model.gguf"], protected=env.tmp / "models",
    )  # fmt: skip


@case("export-over-a-user-file")
def _export_over_user_file(env: Env) -> Scenario:
    mine = env.tmp / "mine"
    mine.mkdir()
    (mine / "notes.gguf").write_text("my notes, not a model")
    return Scenario(
        ["export", str(env.tiny_llama_dir), "--out", str(mine / "notes.gguf")], f"--out {mine / 'notes.gguf'}",
        ["is not a GGUF file", "new file name"], protected=mine,
    )  # fmt: skip


@case("export-over-the-gguf-it-reads")
def _export_over_source(env: Env) -> Scenario:
    from bittune.export.commands import export_model

    mine = env.tmp / "mine"
    mine.mkdir()
    export_model(str(env.tiny_llama_dir), fmt="gguf", qtype="f32", out=mine / "m.gguf")
    return Scenario(
        ["export", str(mine / "m.gguf"), "--out", str(mine / "m.gguf"), "--type", "q8_0"], f"--out {mine / 'm.gguf'}",
        ["is the model this export reads", "new file"], protected=mine,
    )  # fmt: skip


@case("export-out-folder-missing")
def _export_out_parent(env: Env) -> Scenario:
    out = env.tmp / "no" / "such" / "m.gguf"
    return Scenario(
        ["export", str(env.tiny_llama_dir), "--out", str(out)], f"--out {out}", ["does not exist", "mkdir -p"],
        out=env.tmp / "no",
    )  # fmt: skip


@case("export-hf-into-a-folder-with-other-files")
def _export_hf_busy(env: Env) -> Scenario:
    busy = env.tmp / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    return Scenario(
        ["export", str(env.tiny_llama_dir), "--format", "hf", "--out", str(busy)], f"--out {busy}",
        ["already holds other files", "new folder"], protected=busy,
    )  # fmt: skip


@case("export-verify-with-hf-format")
def _export_verify_hf(env: Env) -> Scenario:
    out = env.tmp / "hf"
    return Scenario(
        ["export", str(env.tiny_llama_dir), "--format", "hf", "--out", str(out), "--verify"], "--verify",
        ["--format gguf"], out=out,
    )  # fmt: skip


@case("export-verify-without-llama-cpp")
def _export_verify_missing(env: Env) -> Scenario:
    env.monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    out = env.tmp / "m.gguf"
    return Scenario(
        ["export", str(env.tiny_llama_dir), "--out", str(out), "--verify"], "--verify",
        ["llama-cpp-python", "make llamacpp"], out=out,
    )  # fmt: skip


@case("export-gguf-of-a-classifier-run", needs=("classifier_run",))
def _export_classifier(env: Env) -> Scenario:
    run = env.copy_run(env.classifier_run)
    out = env.tmp / "m.gguf"
    return Scenario(
        ["export", str(run), "--out", str(out)], str(run), ["sequence classifier", "--format hf"], out=out,
        protected=run,
    )  # fmt: skip


@case("export-an-unfinished-run", needs=("stopped_run",))
def _export_unfinished(env: Env) -> Scenario:
    run = env.copy_run(env.stopped_run)
    out = env.tmp / "m.gguf"
    return Scenario(
        ["export", str(run), "--out", str(out)], str(run), ["no finished adapter/", "--resume"], out=out,
        protected=run,
    )  # fmt: skip


@case("export-gguf-with-an-unsupported-tokenizer")
def _export_tokenizer(env: Env) -> Scenario:
    from tiny import tokenizer_with_pre

    model = env.tmp / "ws-model"
    shutil.copytree(env.tiny_llama_dir, model)
    tokenizer_with_pre({"type": "Whitespace"}).save_pretrained(model)
    out = env.tmp / "m.gguf"
    return Scenario(
        ["export", str(model), "--out", str(out)], "Whitespace",
        ["not one the GGUF export can reproduce", "smollm", "convert_hf_to_gguf.py"], out=out, protected=model,
    )  # fmt: skip


@case("push-bad-repo-id")
def _push_repo(env: Env) -> Scenario:
    return Scenario(
        ["push", str(env.tiny_llama_dir), "--repo", "just-a-name"], "--repo 'just-a-name'", ["owner/name"],
    )  # fmt: skip


@case("push-without-a-token", needs=("finished_run",))
def _push_no_token(env: Env) -> Scenario:
    import huggingface_hub.constants

    env.monkeypatch.delenv("HF_TOKEN", raising=False)
    env.monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # no stored login either (the path is read when huggingface_hub is imported, so patch the constant)
    env.monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(env.tmp / "hf-home" / "token"))
    run = env.copy_run(env.finished_run)
    return Scenario(
        ["push", str(run), "--repo", "alice/colors"], "alice/colors", ["no Hugging Face token", "hf auth login"],
        out=env.tmp / "hf-home", protected=run,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The test


def _params() -> list[Any]:
    out = []
    for name, c in CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _params())
def test_bad_input_gives_one_clean_error(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    c = CASES[name]
    # Only the fixtures a case names are built: the module-level runs cost a few seconds each.
    needed = ("tiny_llama_dir", "chat_file", *c.needs)
    env = Env(tmp_path, {f: request.getfixturevalue(f) for f in needed}, monkeypatch)
    sc = c.build(env)
    before = snapshot(sc.protected) if sc.protected else {}
    try:
        code, err = run_subprocess(sc.argv) if c.via == "subprocess" else run_inproc(sc.argv, capsys)
    finally:
        if (holder := env.extra.get("holder")) is not None:
            holder.kill()
            holder.wait()

    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}: {err}"
    message = err[err.rfind("error: ") :] if sc.mid_run else err
    assert message.startswith("error: "), err
    assert message.count("error: ") == 1, err
    assert sc.where in message, f"{sc.where!r} not in {message!r}"
    for needle in sc.needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert "\n  fix: " in message, f"no fix line in {message!r}"
    if sc.out is not None:
        assert not sc.out.exists(), f"{sc.out} was created: {sorted(p.name for p in sc.out.iterdir())}"
    if sc.protected is not None:
        after = snapshot(sc.protected)
        changed = sorted(k for k in before.keys() ^ after.keys()) + sorted(
            k for k in before.keys() & after.keys() if before[k] != after[k]
        )
        assert not changed, f"{sc.protected} changed: {changed}"
    if name == "disk-full-mid-checkpoint":
        ckpts = tmp_path / "out" / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-2"], "a temp folder or a half checkpoint is left"
        assert snapshot(ckpts / "step-2") == env.extra["before"], "the previous checkpoint changed"
        assert not (tmp_path / "out" / "adapter").exists()
        assert not (tmp_path / "out" / ".lock").exists(), "the failed job left its .lock behind"


def test_catalogue_has_at_least_30_cases() -> None:
    assert len(CASES) >= 30, len(CASES)


def test_rows_longer_than_max_length_are_counted_not_refused(
    tmp_path: Path, tiny_llama_dir: Path, chat_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Truncation is not an error: ``validate`` reports how many rows were cut, and exits 0."""
    cfg = tmp_path / "c.yaml"
    raw = base_config(tiny_llama_dir, chat_file, tmp_path / "out")
    raw["data"]["max_length"] = 32  # the rows are 37 tokens: the end of each reply is cut, the rest is kept
    cfg.write_text(yaml.safe_dump(raw))
    code, err = run_inproc(["validate", str(cfg)], capsys)
    assert code == 0, err
    assert "warning: train: 16 rows are longer than data.max_length=32" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_eval_of_a_classifier_folder_with_default_labels(
    tmp_path: Path, classifier_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a bad input: the valid neighbour of generate-on-a-classifier-folder, which fails for the same reason."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_jsonl(tmp_path / "s.jsonl", [{"text": "good movie", "label": 1}, {"text": "bad movie", "label": 0}])
    code, out, err = run_cli(["eval", str(classifier_model), "--data", str(data)], capsys)
    assert code == 0, err
    result = json.loads(out)
    metrics = {"eval_loss", "eval_accuracy", "eval_f1_macro", "confusion", "rows", "data"}
    assert metrics <= set(result) and result["rows"] == 2 and result["task"] == "classification"
    assert sum(map(sum, result["confusion"]["matrix"])) == 2
    # The numbers are stock transformers' on the same rows: label ids 1 and 0 are LABEL_1 and LABEL_0.
    tok = AutoTokenizer.from_pretrained(classifier_model)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_model).eval()
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        logits = model(**tok(["good movie", "bad movie"], return_tensors="pt", padding=True)).logits
    assert result["eval_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert result["eval_accuracy"] == float((logits.argmax(-1) == labels).float().mean())


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train"], "Missing argument"),
        (["validate", "c.yaml", "--foo"], "No such option: --foo"),
        (["trian", "c.yaml"], "No such command 'trian'"),
        (["eval", "m", "--data", "d.jsonl", "--batch-size", "abc"], "Invalid value for '--batch-size'"),
        (["compare", "a", "b"], "Missing option '--data'"),
        (["eval", "m", "--data", "d.jsonl", "--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["generate", "m", "-p", "hi", "--max-new-tokens", "-5"], "Invalid value for '--max-new-tokens'"),
        (["generate", "m", "-p", "hi", "--temperature", "-1"], "Invalid value for '--temperature'"),
        (["plan", "c.yaml", "--matmul-tflops", "-5"], "Invalid value for '--matmul-tflops'"),
        (["quantize", "m", "--out", "q", "--max-rows", "0"], "Invalid value for '--max-rows'"),
    ],
    ids=[
        "missing-argument",
        "unknown-option",
        "unknown-command",
        "not-an-integer",
        "missing-option",
        "zero-batch-size",
        "negative-new-tokens",
        "negative-temperature",
        "negative-rate",
        "zero-rows",
    ],
)
def test_command_line_usage_errors_are_a_usage_line_and_exit_2(argv, needle, capsys):
    """Mistakes in the command line itself: the usage and one error line, exit 2, no traceback, before anything
    is read or loaded."""
    code, err = run_inproc(argv, capsys)
    assert code == 2 and needle in err and "Traceback" not in err and "Usage: " in err, err
