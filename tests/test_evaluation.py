"""The one evaluation module: metrics on fixed predictions, label ranking, and eval/compare agreeing on one model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tiny import COLORS, THINGS, sentiment_rows, write_jsonl

# ---------------------------------------------------------------------------------------------------------------
# Metrics on fixed predictions, against values computed by hand


def test_metrics_equal_hand_computed_values():
    from bittune.evaluation.metrics import accuracy, confusion_matrix, label_metrics, macro_f1, per_class_accuracy

    golds = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "x", "c"]  # "x" is off the label set
    assert accuracy(preds, golds) == pytest.approx(4 / 6)
    # a: tp2 fp0 fn1 -> 4/5; b: tp1 fp1 fn1 -> 2/4; c: tp1 -> 1.0
    assert macro_f1(preds, golds, ["a", "b", "c"]) == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert confusion_matrix(preds, golds, ["a", "b", "c"]) == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    assert per_class_accuracy(preds, golds, ["a", "b", "c"]) == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 1.0})
    m = label_metrics(preds, golds, ["a", "b", "c"])
    assert m["off_label"] == pytest.approx(1 / 6) and m["n"] == 6
    assert m["confusion"]["labels"] == ["a", "b", "c", "(other)"]


def test_paired_exact_test_equals_the_binomial_tail():
    from bittune.evaluation.metrics import paired_exact_test

    # rows: a right only on 3, b right only on 1, both right on 2 -> n=4 discordant, k=1: 2*(1+4)/16
    a = [True, True, True, True, True, False, False]
    b = [True, True, False, False, False, True, False]
    assert paired_exact_test(a, b) == {"a_only": 3, "b_only": 1, "p_value": pytest.approx(10 / 16)}
    assert paired_exact_test([True] * 8, [False] * 8)["p_value"] == pytest.approx(2 / 256)
    assert paired_exact_test([True, False], [True, False])["p_value"] == 1.0  # no discordant rows: no evidence
    with pytest.raises(ValueError):
        paired_exact_test([True], [True, False])


def test_classifier_macro_f1_keeps_its_old_meaning():
    from bittune.training.evaluate import macro_f1

    # class 2 never occurs: it is left out of the mean, as before
    assert macro_f1([0, 1, 1, 0], [0, 1, 0, 0], 3) == pytest.approx((2 * 2 / (2 * 2 + 1) + 2 / 3) / 2)


def test_answers_are_matched_to_labels():
    from bittune.evaluation.metrics import match_label

    labels = ["number", "human", "New York"]
    assert match_label("Number.", labels) == "number"
    assert match_label("human - a person", labels) == "human"
    assert match_label("new york", labels) == "New York"
    assert match_label("The answer is a number", labels) == "the"  # off the label set


# ---------------------------------------------------------------------------------------------------------------
# Label tasks on a tiny causal LM


def label_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    mapping = {t: COLORS[i % 4] for i, t in enumerate(THINGS)}
    rows = []
    for _ in range(n):
        t = rng.choice(THINGS)
        user = {"role": "user", "content": f"What color is the {t}?"}
        rows.append({"messages": [user, {"role": "assistant", "content": mapping[t]}]})
    return rows


@pytest.fixture(scope="module")
def label_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("labels") / "colors.jsonl", label_rows(24))


def _full_forward_logprobs(loaded, prompts, labels, system_prompt=None) -> list[list[float]]:
    """Each label's summed log-probability after each prompt, from one plain forward of prompt + label."""
    import torch

    from bittune.evaluation.generation import encode_prompts

    tok, out = loaded.tokenizer, []
    for ids in encode_prompts(tok, prompts, "auto", system_prompt):
        row = []
        for lab in labels:
            cont = tok(tok.decode(ids) + lab, add_special_tokens=False)["input_ids"][len(ids) :]
            with torch.no_grad():
                logits = loaded.model(input_ids=torch.tensor([ids + cont])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            row.append(sum(float(logp[len(ids) - 1 + k, c]) for k, c in enumerate(cont)))
        out.append(row)
    return out


def test_label_ranking_with_cache_equals_full_forward(tiny_llama_dir: Path):
    from bittune.evaluation.generation import label_logprobs
    from bittune.evaluation.loading import load_model

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    prompts = [[{"role": "user", "content": f"What color is the {t}?"}] for t in THINGS[:5]]
    labels = ["red", "blue green", "yellow"]
    got = label_logprobs(loaded.model, loaded.tokenizer, prompts, labels, batch_size=3)
    want = _full_forward_logprobs(loaded, prompts, labels)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4)


