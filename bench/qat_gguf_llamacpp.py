"""QAT on llama.cpp's own Q4_0 grid vs a plain Q4_0 export, measured in llama.cpp on the demo task (SmolLM2-135M).

Two full fine-tunes of SmolLM2-135M-Instruct on the demo's TREC training questions, with the same steps, batch,
learning rate and seed:

* ``full``: float training; exported as f16 (the float model) and as q4_0 (plain post-training Q4_0);
* ``qat``: ``method: qat`` with ``qat: {method: gguf-q4_0, schedule: [8, 4]}``; exported as q4_0, which stores
  exactly the weights its last stage trained and evaluated.

Accuracy is measured in llama.cpp (llama-cpp-python, CPU) on the first ``--n-eval`` of the demo's held-out
questions: each prompt rendered with the model's chat template as training rendered it, greedy decoding of up to
4 tokens, first word compared with the gold label (the demo's normalisation).

    make llamacpp && python bench/qat_gguf_llamacpp.py --steps 60 --n-eval 200   # ~20 min on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bittune.cache import cache_dir
from bittune.demo.assets import prepare_smollm2
from bittune.demo.trec import build_trec, chat_messages, read_jsonl


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_run(model_dir: Path, train_file: Path, out: Path, *, qat: bool, steps: int, lr: float) -> Path:
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    raw: dict[str, Any] = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "method": "qat" if qat else "full",
        "data": {"train": str(train_file), "format": "chat", "max_length": 128},
        "train": {"max_steps": steps, "batch_size": 8, "lr": lr, "scheduler": "cosine", "warmup_steps": 5,
                  "seed": 0, "log_every": 10},
        "output_dir": str(out),
    }  # fmt: skip
    if qat:
        raw["qat"] = {"method": "gguf-q4_0", "schedule": [8, 4], "stage_steps": [steps // 3, steps - steps // 3]}
    t0 = time.perf_counter()
    run = train(config_from_dict(raw), progress=False).run_dir
    log(f"trained {out.name} in {time.perf_counter() - t0:.0f}s")
    return Path(run)


def export(run: Path, out: Path, qtype: str) -> Path:
    from bittune.export.commands import export_model

    export_model(str(run), fmt="gguf", qtype=qtype, out=out)
    return out


def llamacpp_accuracy(path: Path, tokenizer: Any, held: list[dict[str, str]]) -> dict[str, Any]:
    """Accuracy of the GGUF at ``path`` on ``held`` by greedy generation in llama.cpp."""
    import llama_cpp

    from bittune.demo.evaluate import normalize_answer

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=os.cpu_count() or 1, verbose=False)
    t0, correct, answers = time.perf_counter(), 0, []
    try:
        for row in held:
            prompt = tokenizer.apply_chat_template(
                chat_messages(row["question"]), add_generation_prompt=True, tokenize=False
            )
            ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            out = llm.create_completion(ids, max_tokens=4, temperature=0.0, top_k=1)
            answer = normalize_answer(out["choices"][0]["text"])
            answers.append(answer)
            correct += answer == row["label"]
    finally:
        llm.close()
    return {"accuracy": round(correct / len(held), 4), "correct": correct, "n": len(held),
            "eval_s": round(time.perf_counter() - t0, 1), "answers": answers}  # fmt: skip


def paired_tests(correct: dict[str, list[bool]]) -> list[dict[str, Any]]:
    """QAT vs plain Q4_0, QAT vs float, plain Q4_0 vs float: the exact paired test on the same questions."""
    from bittune.evaluation.metrics import paired_exact_test

    float_, plain, qat = list(correct)
    pairs = [(qat, plain), (qat, float_), (plain, float_)]
    return [{"a": a, "b": b, **paired_exact_test(correct[a], correct[b])} for a, b in pairs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--work", type=Path, help="Keep runs and files here (default: a temporary folder).")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    t_all = time.perf_counter()
    model_dir = prepare_smollm2(log=log)
    files = build_trec(cache_dir() / "data" / "trec")
    held = read_jsonl(files.heldout)[: args.n_eval]
    work = args.work or Path(tempfile.mkdtemp(prefix="bittune-qat-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    runs, reused = {}, []
    for name, qat in (("full", False), ("qat", True)):
        runs[name] = work / name
        if (runs[name] / "model" / "config.json").is_file():
            reused.append(name)  # trained by an earlier invocation with the same --work: total_s excludes it
        else:
            train_run(model_dir, files.train, runs[name], qat=qat, steps=args.steps, lr=args.lr)
    ggufs = {
        "float (full fine-tune, f16)": export(runs["full"], work / "full-f16.gguf", "f16"),
        "plain Q4_0 export of the float model": export(runs["full"], work / "full-q4_0.gguf", "q4_0"),
        "QAT gguf-q4_0 [8, 4], Q4_0 export": export(runs["qat"], work / "qat-q4_0.gguf", "q4_0"),
    }
    results, correct = [], {}
    for label, path in ggufs.items():
        r = llamacpp_accuracy(path, tokenizer, held)
        answers = r.pop("answers")
        correct[label] = [a == row["label"] for a, row in zip(answers, held)]
        results.append({"model": label, "file_mb": round(path.stat().st_size / 1024**2, 1), **r})
        log(str(results[-1]))
        (work / f"{path.stem}.answers.json").write_text(json.dumps(answers))
    paired = paired_tests(correct)
    info = {
        "model": "SmolLM2-135M-Instruct (bundled GGUF, converted once to float32)",
        "training": f"full fine-tune, {args.steps} steps of 8 TREC chat rows, lr {args.lr} cosine, seed 0; QAT: "
        f"gguf-q4_0, schedule [8, 4], stages {args.steps // 3} + {args.steps - args.steps // 3} steps",
        "eval": f"first {len(held)} of the demo's {files.n_heldout} held-out TREC questions, greedy, in llama.cpp",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpu threads",
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "total_s": round(time.perf_counter() - t_all, 1),
        "runs_reused_from_work": reused,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"info": info, "results": results, "paired": paired}
    (args.out / "qat_gguf_llamacpp.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# QAT on llama.cpp's Q4_0 grid vs a plain Q4_0 export, accuracy in llama.cpp (SmolLM2-135M, demo task)",
        "",
        f"{info['training']}. Eval: {info['eval']}.",
        "",
        "| model | file MB | accuracy | correct |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['model']} | {r['file_mb']} | {100 * r['accuracy']:.1f}% | {r['correct']}/{r['n']} |")
    lines += ["", "Paired on the same questions (exact McNemar test: questions only one of the two gets right):", ""]
    lines += ["| a vs b | only a right | only b right | p |", "|---|---:|---:|---:|"]
    lines += [f"| {p['a']} vs {p['b']} | {p['a_only']} | {p['b_only']} | {p['p_value']:.2g} |" for p in paired]
    (args.out / "qat_gguf_llamacpp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
