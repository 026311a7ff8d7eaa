"""The ``bittune`` command line.

Each command parses its arguments, calls one library function, and prints the result. User errors
(:class:`bittune.errors.BittuneError`) become one message on stderr and exit code 2, without a traceback;
``--debug`` shows the traceback too.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from bittune.errors import BittuneError, ConfigError

app = typer.Typer(
    name="bittune",
    help="Fine-tune language models cheaply and shrink them without losing quality.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. --set train.max_steps=50 (repeatable)."),
]


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks, and third-party logs, warnings and progress bars.")
    ] = False,
) -> None:
    _state["debug"] = debug
    from bittune.threads import configure_omp

    configure_omp()  # idle OpenMP threads sleep instead of spinning (before torch loads; the user's setting wins)
    if not debug:
        from bittune.quiet import quiet_by_default

        # transformers' load/save bars, warnings raised inside transformers/peft, bitsandbytes' import notice
        # (a missing optional hub kernel on AVX512-BF16 CPUs) and lm-eval's INFO logs say nothing a user can act
        # on and would bury bittune's own progress.
        quiet_by_default()
    else:
        from bittune.quiet import show_third_party

        show_third_party()  # an earlier in-process call (tests, notebooks) may have quieted them
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest complete checkpoint.")] = False,
    nproc: Annotated[
        int,
        typer.Option("--nproc", min=1, help="Train with N processes (distributed.strategy: ddp, fsdp or deepspeed)."),
    ] = 1,
) -> None:
    """Fine-tune a model as described by CONFIG."""
    from bittune.config import load_config

    cfg = load_config(config, set_ or [])  # errors now, once, before any process starts
    from bittune.training.distributed import launched_world_size, relaunch

    launched = launched_world_size()
    if nproc > 1 and launched is None:
        args = ["train", str(config), *(f"--set={s}" for s in set_ or []), *(["--resume"] if resume else [])]
        raise typer.Exit(relaunch(nproc, (["--debug"] if _state["debug"] else []) + args))
    if nproc > 1 and launched != nproc:
        raise ConfigError(
            f"--nproc {nproc} inside a launcher that started {launched} processes",
            hint="drop --nproc when you start bittune with accelerate launch or torchrun",
        )
    from bittune.recipes.finetune import train as run_train

    try:
        result = run_train(cfg, resume=resume)
    finally:
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run_dir": str(result.run_dir), "final_dir": str(result.final_dir)}))


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    set_: SetOption = None,
) -> None:
    """Check a config and its data (counts rows, tokens, truncation) without training."""
    from bittune.config import load_config
    from bittune.validate import validate_run

    cfg = load_config(config, set_ or [])
    report = validate_run(cfg)
    from rich.table import Table

    table = Table(title=f"{config}: config OK")
    for col in ("split", "rows", "kept", "tokens", "target tokens", "truncated", "dropped"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, st in report["stats"].items():
        table.add_row(split, *(str(st[k]) for k in ("rows", "kept", "tokens", "target_tokens", "truncated", "dropped")))
    con = _console()
    con.print(table)
    if report.get("label_names"):
        con.print(f"labels: {', '.join(report['label_names'])}")
    for warning in report["warnings"]:
        con.print(f"[yellow]warning:[/yellow] {warning}")


LabelsOption = Annotated[
    str | None,
    typer.Option(
        "--labels",
        help="Causal LM label task: 'auto' (answers that look like labels) or a,b,c. Adds accuracy by greedy "
        "generation and by ranking the labels by likelihood.",
    ),
]


def _labels(value: str | None) -> list[str] | str | None:
    if value is None or value == "auto":
        return value
    labels = [x.strip() for x in value.split(",") if x.strip()]
    if len(labels) < 2:  # one label or none ranks nothing: the label metrics would be left out silently
        raise ConfigError(f"--labels {value!r} names {len(labels)} label(s)", hint="list two or more: --labels a,b,c")
    return labels


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="Run directory, model folder, adapter folder or hub id.")],
    data: Annotated[str | None, typer.Option(help="Data file (default: the run's eval data).")] = None,
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter folder to apply on MODEL.")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="Data format (default: the run's).")] = None,
    template: Annotated[str | None, typer.Option(help="Chat template (default: the run's, or auto).")] = None,
    max_length: Annotated[int | None, typer.Option(min=1, help="Token limit per row.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per forward pass.")] = 8,
    labels: LabelsOption = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="lm-evaluation-harness tasks, comma-separated: bittune's offline ones "
            "(trec_mc, vader_sentiment, chatterbot_trivia) or any lm-eval task name (needs a network)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="lm-eval: examples per task at most.")] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(min=0, help="lm-eval: few-shot examples (default: the task's).")
    ] = None,
    chat_template: Annotated[
        bool | None,
        typer.Option(
            "--chat-template/--no-chat-template",
            help="lm-eval: render prompts with the model's chat template (default: when it has one).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="lm-eval: write lm_eval.json here (default for a run directory: RUN_DIR/eval/)."),
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Evaluate a model: loss and perplexity (token-level) or accuracy, F1 and confusion matrix (classifier) on
    data; label tasks by generation and label ranking; lm-evaluation-harness tasks with --tasks."""
    if tasks is None:
        from bittune.evaluation.core import evaluate_path

        result = evaluate_path(
            model,
            adapter=adapter,
            data=data,
            device=device,
            batch_size=batch_size,
            labels=_labels(labels),
            log=_log,
            fmt=fmt,
            template=template,
            max_length=max_length,
        )
        print(json.dumps(result, indent=2))
        return
    from bittune.evaluation.harness import run_tasks

    result = run_tasks(
        model,
        [t.strip() for t in tasks.split(",") if t.strip()],
        adapter=adapter,
        limit=limit,
        num_fewshot=num_fewshot,
        chat_template=chat_template,
        batch_size=batch_size,
        device=device,
        out=out,
        log=_log,
    )
    print(json.dumps(result["summary"], indent=2))


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Run directory, model folder or hub id.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The user message (or raw text with --raw).")],
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter folder to apply on MODEL.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    template: Annotated[str, typer.Option(help="auto (the tokenizer's), chatml, llama2 or alpaca.")] = "auto",
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Feed the prompt as plain text, without a template.")] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Generate a reply from a base model, a tuned run, or base + adapter."""
    from bittune.inference import generate_text

    print(
        generate_text(
            model,
            prompt,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            template=template,
            system_prompt=system,
            raw=raw,
            seed=seed,
        )
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes its run and report.")] = Path("runs/demo"),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="A one-minute smoke test: tiny sizes, the main path only (no GPTQ, GGUF measurement or classifier).",
        ),
    ] = False,
    fp32: Annotated[
        bool, typer.Option("--fp32", help="Compute in float32 even where bf16 is faster (the path to time it by).")
    ] = False,
) -> None:
    """The whole story on the embedded default: SmolLM2-135M-Instruct learns TREC question types with QLoRA; then
    merge, quantize (4-bit NF4, 3-bit GPTQ), GGUF export, every model measured in one report. A full run records
    itself in bench/results/demo.json of the source checkout."""
    from bittune.demo.run import default_results_file, run_demo

    run_demo(out, quick=quick, fp32=fp32, results_file=None if quick else default_results_file())


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    set_: SetOption = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: the config's train.device).")] = None,
    matmul_tflops: Annotated[
        float | None, typer.Option(min=1e-6, help="Matmul rate to plan with (default: measured on this device).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    read_data: Annotated[
        bool | None,
        typer.Option(
            "--data/--no-data",
            help="Count the run's own rows (default: when data.train is a file here); --no-data sizes every row "
            "at data.max_length.",
        ),
    ] = None,
) -> None:
    """Estimate peak memory and time per step of CONFIG before training, and whether it fits."""
    from bittune.config import load_config
    from bittune.plan import estimate
    from bittune.preflight import preflight

    cfg = load_config(config, set_ or [])
    if read_data is None:
        read_data = Path(cfg.data.train).expanduser().is_file()
    # The model path and LoRA targets, and the data when it is read; no device (a plan may be for another one).
    checked = preflight(cfg, cheap=True, read_data=read_data)
    checked.raise_problems()
    report = estimate(
        cfg, device=device, matmul_flops=matmul_tflops * 1e12 if matmul_tflops else None, data=checked.data
    )
    print(json.dumps(report.as_dict(), indent=2) if as_json else report.table())


