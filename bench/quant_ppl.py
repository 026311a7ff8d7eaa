"""Perplexity and size of SmolLM2-135M-Instruct under every post-training quantization bittune offers.

Text: the English chatterbot-corpus conversations (shipped in the ``chatterbot-corpus`` package that ``make install``
adds), as plain text rows of about 400 words, the first ``--tokens`` tokens' worth. Each configuration is quantized
from the same fp32 model, saved, reloaded from disk and evaluated on the same rows with ``bittune``'s own
evaluation (token-weighted loss over every token). GPTQ calibrates on the rows *after* the evaluation rows (8,192
tokens of other conversations from the same corpus). Results go to ``bench/results/quant_ppl.md`` and ``.json``.

    python bench/quant_ppl.py                   # ~30 min on 2 CPU cores (longer when they are shared)
    python bench/quant_ppl.py --only fp32 int3-g64 hqq3-g64
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bittune.artifacts import load
from bittune.demo.assets import prepare_smollm2
from bittune.inference import prepare_eval_rows
from bittune.quant import quantize
from bittune.quant.api import calibration_batches
from bittune.quant.io import save_quantized
from bittune.quant.report import measure, quality_delta, weights_size
from bittune.quant.select import quantizable_linears
from bittune.quant.spec import BnbSpec, CastSpec, GptqSpec, HqqSpec, IntSpec

MB = 1024**2
CONFIGS = {
    "fp32": None,
    "fp16": CastSpec(method="fp16"),
    "llm-int8": BnbSpec(method="llm-int8"),
    "nf4-dq": BnbSpec(method="nf4"),
    "int4-g64": IntSpec(bits=4, group_size=64),
    "int3-g64": IntSpec(bits=3, group_size=64),
    "int2-g64": IntSpec(bits=2, group_size=64),
    "hqq4-g64": HqqSpec(bits=4, group_size=64),
    "hqq3-g64": HqqSpec(bits=3, group_size=64),
    "hqq2-g64": HqqSpec(bits=2, group_size=64),
    "gptq4-g64": GptqSpec(bits=4, group_size=64),
    "gptq3-g64": GptqSpec(bits=3, group_size=64),
    "gptq2-g64": GptqSpec(bits=2, group_size=64),
}


def text_rows(max_words: int = 400) -> list[dict[str, str]]:
    """The corpus's English conversations as text rows of at most ``max_words`` words, in file order."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps chatterbot-corpus==1.3.3 (make install does)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    lines: list[str] = []
    n_words = 0
    rows = []
    for f in sorted(folder.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
            lines += [str(turn) for turn in conv if turn is not None]
            n_words += sum(len(line.split()) for line in lines[-len(conv) :])
            if n_words >= max_words:
                rows.append({"text": "\n".join(lines)})
                lines, n_words = [], 0
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16000, help="Evaluation tokens (approximate).")
    ap.add_argument("--only", nargs="*", help=f"Configurations to run (default all: {', '.join(CONFIGS)}).")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = prepare_smollm2(log=lambda m: print(m, file=sys.stderr))
    work = Path(tempfile.mkdtemp(prefix="bittune-quant-bench-"))
    data = work / "text.jsonl"
    tokenizer = load(str(model_dir), device="cpu")[1]
    rows, calib_rows, total = [], [], 0
    for r in text_rows():
        if total >= args.tokens:
            calib_rows.append({"input_ids": tokenizer(r["text"])["input_ids"]})
            continue
        rows.append(r)
        total += len(tokenizer(r["text"])["input_ids"])
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    opts = {"fmt": "text", "max_length": 1024}
    results, reference = [], None
    try:
        for name in args.only or list(CONFIGS):
            spec = CONFIGS[name]
            t0 = time.perf_counter()
            model, tokenizer, task = load(str(model_dir), device="cpu")
            eval_rows = prepare_eval_rows(str(model_dir), tokenizer, task, data=str(data), **opts)
            if spec is None:
                entry = {"name": name, "size_mb": round(weights_size(model_dir) / MB, 1)}
                entry["body_bits_per_weight"] = 32.0
            else:
                body = [n for n, _ in quantizable_linears(model)]
                n_body = sum(model.get_submodule(n).weight.numel() for n in body)
                t1 = time.perf_counter()
                batches = None
                if isinstance(spec, GptqSpec):
                    batches = calibration_batches(calib_rows, spec.calibration_tokens)
                quantize(model, spec, calibration=batches)
                quant_s = time.perf_counter() - t1
                folder = work / name
                folder.mkdir()
                save_quantized(model, folder, spec=spec, task=task)
                body_bytes = _body_bytes(model, body)
                del model
                gc.collect()
                model = load(folder, device="cpu").model
                entry = {
                    "name": name,
                    "size_mb": round(weights_size(folder) / MB, 1),
                    "body_bits_per_weight": round(body_bytes * 8 / n_body, 2),
                    "quantize_s": round(quant_s, 1),
                }
            entry.update(measure(model, tokenizer, task, eval_rows, batch_size=8))
            if reference is None and spec is None:
                reference = entry
            entry["delta"] = quality_delta(reference, entry, task) if reference else {}
            entry["wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
            del model
            gc.collect()
            shutil.rmtree(work / name, ignore_errors=True)
            write(args, results, total, len(rows))  # after each configuration: partial results survive a stop
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _body_bytes(model: torch.nn.Module, names: list[str]) -> int:
    """Bytes of the quantized body layers' weights (codes + scales + zeros, or bitsandbytes weight + quant state)."""
    from bittune.training.memory import weights_footprint

    total = 0
    for name in names:
        module = model.get_submodule(name)
        bias = getattr(module, "bias", None)
        bias_bytes = bias.numel() * bias.element_size() if bias is not None else 0
        total += sum(weights_footprint(module).values()) - bias_bytes
    return total


def write(args: argparse.Namespace, results: list[dict], tokens: int, n_rows: int) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/quant_ppl.py" + (f" --only {' '.join(args.only)}" if args.only else "")
    lines = [
        "# Post-training quantization of SmolLM2-135M-Instruct (CPU)",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"Text: {n_rows} rows (~{tokens:,} tokens) of the English chatterbot-corpus conversations, format text. "
        "Every model is quantized from the same fp32 weights, saved, reloaded from disk and evaluated on the same "
        "rows. Body linears are quantized, the tied embedding/head stays fp32 (so sizes include 113 MB of it). "
        "GPTQ calibrates on 8,192 tokens of the corpus's later conversations (not the evaluation rows).",
        "",
        f"Command: `{cmd}`",
        "",
        "| config | size on disk (MB) | body bits/weight | perplexity | Δ ppl vs fp32 | loss | "
        "forward 1x128 (ms) | eval tokens/s | quantize (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in results:
        d = e.get("delta") or {}
        lines.append(
            f"| {e['name']} | {e['size_mb']:,.1f} | {e['body_bits_per_weight']:.2f} | {e['eval_perplexity']:,.3f} | "
            f"{(str(round(d['perplexity_pct'], 2)) + '%') if d else '-'} | {e['eval_loss']:.4f} | "
            f"{e['latency_ms']:,.0f} | {e['tokens_per_s']:,.0f} | {e.get('quantize_s', '-')} |"
        )
    (args.out / "quant_ppl.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "quant_ppl.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
