"""What an importance matrix from your own text buys the K-quants, measured in llama.cpp (SmolLM2-135M-Instruct).

SmolLM2 is exported as f16 and as q4_k_m / q3_k_m / q2_k through llama.cpp's own quantizer, each without and with an
importance matrix that bittune computes in transformers (``bittune export --imatrix``). Perplexity is measured *in
llama.cpp* (llama-cpp-python, f32 KV cache) on held-out text: the English chatterbot-corpus conversations
(``chatterbot-corpus``, installed by ``make install``) as in ``bench/quant_ppl.py``, the first ``--tokens`` tokens'
worth of rows. The imatrix is computed on ``--imatrix-tokens`` tokens of the demo's own training file (the TREC
question chat rows ``bittune demo`` fine-tunes on: what ``--imatrix auto`` uses for a demo run), or with
``--imatrix-data chatterbot`` on the conversations after the evaluation rows (never the evaluation rows). Each
evaluation chunk is ``--ctx`` tokens; every token after the first of a chunk is scored. Results go to
``bench/results/gguf_imatrix.json`` and ``.md``.

    make llamacpp && python bench/gguf_imatrix.py --tokens 4096   # ~25 min on 2 busy CPU cores
    python bench/gguf_imatrix.py --save-imatrix /tmp/smollm2.imatrix.gguf   # keep the matrix (llama.cpp's format)
    python bench/gguf_imatrix.py --imatrix-file /tmp/smollm2.imatrix.gguf   # reuse it
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from quant_ppl import text_rows

from bittune.artifacts import load
from bittune.cache import cache_dir
from bittune.demo.assets import prepare_smollm2
from bittune.demo.trec import build_trec
from bittune.export.gguf_writer import write_gguf
from bittune.export.imatrix import compute_for_export, read_imatrix_gguf, write_imatrix_gguf
from bittune.export.kquants import write_llamacpp_quantized

TYPES = ("q4_k_m", "q3_k_m", "q2_k")
MB = 1024**2


def llamacpp_ppl(path: Path, text: str, ctx: int) -> tuple[float, int]:
    """Perplexity of ``text`` in llama.cpp: chunks of ``ctx`` tokens, each token scored given the chunk before it."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=ctx,
        n_batch=ctx,
        logits_all=True,
        type_k=0,
        type_v=0,
        n_threads=os.cpu_count() or 1,
        verbose=False,
    )
    try:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        nll, n = 0.0, 0
        for start in range(0, len(ids) - 1, ctx):
            chunk = ids[start : start + ctx]
            if len(chunk) < 2:
                break
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
            logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
            nll += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
            n += len(chunk) - 1
    finally:
        llm.close()
    return math.exp(nll / n), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8000, help="Evaluation tokens (approximate).")
    ap.add_argument("--imatrix-tokens", type=int, default=16384, help="Tokens the importance matrix is computed on.")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--save-imatrix", type=Path, help="Write the computed matrix here (llama.cpp's imatrix GGUF).")
    ap.add_argument("--imatrix-file", type=Path, help="Use this imatrix GGUF instead of computing one.")
    ap.add_argument(
        "--imatrix-data",
        choices=("demo", "chatterbot"),
        default="demo",
        help="demo: the demo's TREC train file; chatterbot: conversations after the evaluation rows.",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    model_dir = prepare_smollm2(log=lambda m: print(m, file=sys.stderr))
    model, tokenizer, _ = load(model_dir, as_="merged", device="cpu")
    rows, later, total = [], [], 0
    for r in text_rows():
        (later if total >= args.tokens else rows).append(r)
        total += len(tokenizer(r["text"])["input_ids"]) if total < args.tokens else 0
    eval_text = "\n\n".join(r["text"] for r in rows)
    work = Path(tempfile.mkdtemp(prefix="bittune-imatrix-bench-"))
    if args.imatrix_data == "demo":
        calib = build_trec(cache_dir() / "data" / "trec").train
        calib_desc = f"the demo's TREC training questions ({calib.name}, chat rows)"
    else:
        calib = work / "imatrix_text.jsonl"
        calib.write_text("".join(json.dumps(r) + "\n" for r in later), encoding="utf-8")
        calib_desc = f"chatterbot-corpus English, the {len(later)} rows after the evaluation rows"
    t0 = time.perf_counter()
    if args.imatrix_file:
        matrix = read_imatrix_gguf(args.imatrix_file)
    else:
        matrix = compute_for_export(str(model_dir), model, tokenizer, str(calib), tokens=args.imatrix_tokens)
        if args.save_imatrix:
            write_imatrix_gguf(matrix, args.save_imatrix)
    imatrix_s = time.perf_counter() - t0
    imatrix_tokens = max(matrix.counts.values())
    print(f"imatrix: {imatrix_tokens} tokens, {matrix.chunks} chunks, {imatrix_s:.0f}s", file=sys.stderr)

    results = []
    files = {"f16": work / "f16.gguf"}
    write_gguf(model, tokenizer, files["f16"], qtype="f16", name="smollm2-135m-instruct")
    for qtype in TYPES:
        for with_imatrix in (False, True):
            key = f"{qtype}+imatrix" if with_imatrix else qtype
            files[key] = work / f"{key}.gguf"
            write_llamacpp_quantized(
                model, tokenizer, files[key], qtype=qtype, name="x", imatrix=matrix if with_imatrix else None
            )
    for key, path in files.items():
        t0 = time.perf_counter()
        ppl, n = llamacpp_ppl(path, eval_text, args.ctx)
        results.append(
            {"model": key, "size_mb": round(path.stat().st_size / MB, 1), "ppl": round(ppl, 4), "tokens": n,
             "eval_s": round(time.perf_counter() - t0, 1)}
        )  # fmt: skip
        print(results[-1], file=sys.stderr)
        path.unlink()
    f16 = results[0]["ppl"]
    for r in results:
        r["delta_vs_f16_pct"] = round(100 * (r["ppl"] / f16 - 1), 2)
    info = {
        "model": "SmolLM2-135M-Instruct (bundled GGUF, converted once to float32)",
        "eval_text": f"chatterbot-corpus English, first {len(rows)} rows",
        "eval_tokens": results[0]["tokens"],
        "imatrix_text": calib_desc,
        "imatrix_tokens": imatrix_tokens,
        "imatrix_chunks": matrix.chunks,
        "imatrix_seconds": round(imatrix_s, 1),
        "ctx": args.ctx,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "llama_cpp_python": __import__("llama_cpp").__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gguf_imatrix.json").write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    lines = [
        "# K-quants with and without an importance matrix, perplexity in llama.cpp (SmolLM2-135M)",
        "",
        f"{info['eval_tokens']:,} held-out tokens ({info['eval_text']}), chunks of {args.ctx}; imatrix on "
        f"{imatrix_tokens:,} tokens of {calib_desc} ({matrix.chunks} chunks, {imatrix_s:.0f} s in transformers).",
        "",
        "| model | size MB | perplexity | vs f16 |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['size_mb']} | {r['ppl']:.3f} | {r['delta_vs_f16_pct']:+.2f}% |" for r in results]
    (args.out / "gguf_imatrix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
