"""``bittune report``: every section, valid PNGs, one self-contained HTML page that renders in headless Chromium,
and the same numbers as ``bittune eval``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_evaluation import label_rows
from tiny import write_jsonl

pytestmark = pytest.mark.e2e
PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ["overview", "results", "curves", "speed", "quantization", "benchmarks", "confusion", "samples", "config"]


@pytest.fixture(scope="module")
def label_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    d = tmp_path_factory.mktemp("report-data")
    train_file = write_jsonl(d / "train.jsonl", label_rows(48, 1))
    eval_file = write_jsonl(d / "eval.jsonl", label_rows(16, 2))
    raw = {
        "model": {"path": str(tiny_llama_dir)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(train_file), "eval": str(eval_file), "format": "chat", "max_length": 64},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 2e-2, "seed": 1, "device": "cpu", "eval_every": 3},
        "output_dir": str(tmp_path_factory.mktemp("report-run") / "run"),
    }
    return train(config_from_dict(raw), progress=False).run_dir


@pytest.fixture(scope="module")
def report_dir(label_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bittune.cli import main
    from bittune.quant.flows import quantize_path
    from bittune.quant.spec import IntSpec

    q = tmp_path_factory.mktemp("report-q") / "int4"
    quantize_path(str(label_run), IntSpec(bits=4, group_size=16), q, device="cpu")
    lm = {"summary": {"tasks": {"trec_mc": {"metrics": {"acc": 0.5}, "n": 4, "num_fewshot": 0}}, "settings": {}}}
    (label_run / "eval").mkdir(exist_ok=True)
    (label_run / "eval" / "lm_eval.json").write_text(json.dumps(lm))
    main(["report", str(label_run), "--compare", str(q), "--device", "cpu"])
    return label_run / "report"


def test_report_has_every_section_and_valid_pngs(report_dir: Path):
    md = (report_dir / "report.md").read_text()
    for title in ("Overview", "Results", "Training curves", "Memory and speed", "Quantization", "Benchmarks",
                  "Confusion matrix", "Side-by-side generations", "Configuration"):  # fmt: skip
        assert f"## {title}" in md
    for png in ("curves.png", "quality.png", "confusion.png"):
        data = (report_dir / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000
        assert f"]({png})" in md
    page = (report_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and 'src="curves.png"' not in page  # self-contained
    assert "| base | tuned | int4 |" in md.replace("| metric ", "|")


def test_report_numbers_equal_eval(report_dir: Path, label_run: Path):
    from bittune.evaluation.core import evaluate_path

    data = json.loads((report_dir / "report.json").read_text())
    tuned = next(m for m in data["models"] if m["name"] == "tuned")["metrics"]
    ev = evaluate_path(str(label_run), device="cpu", labels="auto")
    assert tuned["eval_loss"] == ev["eval_loss"]
    assert tuned["generation"]["accuracy"] == ev["generation"]["accuracy"]
    assert tuned["ranking"]["accuracy"] == ev["ranking"]["accuracy"]


def test_report_reuses_models_measured_on_its_inputs(report_dir: Path, label_run: Path, tmp_path: Path):
    """A model measured before the run trained (the demo's base), from the run config's data section, is the
    report's own measurement: same numbers; reused as it is; refused when measured on other inputs."""
    import shutil

    from bittune.config import read_run_config
    from bittune.errors import BittuneError
    from bittune.report.build import write_report
    from bittune.report.collect import ReportOptions, measure_model, report_inputs

    cfg = read_run_config(label_run)
    base = measure_model("base", cfg.model.path, inputs=report_inputs(cfg.data, "causal-lm"), device="cpu")
    reported = json.loads((report_dir / "report.json").read_text())
    own = next(m for m in reported["models"] if m["name"] == "base")
    assert base["inputs"] == own["inputs"] and base["metrics"]["eval_loss"] == own["metrics"]["eval_loss"]
    assert base["metrics"]["ranking"]["accuracy"] == own["metrics"]["ranking"]["accuracy"]
    assert base["replies"] == own["replies"]
    marked = {**base, "metrics": {**base["metrics"], "eval_loss": -1.0}}  # visibly not measured again
    copy = tmp_path / "run"
    shutil.copytree(label_run, copy, ignore=shutil.ignore_patterns("report"))
    folder = write_report(copy, ReportOptions(device="cpu", measured=[marked]))
    data = json.loads((folder / "report.json").read_text())
    assert [m["metrics"]["eval_loss"] for m in data["models"] if m["name"] == "base"] == [-1.0]
    with pytest.raises(BittuneError, match="measured on other data"):
        write_report(copy, ReportOptions(device="cpu", measured=[marked], samples=(1, 8)))


def test_report_html_renders_in_chromium(report_dir: Path, tmp_path: Path):
    from bittune.report.browser import find_chromium, render_in_chromium

    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); `make test` installs it on Debian")
    shown = render_in_chromium(report_dir / "report.html", screenshot=tmp_path / "report.png")
    assert shown["sections"] == SECTIONS
    assert shown["images"] == 3  # every inlined image decoded
    assert (tmp_path / "report.png").read_bytes().startswith(PNG)


def test_report_refuses_a_folder_that_is_not_a_run(tiny_llama_dir: Path, capsys):
    from bittune.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["report", str(tiny_llama_dir)])
    assert exc.value.code == 2 and "not a bittune run directory" in capsys.readouterr().err
