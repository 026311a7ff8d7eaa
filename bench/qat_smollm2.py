"""QAT and QAT + distillation on the embedded default: SmolLM2-135M-Instruct after the demo's TREC fine-tune.

Full precision = the demo run (LoRA on SmolLM2, 150 steps) merged into float32 weights; it is also the teacher.
Every other row starts from it:

1. plain post-training quantization to 4 and 3 bits: integer, group-wise, round-to-nearest (the quantizer QAT
   trains against), and GPTQ (calibrated on 8k tokens of the training questions) for reference;
2. QAT (full fine-tuning with fake-quantized weights) down a bit-width schedule, then convert to real codes;
3. the same QAT with distillation from the full-precision model (T = 2, alpha = 0.5);
4. a control: the same number of extra steps without fake quantization, then plain PTQ.

Measured on held-out TREC questions: answer accuracy (greedy generation, as the demo measures it) and the loss on
the answer tokens. recovered = (x - x_PTQ) / (x_fp - x_PTQ) against round-to-nearest PTQ at the same bits.

    python bench/qat_smollm2.py --demo-run runs/demo/run     # ~30-40 min on 2 CPU cores
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
GROUP_SIZE = 64


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def merged_fp_model(demo_run: Path, out: Path) -> Path:
    """The demo's LoRA merged into its float32 base, saved as a plain model folder."""
    if (out / "config.json").is_file():
        return out
    from bittune.artifacts import load

    model, tokenizer, _ = load(str(demo_run), as_="merged", device="cpu")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def eval_files(work: Path, n_eval: int) -> tuple[Path, list[dict[str, Any]]]:
    """The first ``n_eval`` held-out questions, as chat rows (for the loss) and as question/label (for accuracy)."""
    from bittune.demo.assets import cache_dir
    from bittune.demo.trec import chat_messages, read_jsonl, write_jsonl

    held = read_jsonl(cache_dir() / "data" / "trec" / "heldout.jsonl")[:n_eval]
    chat = work / "heldout_chat.jsonl"
    write_jsonl(chat, ({"messages": chat_messages(r["question"], r["label"])} for r in held))
    return chat, held


def score(model: Any, tokenizer: Any, chat: Path, held: list[dict[str, Any]], source: str) -> dict[str, float]:
    from bittune.demo.evaluate import evaluate_questions
    from bittune.inference import prepare_eval_rows
    from bittune.quant.report import measure

    rows = prepare_eval_rows(source, tokenizer, "causal-lm", data=str(chat), fmt="chat", max_length=128)
    m = measure(model, tokenizer, "causal-lm", rows, batch_size=32)
    acc = evaluate_questions(model, tokenizer, held).accuracy
    return {"acc": acc, "loss": m["eval_loss"]}


def measure_model(
    path: Path, chat: Path, held: list[dict[str, Any]], *, ptq: tuple[str, int] | None = None, convert: bool = False,
    calib: Path | None = None,
) -> dict[str, float]:  # fmt: skip
    """Load a model folder or run, optionally PTQ (``("int"|"gptq", bits)``) or QAT-convert it, and score it."""
    from bittune.artifacts import load, resolve
    from bittune.quant import quantize
    from bittune.quant.api import calibration_batches
    from bittune.quant.qat import convert as qat_convert
    from bittune.quant.spec import GptqSpec, IntSpec

    model, tokenizer, _ = load(str(path), device="cpu")
    if convert:
        q = resolve(path).qat
        model = qat_convert(model, bits=q.bits, group_size=q.group_size, symmetric=q.symmetric)
    if ptq is not None:
        method, bits = ptq
        if method == "int":
            quantize(model, IntSpec(bits=bits, group_size=GROUP_SIZE))
        else:
            from bittune.inference import prepare_eval_rows

            rows = prepare_eval_rows(str(path), tokenizer, "causal-lm", data=str(calib), fmt="chat", max_length=128)
            spec = GptqSpec(bits=bits, group_size=GROUP_SIZE)
            quantize(model, spec, calibration=calibration_batches(rows, spec.calibration_tokens))
    result = score(model, tokenizer, chat, held, str(path))
    del model
    gc.collect()
    return result


