"""Turn collected report data into sections, then into ``report.md`` and one self-contained ``report.html``.

Sections are built once as neutral parts (paragraphs, tables, images, preformatted text) and rendered twice, so
the Markdown and the HTML always say the same thing. The HTML inlines its images as ``data:`` URIs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Part = tuple[Any, ...]  # ("p", text) | ("table", headers, rows) | ("img", file, alt) | ("pre", text)


@dataclass
class Section:
    id: str
    title: str
    parts: list[Part] = field(default_factory=list)


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _metric_rows(models: list[dict[str, Any]], task: str) -> list[list[str]]:
    def get(m: dict[str, Any], *keys: str) -> Any:
        cur: Any = m.get("metrics") or {}
        for k in keys:
            cur = cur.get(k) if isinstance(cur, dict) else None
        return cur

    if task == "classification":
        spec = [
            ("accuracy", ("eval_accuracy",), _pct),
            ("macro-F1", ("eval_f1_macro",), _num),
            ("loss (cross-entropy per row)", ("eval_loss",), _num),
        ]
    else:
        spec = [
            ("accuracy, label ranking (likeliest label)", ("ranking", "accuracy"), _pct),
            ("accuracy, greedy generation (exact label)", ("generation", "accuracy"), _pct),
            ("macro-F1, greedy generation", ("generation", "f1_macro"), _num),
            ("answers that are no label", ("generation", "off_label"), _pct),
            ("token-level loss (reply tokens)", ("eval_loss",), _num),
            ("token-level perplexity", ("eval_perplexity",), _num),
        ]
    rows = []
    for label, keys, fmt in spec:
        values = [get(m, *keys) for m in models]
        if any(v is not None for v in values):
            rows.append([label, *(fmt(v) for v in values)])
    rows.append(["size on disk (MB)", *(_num(m.get("size_mb"), 1) for m in models)])
    return rows


GENERATION_NOTE = (
    "Generation: greedy, at most {max_new_tokens} new tokens, template `{template}`, stopping at the model's eos; an "
    "answer counts when it names the gold label. Label ranking scores each label as the reply and takes the "
    "likeliest (no generation), so a base model that knows the answer but phrases it differently still gets credit."
)
QUANT_NOTE = "`{name}`: {title} (measured by `bittune quantize` / `merge` on the model reloaded from disk)."
SAMPLES_NOTE = (
    "The same prompts for every model, rendered with the model's own chat template (`{template}`), greedy, at most "
    "{max_new_tokens} new tokens, stopping at the model's eos."
)


def results_section(data: dict[str, Any], images: dict[str, str]) -> Section:
    models = data["models"]
    sec = Section("results", "Results")
    if data.get("data"):
        sec.parts.append(("p", f"Every model measured on the same data: `{Path(data['data']).name}`."))
    sec.parts.append(("table", ["metric", *(m["name"] for m in models)], _metric_rows(models, data["task"])))
    generated = [m["metrics"]["generation"] for m in models if "generation" in (m.get("metrics") or {})]
    if generated:
        sec.parts.append(("p", GENERATION_NOTE.format(**generated[0]["decoding"])))
    if "quality" in images:
        sec.parts.append(("img", images["quality"], "quality per model"))
    return sec


def speed_section(data: dict[str, Any]) -> Section:
    summary, records = data["summary"], data["metrics"]
    mem = summary.get("memory") or {}
    tps = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), int | float)]
    elapsed = max((r.get("elapsed_s") or 0 for r in records), default=0)
    steps = summary.get("steps")
    params = f"{_num(summary.get('trainable_parameters'))} / {_num(summary.get('total_parameters'))}"
    rows = [
        ["optimizer steps", _num(steps)],
        ["training time (s)", _num(float(elapsed) if elapsed else None, 1)],
        ["seconds per step", _num(elapsed / steps if elapsed and steps else None, 2)],
        ["train tokens/s (mean of logged steps)", _num(sum(tps) / len(tps) if tps else None, 0)],
        ["peak memory, process RSS (MB)", _num(mem.get("peak_rss_mb"), 0)],
        ["peak CUDA memory allocated (MB)", _num(mem.get("peak_cuda_allocated_mb"), 0)],
        ["weights in memory (MB)", _num(mem.get("weights_mb"), 1)],
        ["trainable / total parameters", params],
    ]
    sec = Section("speed", "Memory and speed", [("table", ["", "value"], [r for r in rows if r[1] != "-"])])
    per_model = [
        [m["name"], _num(m.get("load_s"), 2), _num((m.get("metrics") or {}).get("eval_s"), 2)] for m in data["models"]
    ]
    sec.parts.append(("table", ["model", "load (s)", "token-level eval (s)"], per_model))
    return sec


def quant_section(data: dict[str, Any]) -> Section | None:
    from bittune.quant.report import table

    reports = data.get("quantization") or []
    if not reports:
        return None
    sec = Section("quantization", "Quantization")
    for rep in reports:
        name = Path(rep["path"]).name
        sec.parts.append(("p", QUANT_NOTE.format(name=name, title=rep.get("title", "quantization report"))))
        sec.parts.append(("md", table(rep["models"], rep["task"])))
    return sec


def benchmarks_section(data: dict[str, Any]) -> Section | None:
    lm = data.get("lm_eval")
    if not lm:
        return None
    rows = []
    for name, res in lm["tasks"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in res["metrics"].items() if "stderr" not in k)
        rows.append([name, shown, _num(res.get("n")), _num(res.get("num_fewshot"))])
    s = lm.get("settings") or {}
    note = (
        f"lm-evaluation-harness {s.get('lm_eval_version', '')}, run in-process on the tuned model; chat template: "
        f"{s.get('chat_template')}, limit: {s.get('limit')}."
    )
    table = ("table", ["task", "metrics", "examples", "few-shot"], rows)
    return Section("benchmarks", "Benchmarks (lm-evaluation-harness)", [table, ("p", note)])


def samples_section(data: dict[str, Any]) -> Section | None:
    prompts = data.get("prompts") or []
    columns = [(m["name"], m["replies"]) for m in data["models"] if m.get("replies")]
    gguf = data.get("gguf") or {}
    if gguf.get("replies"):
        columns.append((f"GGUF in llama.cpp ({Path(gguf['path']).name})", gguf["replies"]))
    if not prompts or not columns:
        return None
    rows = []
    for i, p in enumerate(prompts):
        text = p if isinstance(p, str) else p[-1]["content"]
        rows.append([text, *(c[1][i] for c in columns)])
    table = ("table", ["prompt", *(c[0] for c in columns)], rows)
    return Section("samples", "Side-by-side generations", [("p", SAMPLES_NOTE.format(**data["decoding"])), table])


def build_sections(data: dict[str, Any], images: dict[str, str]) -> list[Section]:
    """Every section of the report, in order (sections with nothing to show are left out)."""
    import yaml

    cfg, summary = data["config"], data["summary"]
    model = cfg.get("model") or {}
    overview = [
        ["run", f"`{data['run_dir']}`"],
        ["base model", f"`{model.get('path')}`"],
        ["method", str(cfg.get("method"))],
        ["task", data["task"]],
        ["train data", f"`{(cfg.get('data') or {}).get('train')}`"],
        ["eval data", f"`{data.get('data')}`" if data.get("data") else "-"],
        ["steps", _num(summary.get("steps"))],
    ]
    sections = [Section("overview", "Overview", [("table", ["", ""], overview)]), results_section(data, images)]
    if "curves" in images:
        sections.append(Section("curves", "Training curves", [("img", images["curves"], "loss and learning rate")]))
    sections.append(speed_section(data))
    for extra in (quant_section(data), benchmarks_section(data)):
        if extra is not None:
            sections.append(extra)
    if "confusion" in images:
        sections.append(Section("confusion", "Confusion matrix", [("img", images["confusion"], "confusion matrix")]))
    samples = samples_section(data)
    if samples is not None:
        sections.append(samples)
    sections.append(Section("config", "Configuration", [("pre", yaml.safe_dump(cfg, sort_keys=False))]))
    return sections


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for part in sec.parts:
            kind = part[0]
            if kind == "p" or kind == "md":
                out += [part[1], ""]
            elif kind == "table":
                out.append("| " + " | ".join(_md_cell(h) for h in part[1]) + " |")
                out.append("|" + "|".join("---" for _ in part[1]) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in part[2]]
                out.append("")
            elif kind == "img":
                out += [f"![{part[2]}]({part[1]})", ""]
            elif kind == "pre":
                out += ["```yaml", part[1].rstrip(), "```", ""]
    return "\n".join(out)