@app.command("export")
def export_(
    model: Annotated[str, typer.Argument(help="Run directory (a LoRA adapter is merged) or model folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .gguf file (gguf) or folder (hf) to write.")],
    fmt: Annotated[
        str, typer.Option("--format", help="gguf (llama.cpp), gguf-lora (a run's adapter) or hf (Hugging Face).")
    ] = "gguf",
    qtype: Annotated[
        str,
        typer.Option(
            "--type",
            help="GGUF type: f32, f16, q8_0, q4_0, or via llama.cpp q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, iq4_xs...",
        ),
    ] = "f16",
    verify: Annotated[
        bool, typer.Option("--verify", help="Load the GGUF in llama.cpp and compare it with transformers.")
    ] = False,
    imatrix: Annotated[
        str | None,
        typer.Option(help="Importance matrix for llama.cpp types: auto (the run's train file) or a data file."),
    ] = None,
    imatrix_tokens: Annotated[
        int | None, typer.Option(min=1, help="Tokens the importance matrix is computed on.")
    ] = None,
) -> None:
    """Export MODEL as GGUF for llama.cpp, a run's adapter as a GGUF LoRA, or a merged Hugging Face folder."""
    from bittune.export.commands import export_model

    con = _console()
    result = export_model(
        model, fmt=fmt, out=out, qtype=qtype, verify=verify, imatrix=imatrix, imatrix_tokens=imatrix_tokens,
        log=con.print,
    )  # fmt: skip
    print(json.dumps(result, indent=2))