def main() -> None:
    import torch
    from qat_distill import recovered_fraction as recovered
    from qat_distill import run as train_run  # train, or with --reuse take the finished run

    from bittune.demo.assets import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-run", type=Path, default=Path("runs/demo/run"), help="A finished `bittune demo` run.")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-qat-smollm2"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--warm-steps", type=int, default=5, help="QAT steps of each stage before the last")
    ap.add_argument("--final-steps", type=int, default=20, help="QAT steps at the target bit-width")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--reuse", action="store_true", help="keep finished runs in --work, only re-measure")
    args = ap.parse_args()
    if not (args.demo_run / "run_config.yaml").is_file():
        sys.exit(f"{args.demo_run} is not a finished demo run: run `make demo` first (or pass --demo-run)")
    args.work.mkdir(parents=True, exist_ok=True)
    t_total = time.perf_counter()
    fp_dir = merged_fp_model(args.demo_run, args.work / "fp-model")
    chat, held = eval_files(args.work, args.n_eval)
    train_file = cache_dir() / "data" / "trec" / "train.jsonl"

    fp = measure_model(fp_dir, chat, held)
    rows: list[dict[str, Any]] = [{"name": "full precision (demo run, merged)", "bits": 32, **fp}]
    log(f"fp: {rows[-1]}")
    ptq: dict[int, dict[str, float]] = {}
    for bits in (4, 3):
        ptq[bits] = measure_model(fp_dir, chat, held, ptq=("int", bits))
        rows.append({"name": f"PTQ {bits}-bit round-to-nearest", "bits": bits, **ptq[bits]})
        log(f"{rows[-1]}")
        got = measure_model(fp_dir, chat, held, ptq=("gptq", bits), calib=train_file)
        rec = {f"recovered_{k}": recovered(got[k], ptq[bits][k], fp[k]) for k in ("acc", "loss")}
        rows.append({"name": f"PTQ {bits}-bit GPTQ (8k calibration tokens)", "bits": bits, **got, **rec})
        log(f"{rows[-1]}")

    base = {
        "model": {"path": str(fp_dir), "task": "causal-lm", "dtype": "float32"},
        "method": "full",
        "data": {"train": str(train_file), "format": "chat", "max_length": 128, "packing": False},
        "train": {"batch_size": 8, "lr": args.lr, "scheduler": "linear", "warmup_steps": 0, "seed": 1},
    }
    for bits, schedule in {4: [8, 6, 4], 3: [8, 6, 4, 3]}.items():
        stage_steps = [args.warm_steps] * (len(schedule) - 1) + [args.final_steps]
        steps = sum(stage_steps)
        qat = {"schedule": schedule, "stage_steps": stage_steps, "group_size": GROUP_SIZE}
        variants: dict[str, dict[str, Any]] = {
            f"QAT {schedule}": {"method": "qat", "qat": qat},
            f"QAT {schedule} + distillation (T=2, alpha=0.5)": {
                "method": "qat",
                "qat": qat,
                "distill": {"teacher": str(fp_dir), "temperature": 2.0, "alpha": 0.5},
            },
            f"control: {steps} more fp steps, then PTQ {bits}-bit": {"train": {"max_steps": steps}},
        }
        for i, (name, extra) in enumerate(variants.items()):
            raw = json.loads(json.dumps(base))
            raw.update({k: v for k, v in extra.items() if k != "train"})
            raw["train"].update(extra.get("train", {}))
            raw["output_dir"] = str(args.work / f"b{bits}-{i}")
            run_dir, secs = train_run(raw, args.reuse)
            if "qat" in extra:
                got = measure_model(run_dir, chat, held, convert=True)
            else:
                got = measure_model(run_dir, chat, held, ptq=("int", bits))
            rec = {f"recovered_{k}": recovered(got[k], ptq[bits][k], fp[k]) for k in ("acc", "loss")}
            rows.append({"name": name, "bits": bits, **got, **rec, "train_s": round(secs)})
            log(f"{rows[-1]}")
    write(args, rows, time.perf_counter() - t_total, torch)


def write(args: argparse.Namespace, rows: list[dict[str, Any]], total_s: float, torch: Any) -> None:
    from qat_distill import result_table  # the same table as the MiniLM benchmark (bench/ is on sys.path)

    lines = [
        "# QAT and distillation vs post-training quantization (SmolLM2-135M on the demo task, CPU)",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Full precision: the demo run ({args.demo_run}) merged into float32. Quantized: every body linear, "
        f"integer codes, group size {GROUP_SIZE}, asymmetric (tied embedding/head in float). QAT: full fine-tuning "
        f"from the full-precision model, {args.warm_steps} steps per stage, {args.final_steps} at the target bits, "
        f"batch 8, lr {args.lr} linear decay. Held-out: the first {args.n_eval} of the demo's held-out TREC "
        f"questions. This invocation {total_s / 60:.1f} min.",
        "",
    ]
    lines += result_table(rows, "answer loss")
    lines += [
        "",
        "recovered = (x - x_PTQ) / (x_fp - x_PTQ) against round-to-nearest PTQ at the same bits (x = accuracy, or "
        "the loss on the answer tokens).",
        "",
        f"Command: `{shlex.join(['python', 'bench/qat_smollm2.py', *sys.argv[1:]])}`",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qat_smollm2.md").write_text("\n".join(lines) + "\n")
    (args.out / "qat_smollm2.json").write_text(json.dumps({"rows": rows, "total_s": total_s}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
