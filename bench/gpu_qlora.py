"""GPU benchmark: full, LoRA and QLoRA fine-tuning of a random-initialised ~1.1B Llama, side by side.

Every configuration trains the same model on the same packed token rows with the same hyperparameters, each in
its own process (so each peak is its own), through ``python -m bittune train``. Reported: median tokens/s over
the steps after warm-up, and peak CUDA memory allocated by torch.

    python bench/gpu_qlora.py --tokenizer DIR [--steps 30] [--out bench/results]

``--tokenizer`` is any Hugging Face tokenizer folder (the benchmark used SmolLM2's, vocab 49152); the model
weights are random, so no download is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

CONFIGS = {
    "full (bf16 autocast, AdamW)": {"method": "full", "train": {"lr": 1e-5}},
    "LoRA r=16 (bf16 base)": {"method": "lora"},
    "QLoRA NF4 + paged AdamW 8-bit": {
        "method": "qlora",
        "quant": {"bits": 4, "type": "nf4", "double_quant": True},
        "train": {"optimizer": "paged_adamw_8bit"},
    },
    "QLoRA NF4 + paged AdamW 8-bit + grad ckpt": {
        "method": "qlora",
        "quant": {"bits": 4, "type": "nf4", "double_quant": True},
        "train": {"optimizer": "paged_adamw_8bit", "gradient_checkpointing": True},
    },
    "LoRA on 8-bit base + paged AdamW 32-bit": {
        "method": "qlora",
        "quant": {"bits": 8},
        "train": {"optimizer": "paged_adamw_32bit"},
    },
}


def llama_1b_config(vocab: int = 49152):
    """TinyLlama's shape (1.1B parameters with SmolLM2's vocabulary of 49,152), the GPU benchmarks' model."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def make_model(path: Path, vocab: int, tokenizer_dir: str) -> int:
    """A TinyLlama-shaped (1.1B) Llama with random weights, saved in bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_1b_config(vocab)).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return n


def make_data(path: Path, rows: int = 2000) -> None:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(150, 400)))}) + "\n")


def run_config(overrides: dict, model: Path, data: Path, out: Path, steps: int, batch: int, seq: int) -> dict:
    """The run config of one configuration (full fine-tuning has no lora section: validation refuses one)."""
    cfg = {
        "model": {"path": str(model)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(data), "format": "text", "max_length": seq, "packing": True},
        "train": {"max_steps": steps, "batch_size": batch, "lr": 2e-4, "scheduler": "constant", "log_every": 1},
        "output_dir": str(out),
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    if cfg.get("method") == "full":
        del cfg["lora"]
    return cfg


def run_one(name: str, overrides: dict, model: Path, data: Path, out: Path, steps: int, batch: int, seq: int) -> dict:
    cfg = run_config(overrides, model, data, out, steps, batch, seq)
    cfg_file = out.with_suffix(".yaml")
    cfg_file.write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "bittune", "train", str(cfg_file)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"name": name, "error": proc.stderr[-2000:]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][3:]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "name": name,
        "tokens_per_s": statistics.median(tps),
        "peak_cuda_allocated_gb": summary["memory"]["peak_cuda_allocated_mb"] / 1024,
        "weights_gb": summary["memory"]["weights_mb"] / 1024,
        "trainable": summary["trainable_parameters"],
        "final_loss": records[-1].get("loss"),
        "wall_s": round(time.time() - t0, 1),
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--work", default="/tmp/bittune-gpu-bench")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--only", nargs="*", help="the configurations whose names start with these words")
    parser.add_argument("--make-model", action="store_true", help="only make the random model in --work")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
    model_dir = work / "llama-1.1b-random"
    made = model_dir / "n_params.txt"  # a model this script made earlier in the same --work is reused
    if not made.exists():
        n = make_model(model_dir, vocab, args.tokenizer)
        made.write_text(str(n))
    n_params = int(made.read_text())
    if args.make_model:
        return
    data = work / "text.jsonl"
    make_data(data)
    os.environ["HF_HUB_OFFLINE"] = "1"
    chosen = {k: v for k, v in CONFIGS.items() if not args.only or any(k.startswith(w) for w in args.only)}
    results = [
        run_one(name, overrides, model_dir, data, work / f"run-{i}", args.steps, args.batch, args.seq)
        for i, (name, overrides) in enumerate(chosen.items())
    ]

    device = torch.cuda.get_device_name(0)
    lines = [
        f"Random-initialised Llama, {n_params / 1e9:.2f}B parameters (hidden 2048, 22 layers, vocab {vocab}), "
        f"{device}, torch {torch.__version__}; batch {args.batch} x {args.seq} packed tokens, "
        f"{args.steps} steps, LoRA r=16 on all linear layers, bf16 compute.",
        "",
        "| configuration | tokens/s (median) | peak CUDA allocated (GB) | weights (GB) | trainable params |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed | | | |")
            print(r["error"], file=sys.stderr)
            continue
        lines.append(
            f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['peak_cuda_allocated_gb']:.2f} | "
            f"{r['weights_gb']:.2f} | {r['trainable']:,} |"
        )
    command = " ".join("DIR" if a == args.tokenizer else a for a in sys.argv[1:])
    lines += ["", f"Command: `python bench/gpu_qlora.py {command}`"]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_qlora" if not args.only else "gpu_qlora_" + "_".join(w.lower().replace(" ", "") for w in args.only)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