def test_label_ranking_runs_the_prompts_shared_prefix_once(tiny_llama_dir: Path):
    """Prompts that begin alike (system prompt, instruction) share one forward of that beginning; each prompt's own
    tokens and the labels then run against its cached keys and values, with the same scores."""
    from bittune.evaluation.generation import encode_prompts, label_logprobs
    from bittune.evaluation.loading import load_model

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    system = "Name the color of the thing in one or two words, like red or blue green, and nothing else."
    prompts = [[{"role": "user", "content": f"What color is the {t}?"}] for t in THINGS[:6]]
    labels = ["red", "blue green", "yellow"]
    rows_seen: list[int] = []

    def count(module, args, kwargs, out):
        rows_seen.append(kwargs["input_ids"].numel())

    hook = loaded.model.model.register_forward_hook(count, with_kwargs=True)
    got = label_logprobs(loaded.model, loaded.tokenizer, prompts, labels, system_prompt=system, batch_size=6)
    hook.remove()
    prompt_tokens = sum(len(ids) for ids in encode_prompts(loaded.tokenizer, prompts, "auto", system))
    assert rows_seen[0] < prompt_tokens / len(prompts)  # the shared beginning, as a batch of one
    assert sum(rows_seen[:2]) < prompt_tokens / 2  # then every prompt's own tokens
    want = _full_forward_logprobs(loaded, prompts, labels, system)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4)


def test_eval_scores_a_label_task_by_generation_and_ranking(tiny_llama_dir: Path, label_file: Path):
    from bittune.evaluation.core import evaluate_path
    from bittune.evaluation.metrics import accuracy

    result = evaluate_path(str(tiny_llama_dir), data=str(label_file), device="cpu", labels="auto")
    assert result["labels"] == sorted(COLORS[:4])
    assert result["eval_perplexity"] > 1 and "token-level" in result["eval_metric_note"]
    gen, rank = result["generation"], result["ranking"]
    assert gen["decoding"]["do_sample"] is False and gen["decoding"]["max_new_tokens"] > 0
    assert len(gen["answers"]) == len(rank["answers"]) == result["rows"] == 24
    golds = [r["messages"][-1]["content"] for r in label_rows(24)]
    assert rank["accuracy"] == pytest.approx(accuracy(rank["answers"], golds))
    assert set(rank["answers"]) <= set(result["labels"])  # ranking always names a label
    assert sum(map(sum, rank["confusion"]["matrix"])) == 24


def test_malformed_data_fails_before_any_weights_load(tiny_llama_dir: Path, tmp_path: Path, monkeypatch):
    from bittune.errors import DataError
    from bittune.evaluation import loading

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded before the data check"))
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*no assistant message"):
        from bittune.evaluation.core import evaluate_path

        evaluate_path(str(tiny_llama_dir), data=str(bad), device="cpu")


def test_classifier_eval_has_confusion_matrix(tiny_bert_dir: Path, tmp_path: Path):
    from bittune.evaluation.core import evaluate_path

    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(12))
    cfg = json.loads((tiny_bert_dir / "config.json").read_text())
    cfg["architectures"] = ["BertForSequenceClassification"]
    cfg["id2label"], cfg["label2id"] = {"0": "neg", "1": "pos"}, {"neg": 0, "pos": 1}
    model_dir = tmp_path / "clf"
    model_dir.mkdir()
    for f in tiny_bert_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    (model_dir / "config.json").write_text(json.dumps(cfg))
    result = evaluate_path(str(model_dir), data=str(data), device="cpu")
    conf = result["confusion"]
    assert conf["labels"] == ["neg", "pos"] and sum(map(sum, conf["matrix"])) == 12
    diag = sum(conf["matrix"][i][i] for i in range(2))
    assert result["eval_accuracy"] == pytest.approx(diag / 12)