@app.command()
def push(
    model: Annotated[str, typer.Argument(help="Run directory (a LoRA adapter is merged) or model folder.")],
    repo: Annotated[str, typer.Option("--repo", help="Hub repository id, owner/name.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    dry_run: Annotated[
        Path | None, typer.Option("--dry-run", help="Stage the folder that would be uploaded here; no network.")
    ] = None,
) -> None:
    """Upload MODEL to the Hugging Face Hub as a merged folder with a model card (token: HF_TOKEN or hf login)."""
    from bittune.export.push import push_to_hub

    con = _console()
    print(json.dumps(push_to_hub(model, repo, private=private, dry_run=dry_run, log=con.print), indent=2))


DataOption = Annotated[str | None, typer.Option("--eval", help="Data to measure quality on (default: the run's eval).")]
FormatOption = Annotated[str | None, typer.Option("--format", help="Data format (default: the run's, else chat).")]
TemplateOption = Annotated[str | None, typer.Option(help="Chat template (default: the run's, or auto).")]
MaxLengthOption = Annotated[int | None, typer.Option(min=1, help="Token limit per row.")]
MaxRowsOption = Annotated[int | None, typer.Option(min=1, help="Measure on the first N rows only.")]
GroupSizeOption = Annotated[int | None, typer.Option(help="int/hqq/gptq: columns per group (default 64; -1 per row).")]
SymmetricOption = Annotated[bool, typer.Option("--symmetric", help="int/gptq: symmetric codes (fixed zero point).")]
BatchSizeOption = Annotated[int, typer.Option(min=1, help="Rows per forward pass when measuring.")]
CalibOption = Annotated[
    str | None,
    typer.Option("--calib", help="gptq: calibration text, any data format (default: a run's train file)."),
]
CalibTokensOption = Annotated[
    int | None,
    typer.Option("--calib-tokens", min=1, help="gptq: tokens of --calib to calibrate on (default 8192)."),
]


def _data_opts(fmt: str | None, template: str | None, max_length: int | None, max_rows: int | None) -> dict:
    return {"fmt": fmt, "template": template, "max_length": max_length, "max_rows": max_rows}


def _log(message: str) -> None:
    print(message, file=sys.stderr)


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Model folder, hub id or run directory (adapters are merged first).")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the quantized model and its report.")],
    bits: Annotated[
        int | None, typer.Option(help="16, 8, 4, 3 or 2 (default 4; a QAT run: its final stage's settings).")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="fp16, bf16, nf4, fp4, llm-int8, int, hqq or gptq (default: by --bits).")
    ] = None,
    group_size: GroupSizeOption = None,
    symmetric: SymmetricOption = False,
    calib: CalibOption = None,
    calib_tokens: CalibTokensOption = None,
    data: DataOption = None,
    fmt: FormatOption = None,
    template: TemplateOption = None,
    max_length: MaxLengthOption = None,
    max_rows: MaxRowsOption = None,
    batch_size: BatchSizeOption = 8,
    device: DeviceOption = "auto",
) -> None:
    """Quantize a model and report size, memory, speed and the quality change against the original."""
    from bittune.artifacts import resolve
    from bittune.quant.flows import describe, quantize_path
    from bittune.quant.spec import spec_for_source

    source = resolve(model)  # once: the artifact flows down from here
    spec = spec_for_source(
        source, bits=bits, method=method, group_size=group_size, symmetric=symmetric, calibration_tokens=calib_tokens
    )
    report = quantize_path(
        source,
        spec,
        out,
        data=data,
        calib=calib,
        data_opts=_data_opts(fmt, template, max_length, max_rows),
        batch_size=batch_size,
        device=device,
        log=_log,
    )
    _log(describe(report))
    print(json.dumps({"out": str(out), "report": str(out / "quant_report.json")}))


