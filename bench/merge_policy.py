"""Which merge of a QLoRA adapter reproduces the model that was trained and evaluated?

A QLoRA adapter is trained on the NF4 base: every forward in training and in the run's own evaluation computes
``dequant(NF4(W)) x + B A x``. After training the adapter can be folded into one float model in two ways:

* **into the dequantized NF4 base**: ``dequant(NF4(W)) + B A`` (the base the adapter saw), or
* **into the original float base**: ``W + B A`` (the weights before quantization).

This script trains the embedded demo (SmolLM2-135M-Instruct on TREC question types, ``configs/demo.yaml``) with
``method: qlora`` for a short run, builds both merged models, and measures each against the adapter on its NF4
base (the reference, loaded exactly as trained): the max and mean absolute logit difference over every
position of held-out conversations, the share of positions whose top-1 token differs, and the loss on the
answer tokens of the same held-out rows (bittune's eval loss).

    OMP_NUM_THREADS=2 python bench/merge_policy.py            # ~6 min on 2 CPU cores (40 QLoRA steps)
    python bench/merge_policy.py --reuse                      # measure an existing run again

Writes ``bench/results/merge_policy.json``; the table goes into BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def data_files(work: Path, n_eval: int) -> tuple[Path, Path]:
    """The demo's TREC split: its train file, and the first ``n_eval`` held-out questions as chat rows."""
    from bittune.demo.trec import build_trec, chat_messages, read_jsonl, write_jsonl

    files = build_trec(work / "trec")  # the demo's own split and sizes (same seed: the same files)
    held = read_jsonl(files.heldout)[:n_eval]
    chat = work / "heldout_chat.jsonl"
    write_jsonl(chat, ({"messages": chat_messages(r["question"], r["label"])} for r in held))
    return files.train, chat


def train_qlora(work: Path, train_file: Path, eval_file: Path, steps: int, reuse: bool) -> Path:
    """The demo config with ``method: qlora`` (NF4, double quant), ``steps`` optimizer steps."""
    from bittune.config import load_config
    from bittune.demo.assets import cache_dir, prepare_smollm2
    from bittune.recipes.finetune import train

    run_dir = work / "qlora-run"
    if reuse and (run_dir / "adapter" / "adapter_config.json").is_file():
        return run_dir
    model_dir = prepare_smollm2(cache_dir(), log=log)
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"model.path={model_dir}",
            f"data.train={train_file}",
            f"data.eval={eval_file}",
            f"output_dir={run_dir}",
            "method=qlora",
            f"train.max_steps={steps}",
            f"train.warmup_steps={max(steps // 10, 1)}",
            "train.log_every=10",
        ],
    )
    t0 = time.perf_counter()
    train(cfg, progress=False)
    log(f"trained {steps} QLoRA steps in {time.perf_counter() - t0:.0f}s")
    return run_dir


def merged_into_float_base(run_dir: Path) -> Any:
    """``W + B A``: the adapter merged into the original float32 base (the weights before NF4)."""
    from peft import PeftModel

    from bittune.artifacts import load, resolve

    run = resolve(str(run_dir))
    base = load(resolve(run.base), as_="trained", device="cpu").model.float()
    return PeftModel.from_pretrained(base, run.adapter).merge_and_unload().eval()


def merged_into_dequantized_nf4(run_dir: Path) -> Any:
    """``dequant(NF4(W)) + B A``: the base loaded as in training, its 4-bit layers dequantized, then merged."""
    from peft import PeftModel

    from bittune.artifacts import load_base, resolve
    from bittune.quant.merge import dequantize_bnb_linears

    run = resolve(str(run_dir))
    base = load_base(run, device="cpu")  # the bitsandbytes base with the run's recorded spec
    assert dequantize_bnb_linears(base) > 0
    return PeftModel.from_pretrained(base, run.adapter).merge_and_unload().eval()