def test_eval_and_compare_print_the_same_numbers(tiny_llama_dir: Path, label_file: Path, tmp_path: Path):
    from bittune.compare import compare_models
    from bittune.evaluation.core import evaluate_path

    ev = evaluate_path(str(tiny_llama_dir), data=str(label_file), device="cpu", labels="auto")
    cmp = compare_models([str(tiny_llama_dir)], data=str(label_file), out=tmp_path / "cmp", device="cpu", labels="auto")
    entry = cmp["models"][0]
    assert entry["eval_loss"] == ev["eval_loss"] and entry["eval_perplexity"] == ev["eval_perplexity"]
    assert entry["generation"]["accuracy"] == ev["generation"]["accuracy"]
    assert entry["ranking"]["accuracy"] == ev["ranking"]["accuracy"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"| {entry['name']} | {100 * ev['generation']['accuracy']:.1f}% |" in md


def test_token_metrics_run_the_head_at_targets_only_with_the_plain_loss(tiny_llama_dir: Path, label_file: Path):
    """Perplexity needs the logits of label positions only: the evaluation pass applies the output head there (and
    runs the rows' shared prompt prefix once), and its loss equals the full-logits loss over the same rows."""
    import torch

    from bittune.evaluation.core import data_settings, token_metrics, tokenized_rows
    from bittune.evaluation.loading import load_model
    from bittune.inference import eval_batches
    from bittune.training.loss import causal_lm_loss_sum

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    rows = tokenized_rows(loaded, data_settings(str(tiny_llama_dir), str(label_file)))
    model, tok = loaded.model, loaded.tokenizer
    head_rows: list[int] = []
    body_batches: list[int] = []

    def on_head(module, args, out):
        head_rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])

    def on_body(module, args, kwargs, out):
        body_batches.append(kwargs["input_ids"].shape[0])

    hooks = [model.lm_head.register_forward_hook(on_head), model.model.register_forward_hook(on_body, with_kwargs=True)]
    got = token_metrics(model, tok, "causal-lm", rows, batch_size=8)
    for h in hooks:
        h.remove()
    total, targets = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(rows, "causal-lm", tok, 8):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(causal_lm_loss_sum(logits, batch["labels"]))
            targets += int((batch["labels"][:, 1:] != -100).sum())
    assert got["eval_loss"] == pytest.approx(total / targets, rel=1e-5)
    assert sum(head_rows) == targets  # the head saw the label positions, not every position of every row
    assert 1 in body_batches  # the shared prompt prefix ran once, as a batch of one


def test_generation_runs_the_prompts_shared_prefix_once_with_the_same_replies(tiny_llama_dir: Path):
    """Greedy replies of a batch whose prompts share their beginning (run once, cached) equal each prompt's own."""
    from bittune.evaluation.generation import Decoding, generate_replies
    from bittune.evaluation.loading import load_model

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    decoding = Decoding(max_new_tokens=6, system_prompt="Name the color of the thing in one or two words only.")
    prompts = [[{"role": "user", "content": f"What color is the {t}?"}] for t in THINGS[:6]]
    rows_seen: list[int] = []

    def count(module, args, kwargs, out):
        rows_seen.append(kwargs["input_ids"].shape[0])

    hook = loaded.model.model.register_forward_hook(count, with_kwargs=True)
    batched = generate_replies(loaded.model, loaded.tokenizer, prompts, decoding, batch_size=6)
    hook.remove()
    assert rows_seen[0] == 1  # the shared beginning, once
    alone = [generate_replies(loaded.model, loaded.tokenizer, [p], decoding, batch_size=1)[0] for p in prompts]
    assert batched == alone and any(batched)