@app.command()
def merge(
    run: Annotated[str, typer.Argument(help="LoRA/QLoRA run directory (or adapter folder).")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the merged model and its report.")],
    into_quantized: Annotated[
        int | None, typer.Option(help="Re-quantize the merged model to these bits (and measure the change).")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="With --into-quantized: method (default: the run's own, else by bits).")
    ] = None,
    group_size: GroupSizeOption = None,
    symmetric: SymmetricOption = False,
    calib: CalibOption = None,
    calib_tokens: CalibTokensOption = None,
    data: DataOption = None,
    fmt: FormatOption = None,
    template: TemplateOption = None,
    max_length: MaxLengthOption = None,
    max_rows: MaxRowsOption = None,
    batch_size: BatchSizeOption = 8,
    device: DeviceOption = "auto",
) -> None:
    """Merge a run's adapter into its base (full precision, or re-quantized) and measure the change."""
    from bittune.quant.flows import describe, merge_run

    report = merge_run(
        run,
        out,
        into_bits=into_quantized,
        method=method,
        group_size=group_size,
        symmetric=symmetric,
        calib_tokens=calib_tokens,
        data=data,
        calib=calib,
        data_opts=_data_opts(fmt, template, max_length, max_rows),
        batch_size=batch_size,
        device=device,
        log=_log,
    )
    _log(describe(report))
    for warning in report["warnings"]:
        _log(f"warning: {warning}")
    print(json.dumps({"out": str(out), "report": str(out / "merge_report.json")}))


@app.command()
def compare(
    models: Annotated[list[str], typer.Argument(help="Models, run dirs, adapters or quantized folders.")],
    data: Annotated[str, typer.Option("--data", help="The data file every model is measured on.")],
    out: Annotated[Path, typer.Option("--out", help="New folder for compare.json/.md/.png.")] = Path("compare"),
    fmt: FormatOption = None,
    template: TemplateOption = None,
    max_length: MaxLengthOption = None,
    max_rows: MaxRowsOption = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per forward pass.")] = 8,
    device: DeviceOption = "auto",
    labels: LabelsOption = None,
) -> None:
    """Measure several models on the same data: one table (size, load time, tokens/s, quality) and a bar chart."""
    from bittune.compare import compare_models
    from bittune.quant.report import table

    result = compare_models(
        models,
        data=data,
        out=out,
        data_opts=_data_opts(fmt, template, max_length, max_rows),
        batch_size=batch_size,
        device=device,
        labels=_labels(labels),
        log=_log,
    )
    _log(table(result["models"], result["task"]))
    print(json.dumps({"out": str(out), "plot": str(out / "compare.png")}))


@app.command()
def ladder(
    config: Annotated[Path, typer.Argument(help="Run config (YAML); each rung trains into OUTPUT_DIR/<rung>.")],
    target: Annotated[str, typer.Option(help="METRIC OP VALUE, e.g. 'accuracy>=0.85' or 'loss<=1.2'.")],
    set_: SetOption = None,
    rungs: Annotated[str, typer.Option(help="Rungs in order, comma-separated.")] = "qlora,lora,full",
) -> None:
    """QLoRA, then LoRA, then full fine-tuning on the same data; stop at the first that meets --target."""
    from bittune.ladder import run_ladder

    result = run_ladder(
        config, target, overrides=set_ or [], rungs=tuple(r.strip() for r in rungs.split(",") if r.strip()), log=_log
    )
    print(json.dumps({"met": result["met"], "rungs": [r["rung"] for r in result["rungs"]]}))


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A bittune run directory.")],
    compare: Annotated[
        list[str] | None,
        typer.Option("--compare", help="Another model to put beside base and tuned (quantized/merged folder, run)."),
    ] = None,
    data: Annotated[str | None, typer.Option(help="Data to measure on (default: the run's eval file).")] = None,
    gguf: Annotated[
        Path | None, typer.Option(help="A GGUF export: its llama.cpp replies join the side-by-side samples.")
    ] = None,
    base: Annotated[bool, typer.Option("--base/--no-base", help="Measure the base model too.")] = True,
    device: DeviceOption = "auto",
) -> None:
    """Write RUN/report/{report.md, report.html, *.png}: metrics beside the base model's, curves, memory and speed,
    quantization, benchmarks, confusion matrix, side-by-side generations."""
    from bittune.report.build import write_report
    from bittune.report.collect import ReportOptions

    options = ReportOptions(compare=compare, data=data, gguf=gguf, base=base, device=device)
    out = write_report(run, options, log=_log)
    print(json.dumps({"report": str(out / "report.md"), "html": str(out / "report.html")}))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``bittune`` command; turns user errors into one clean message."""
    try:
        app(args=argv, standalone_mode=False)
    except BittuneError as exc:
        # Under a launcher every process meets the same error (same config, same data): rank 0 speaks for all.
        if int(os.environ.get("RANK", "0")) == 0:
            if _state["debug"]:
                traceback.print_exc()
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is intact; resume with --resume", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        if _usage_error(exc):  # a missing argument, an unknown option or command, a value of the wrong type
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _usage_error(exc: Exception) -> bool:
    """A command-line usage error: click's ``ClickException``, or the one of the copy of click that typer ships
    (typer >= 0.22 raises its own, which is not click's class)."""
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)