class Delta:
    """Running max/mean |logit difference| and top-1 disagreement against the reference, over real positions."""

    def __init__(self) -> None:
        self.max = self.sum = 0.0
        self.n = self.values = self.disagree = 0

    def add(self, ref: Any, other: Any) -> None:
        import torch

        diff = (other - ref).abs()
        self.max = max(self.max, float(diff.max()))
        self.sum += float(diff.sum(dtype=torch.float64))
        self.values += diff.numel()
        self.disagree += int((other.argmax(-1) != ref.argmax(-1)).sum())
        self.n += ref.shape[0]

    def as_dict(self) -> dict[str, float]:
        return {
            "max_abs_logit_delta": round(self.max, 5),
            "mean_abs_logit_delta": round(self.sum / self.values, 6),
            "top1_disagreement": round(self.disagree / self.n, 5),
            "positions": self.n,
        }


def logit_deltas(reference: Any, others: list[Any], batches: list[dict[str, Any]]) -> list[Delta]:
    """All models in lockstep, one batch at a time (the logits of 200 rows over a 49k vocabulary would not fit)."""
    import torch

    deltas = [Delta() for _ in others]
    with torch.inference_mode():
        for b in batches:
            real = b["attention_mask"].bool()
            ref = reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()[real]
            for model, delta in zip(others, deltas, strict=True):
                delta.add(ref, model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()[real])
    return deltas


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-merge-policy"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--steps", type=int, default=40, help="QLoRA optimizer steps (the demo's LoRA uses 150)")
    ap.add_argument("--n-eval", type=int, default=200, help="held-out conversations measured")
    ap.add_argument("--reuse", action="store_true", help="measure the run already in --work")
    ap.add_argument("--train-only", action="store_true", help="train (or reuse) the run and stop")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t_total = time.perf_counter()
    train_file, eval_file = data_files(args.work, args.n_eval)
    run_dir = train_qlora(args.work, train_file, eval_file, args.steps, args.reuse)
    if args.train_only:
        return
    from bittune.artifacts import load, resolve
    from bittune.inference import eval_batches, prepare_eval_rows
    from bittune.training.evaluate import evaluate

    reference = load(resolve(str(run_dir)), as_="trained", device="cpu")  # adapter on its NF4 base, as trained
    tokenizer = reference.tokenizer
    rows = prepare_eval_rows(str(run_dir), tokenizer, "causal-lm", data=str(eval_file))
    batches = list(eval_batches(rows, "causal-lm", tokenizer, 16))
    candidates = {
        "merged into the dequantized NF4 base": merged_into_dequantized_nf4(run_dir),
        "merged into the original float base": merged_into_float_base(run_dir),
    }
    cpu = torch.device("cpu")
    results: list[dict[str, Any]] = [
        {
            "name": "adapter on NF4 base (as trained; reference)",
            **evaluate(reference.model, iter(batches), task="causal-lm", device=cpu),
        }
    ]
    deltas = logit_deltas(reference.model, list(candidates.values()), batches)
    for (name, model), delta in zip(candidates.items(), deltas, strict=True):
        entry = {"name": name, **evaluate(model, iter(batches), task="causal-lm", device=cpu), **delta.as_dict()}
        entry["eval_loss_delta"] = round(entry["eval_loss"] - results[0]["eval_loss"], 6)
        results.append(entry)
        log(json.dumps(entry))
    del reference, candidates
    gc.collect()

    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": "SmolLM2-135M-Instruct (bundled GGUF, converted to float32)",
        "run": {"config": "configs/demo.yaml", "method": "qlora (nf4, double quant)", "steps": args.steps},
        "eval": {"rows": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows)},
        # What the run itself evaluated at its end (the reference must reproduce it: same model, same rows).
        "run_final_eval_loss": json.loads((run_dir / "summary.json").read_text()).get("eval_loss"),
        "results": results,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t_total, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_policy.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
