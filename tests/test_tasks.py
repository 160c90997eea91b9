"""Tests for skeleton_ds.tasks: real benchmark files, synthetic files in every format, bad input,
metrics, and the Hub row mapping (with datasets.load_dataset replaced, since there is no network)."""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

import pytest

from skeleton_ds.errors import UserError
from skeleton_ds.tasks import (
    TASK_NAMES, Example, GenericTaskSpec, compute_metrics, get_task, load_split,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BUILTIN = [n for n in TASK_NAMES if n != "generic"]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def labels(examples: list[Example]) -> list[int]:
    return [e.label for e in examples]


# --- registry ---------------------------------------------------------------------------------


def test_task_names() -> None:
    assert TASK_NAMES == ("sst2", "rte", "mrpc", "qnli", "boolq", "cb", "copa", "wic", "generic")


@pytest.mark.parametrize("name", BUILTIN)
def test_registry_task_is_well_formed(name: str) -> None:
    task = get_task(name)
    used = [f for _, f, _, _ in string.Formatter().parse(task.template) if f is not None]
    assert sorted(used) == sorted((*task.fields, "answer"))
    assert used[-1] == "answer"
    assert len(task.verbalizer) == len(task.label_names) == len(set(task.verbalizer))
    assert all(w.isalpha() and w.islower() for w in task.verbalizer)
    assert task.metrics[0] == "accuracy"
    assert set(task.metrics) <= {"accuracy", "f1", "macro_f1"}
    rendered = task.template.format(**{f: f"<{f}>" for f in task.fields}, answer="X")
    assert all(f"<{f}>" in rendered for f in task.fields)


def test_metric_choice() -> None:
    assert get_task("mrpc").metrics == ("accuracy", "f1")
    assert get_task("cb").metrics == ("accuracy", "macro_f1")
    assert get_task("sst2").metrics == ("accuracy",)


# --- real files -------------------------------------------------------------------------------

real = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")


@real
@pytest.mark.parametrize("name, split, rows, counts", [
    ("sst2", "dev", 872, [428, 444]),
    ("rte", "dev", 277, [146, 131]),
    ("rte", "train", 2490, [1249, 1241]),
    ("cb", "dev", 56, [23, 28, 5]),
    ("copa", "dev", 100, [55, 45]),
    ("qnli", "dev", 5463, [2702, 2761]),
    ("qnli", "train", 8999, None),
])
def test_real_files(name: str, split: str, rows: int, counts: list[int] | None) -> None:
    task = get_task(name)
    examples = load_split(task, split, DATA)
    assert len(examples) == rows
    assert all(len(e.texts) == len(task.fields) and all(e.texts) for e in examples)
    if counts is not None:
        assert [Counter(labels(examples))[i] for i in range(len(task.label_names))] == counts


@real
def test_real_rte_tsv_row_with_extra_field() -> None:
    train = load_split(get_task("rte"), "train", DATA)
    row = train[2164]
    assert row.texts[0].startswith('"That film wasn')
    assert row.label == 1  # not_entailment, read from the last field


@real
def test_real_sst2_text_is_stripped() -> None:
    first = load_split(get_task("sst2"), "dev", DATA)[0]
    assert first == Example(("it 's a charming and often affecting journey .",), 1)


# --- synthetic files in the standard layouts --------------------------------------------------


def test_mrpc_tsv_with_bom(tmp_path: Path) -> None:
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(tmp_path / "MRPC/train.tsv", header + "1\t11\t12\tA \"quoted\" one.\tSame one.\n"
          "0\t13\t14\tFirst.\tOther.\n", encoding="utf-8-sig")
    assert (tmp_path / "MRPC/train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_split(get_task("mrpc"), "train", tmp_path) == [
        Example(('A "quoted" one.', "Same one."), 1), Example(("First.", "Other."), 0)]


def test_sst2_tsv(tmp_path: Path) -> None:
    write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\na fine film \t1\ndull \t0\n")
    assert load_split(get_task("sst2"), "dev", tmp_path) == [
        Example(("a fine film",), 1), Example(("dull",), 0)]


def test_qnli_tsv(tmp_path: Path) -> None:
    write(tmp_path / "QNLI/train.tsv", "index\tquestion\tsentence\tlabel\n"
          "0\tWho?\tHim.\tentailment\n1\tWhat?\t\tnot_entailment\n")
    assert load_split(get_task("qnli"), "train", tmp_path) == [
        Example(("Who?", "Him."), 0), Example(("What?", ""), 1)]


def test_qnli_train_subset_fallback(tmp_path: Path) -> None:
    subset = {"7": {"text_a": "Q?", "text_b": "S.", "label": "not_entailment"}}
    write(tmp_path / "QNLI/train_subset/train.json", json.dumps(subset))
    assert load_split(get_task("qnli"), "train", tmp_path) == [Example(("Q?", "S."), 1)]


def test_boolq_jsonl(tmp_path: Path) -> None:
    jsonl(tmp_path / "BoolQ/val.jsonl", [
        {"question": "is it", "passage": "It is.", "label": True, "idx": 0},
        {"question": "is it not", "passage": None, "label": "false", "idx": 1}])
    assert load_split(get_task("boolq"), "dev", tmp_path) == [
        Example(("is it", "It is."), 1), Example(("is it not", ""), 0)]


def test_wic_jsonl_field_order(tmp_path: Path) -> None:
    jsonl(tmp_path / "WiC/train.jsonl", [
        {"sentence2": "S2.", "word": "bank", "sentence1": "S1.", "label": False}])
    assert load_split(get_task("wic"), "train", tmp_path) == [Example(("bank", "S1.", "S2."), 0)]


def test_rte_jsonl_only(tmp_path: Path) -> None:
    jsonl(tmp_path / "RTE/val.jsonl", [
        {"premise": "P.", "hypothesis": "H.", "label": "not_entailment", "idx": 0}])
    assert load_split(get_task("rte"), "dev", tmp_path) == [Example(("P.", "H."), 1)]


def test_rte_decides_per_split(tmp_path: Path) -> None:
    write(tmp_path / "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\t\tentailment\n")
    jsonl(tmp_path / "RTE/val.jsonl", [{"premise": "P.", "hypothesis": "H.", "label": "entailment"}])
    assert load_split(get_task("rte"), "train", tmp_path) == [Example(("A.", "B."), 0)]
    assert load_split(get_task("rte"), "dev", tmp_path) == [Example(("P.", "H."), 0)]


def test_copa_and_cb_labels(tmp_path: Path) -> None:
    jsonl(tmp_path / "COPA/val.jsonl", [{"premise": "P.", "choice1": "A.", "choice2": "B.",
                                         "question": "cause", "label": 1}])
    jsonl(tmp_path / "CB/val.jsonl", [{"premise": "P.", "hypothesis": "H.", "label": "neutral"}])
    assert load_split(get_task("copa"), "dev", tmp_path) == [Example(("P.", "A.", "B.", "cause"), 1)]
    assert labels(load_split(get_task("cb"), "dev", tmp_path)) == [2]


# --- the generic task -------------------------------------------------------------------------


def spec_for(train: Path, dev: Path | None = None, **kw) -> GenericTaskSpec:
    return GenericTaskSpec(train_file=train, dev_file=dev or train, text_columns=("a", "b"), **kw)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json_list", "json_ids"])
def test_generic_formats(tmp_path: Path, fmt: str) -> None:
    rows = [{"a": "x, \"1\"" if fmt == "csv" else "x1", "b": "y1", "label": "pos"},
            {"a": "x2", "b": "", "label": "neg"}]
    if fmt == "csv":
        path = write(tmp_path / "d.csv", 'b,label,a\ny1,pos,"x, ""1"""\n,neg,x2\n')
    elif fmt == "tsv":
        path = write(tmp_path / "d.tsv", "b\tlabel\ta\ny1\tpos\tx1\n\tneg\tx2\n")
    elif fmt == "jsonl":
        path = jsonl(tmp_path / "d.jsonl", rows)
    elif fmt == "json_list":
        path = write(tmp_path / "d.json", json.dumps(rows))
    else:
        path = write(tmp_path / "d.json", json.dumps({str(i): r for i, r in enumerate(rows)}))
    task = get_task("generic", spec_for(path))
    assert task.fields == ("a", "b")
    assert task.label_names == ("neg", "pos")  # sorted distinct train labels
    assert task.verbalizer == ("neg", "pos")
    assert task.template == "a: {a} b: {b} Answer: {answer}"
    assert task.metrics == ("accuracy", "macro_f1")
    for split in ("train", "dev"):
        assert load_split(task, split, None) == [Example((rows[0]["a"], "y1"), 1), Example(("x2", ""), 0)]


def test_generic_json_booleans_and_explicit_spec(tmp_path: Path) -> None:
    train = jsonl(tmp_path / "t.jsonl", [{"a": "1", "b": "2", "y": True}, {"a": "3", "b": "4", "y": False}])
    dev = write(tmp_path / "d.csv", "a,b,y\n5,6,true\n")
    default = get_task("generic", spec_for(train, dev, label_column="y"))
    assert default.label_names == ("False", "True") and default.verbalizer == ("false", "true")
    assert labels(load_split(default, "dev", None)) == [1]
    task = get_task("generic", spec_for(train, dev, label_column="y", label_names=("True", "False"),
                                        template="{b} / {a} ? {answer}", verbalizer=("yes", "no")))
    assert labels(load_split(task, "train", Path("/unused"))) == [0, 1]
    assert task.template == "{b} / {a} ? {answer}" and task.verbalizer == ("yes", "no")


def test_generic_spec_passed_to_load_split(tmp_path: Path) -> None:
    first = write(tmp_path / "one.csv", "a,b,label\nx,y,0\nz,w,1\n")
    second = write(tmp_path / "two.csv", "a,b,label\nq,r,1\n")
    task = get_task("generic", spec_for(first))
    assert load_split(task, "dev", None, spec_for(first, second)) == [Example(("q", "r"), 1)]


# --- bad input --------------------------------------------------------------------------------


def raises(match: str):
    return pytest.raises(UserError, match=match)


def test_unknown_task_lists_valid_names() -> None:
    with raises(r"Unknown task 'sst5'.*sst2, rte, mrpc.*generic"):
        get_task("sst5")


def test_generic_without_spec() -> None:
    with raises("needs a spec"):
        get_task("generic")


def test_missing_dir_and_files(tmp_path: Path) -> None:
    with raises("does not exist"):
        load_split(get_task("sst2"), "dev", tmp_path / "nope")
    with raises(f"expected {tmp_path / 'SST-2' / 'dev.tsv'}"):
        load_split(get_task("sst2"), "dev", tmp_path)
    with raises(f"{tmp_path / 'RTE' / 'train.tsv'} or {tmp_path / 'RTE' / 'train.jsonl'}"):
        load_split(get_task("rte"), "train", tmp_path)
    with raises("Unknown split 'test'"):
        load_split(get_task("sst2"), "test", tmp_path)
    with raises("does not exist"):
        get_task("generic", spec_for(tmp_path / "absent.csv"))
    with raises("unknown format"):
        get_task("generic", spec_for(write(tmp_path / "d.txt", "a")))


def test_label_outside_set_names_line_and_value(tmp_path: Path) -> None:
    write(tmp_path / "SST-2/train.tsv", "sentence\tlabel\nok\t1\nbad\t2\n")
    with raises(r"train\.tsv line 3 has label '2', which is not one of 0, 1"):
        load_split(get_task("sst2"), "train", tmp_path)
    jsonl(tmp_path / "CB/train.jsonl", [{"premise": "p", "hypothesis": "h", "label": "unknown"}])
    with raises(r"train\.jsonl line 1 has label 'unknown'.*entailment, contradiction, neutral"):
        load_split(get_task("cb"), "train", tmp_path)


def test_empty_split(tmp_path: Path) -> None:
    write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\n")
    with raises(r"dev\.tsv has no examples"):
        load_split(get_task("sst2"), "dev", tmp_path)
    write(tmp_path / "BoolQ/val.jsonl", "\n")
    with raises(r"val\.jsonl has no examples"):
        load_split(get_task("boolq"), "dev", tmp_path)


def test_missing_column(tmp_path: Path) -> None:
    csv_file = write(tmp_path / "d.csv", "a,label\nx,0\ny,1\n")
    task = get_task("generic", spec_for(csv_file, label_names=("0", "1")))
    with raises(r"d\.csv has no column 'b'"):
        load_split(task, "train", None)
    json_file = jsonl(tmp_path / "d.jsonl", [{"a": "x", "b": "y", "label": 0}, {"a": "x", "label": 1}])
    task = get_task("generic", spec_for(json_file))
    with raises(r"d\.jsonl line 2 has no column 'b'"):
        load_split(task, "train", None)


def test_bad_generic_specs(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,b,label\nx,y,0\nz,w,1\n")
    with raises("must use {a}, {b} once each"):
        get_task("generic", spec_for(path, template="{a} {answer} {b}"))
    with raises("give one per label"):
        get_task("generic", spec_for(path, verbalizer=("yes",)))
    with raises("single lowercase words"):
        get_task("generic", spec_for(path, verbalizer=("Yes", "no")))
    with raises("at least two distinct"):
        get_task("generic", spec_for(write(tmp_path / "one.csv", "a,b,label\nx,y,0\n")))
    with raises("cannot be a template placeholder"):
        get_task("generic", GenericTaskSpec(path, path, text_columns=("a.b",)))


def test_short_tsv_row_and_broken_json(tmp_path: Path) -> None:
    write(tmp_path / "QNLI/dev.tsv", "index\tquestion\tsentence\tlabel\n0\tWho?\tentailment\n")
    with raises(r"dev\.tsv line 2 has 3 fields but the header has 4"):
        load_split(get_task("qnli"), "dev", tmp_path)
    write(tmp_path / "CB/val.jsonl", '{"premise": "p"\n')
    with raises(r"val\.jsonl line 1 is not valid JSON"):
        load_split(get_task("cb"), "dev", tmp_path)


# --- metrics ----------------------------------------------------------------------------------


def test_accuracy() -> None:
    assert compute_metrics(get_task("sst2"), [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}


def test_binary_f1() -> None:
    # tp=2 (idx 0, 3), fp=1 (idx 2), fn=1 (idx 4): f1 = 4 / 6
    got = compute_metrics(get_task("mrpc"), [1, 0, 1, 1, 0], [1, 0, 0, 1, 1])
    assert got == {"accuracy": pytest.approx(0.6), "f1": pytest.approx(2 / 3)}
    assert compute_metrics(get_task("mrpc"), [0, 0], [0, 0])["f1"] == 0.0


def test_macro_f1() -> None:
    # class 0: tp=2 fp=0 fn=1 -> 0.8; class 1: tp=1 fp=2 fn=1 -> 0.4; class 2: tp=0 -> 0
    got = compute_metrics(get_task("cb"), [0, 0, 1, 1, 1, 2], [0, 0, 1, 0, 2, 1])
    assert got["accuracy"] == pytest.approx(3 / 6)
    assert got["macro_f1"] == pytest.approx((0.8 + 0.4 + 0) / 3)
    # classes absent from both predictions and labels are left out, as in sklearn and SuperGLUE
    assert compute_metrics(get_task("cb"), [0, 1], [0, 1])["macro_f1"] == 1.0


def test_metrics_reject_empty_and_mismatched() -> None:
    with raises("at least one"):
        compute_metrics(get_task("sst2"), [], [])
    with raises("got 2 and 1"):
        compute_metrics(get_task("sst2"), [0, 1], [1])


# --- Hub path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, columns, label", [
    ("sst2", {"sentence": ["good "]}, 1),
    ("rte", {"sentence1": ["A"], "sentence2": ["B"]}, 1),
    ("mrpc", {"sentence1": ["A"], "sentence2": ["B"]}, 1),
    ("qnli", {"question": ["Q"], "sentence": ["S"]}, 0),
    ("boolq", {"question": ["Q"], "passage": ["P"]}, 1),
    ("cb", {"premise": ["P"], "hypothesis": ["H"]}, 2),
    ("copa", {"premise": ["P"], "choice1": ["A"], "choice2": ["B"], "question": ["effect"]}, 0),
    ("wic", {"word": ["w"], "sentence1": ["A"], "sentence2": ["B"]}, 1),
])
def test_hub_mapping(monkeypatch: pytest.MonkeyPatch, name: str, columns: dict, label: int) -> None:
    import datasets

    calls = []

    def fake_load_dataset(path: str, config: str, split: str) -> datasets.Dataset:
        calls.append((path, config, split))
        return datasets.Dataset.from_dict({"idx": [0], **columns, "label": [label]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = get_task(name)
    examples = load_split(task, "dev", None)
    hub = "nyu-mll/glue" if name in ("sst2", "rte", "mrpc", "qnli") else "aps/super_glue"
    assert calls == [(hub, name, "validation")]
    assert examples == [Example(tuple(columns[f][0].strip() for f in task.fields), label)]


def test_hub_rejects_unlabeled_rows_and_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_dict({"sentence": ["x"], "label": [-1]}))
    with raises("label -1, outside 0..1"):
        load_split(get_task("sst2"), "train", None)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with raises("pass a data directory"):
        load_split(get_task("sst2"), "train", None)
