"""Benchmark tasks as data (``_REGISTRY``) plus the shared readers and metrics they drive, so adding
a task means adding an entry, not a code path.

With ``data_dir=None`` splits come from the Hugging Face Hub (``nyu-mll/glue``, ``aps/super_glue``);
otherwise from the standard files in ``data_dir/<TaskDir>/``:

* GLUE TSVs (``train.tsv``/``dev.tsv``) are read with ``csv.QUOTE_NONE`` because their quotes are
  literal text, by column position, with the label from the last field (one RTE train row has an
  extra empty field). SuperGLUE is JSON Lines (``train.jsonl``/``val.jsonl``).
* RTE uses the GLUE TSV when it exists and otherwise the SuperGLUE JSONL, decided per split.
* QNLI train falls back to ``QNLI/train_subset/train.json`` when ``QNLI/train.tsv`` is absent: the
  PowerfulPromptFT preprocessed subset (8,999 pairs), not the official split, so scores trained on
  it are not comparable with full-QNLI numbers. QNLI dev is always ``QNLI/dev.tsv``.

Raw labels are compared as stripped, case-insensitive strings, so 0 and "0", True and "true", and
"entailment" resolve alike in every file format.
"""

from __future__ import annotations

import csv
import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from skeleton_ds.errors import UserError

SPLITS = ("train", "dev")
_HUB_SPLIT = {"train": "train", "dev": "validation"}
_GENERIC = "generic"

Key = str | int  # a column name, or a field position in a GLUE TSV (-1 = last field)
Sources = tuple[tuple[str, tuple["Source", ...]], ...]  # split -> candidate files, first existing wins


@dataclass(frozen=True)
class Source:
    """One candidate file for a split. The path is relative to data_dir, or absolute for generic."""

    path: Path
    columns: tuple[Key, ...]
    label: Key


@dataclass(frozen=True)
class Task:
    """A benchmark as data: how to show a row to the model and how to score it. The fields after
    `metrics` say where rows come from; only this module reads them."""

    name: str
    fields: tuple[str, ...]
    template: str
    label_names: tuple[str, ...]
    verbalizer: tuple[str, ...]
    metrics: tuple[str, ...]
    hub: str | None = None  # Hub dataset path; the config is the task name, columns are `fields`
    sources: Sources = ()
    raw_labels: tuple[str, ...] = ()  # label values as written in the files, when not the label names
    decoder: Phrasing | None = None
    """How a decoder LM is asked instead (None: as above). A causal LM reads the label as the next
    token, so its template ends at the answer and names the choices; an MLM fills a blank mid-sentence."""


@dataclass(frozen=True)
class Phrasing:
    template: str
    verbalizer: tuple[str, ...]


@dataclass(frozen=True)
class Example:
    """One row with texts in `task.fields` order and the label as an index: nothing downstream
    needs to know the file format or the raw label spelling."""

    texts: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class GenericTaskSpec:
    """A user's own dataset from CLI flags; fields left as None are derived from the train file."""

    train_file: Path
    dev_file: Path
    text_columns: tuple[str, ...]
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None
    template: str | None = None
    verbalizer: tuple[str, ...] | None = None


def _glue(folder: str, columns: tuple[int, ...], label: int = -1) -> Sources:
    return tuple((s, (Source(Path(folder, f"{s}.tsv"), columns, label),)) for s in SPLITS)


def _superglue(folder: str, columns: tuple[str, ...]) -> Sources:
    stems = {"train": "train", "dev": "val"}
    return tuple((s, (Source(Path(folder, f"{stems[s]}.jsonl"), columns, "label"),)) for s in SPLITS)


def _either(*options: Sources) -> Sources:
    """Concatenate per-split candidates, so the first existing file wins for each split on its own."""
    return tuple((s, sum((dict(o).get(s, ()) for o in options), ())) for s in SPLITS)


_GLUE, _SUPERGLUE = "nyu-mll/glue", "aps/super_glue"
_NLI = ("entailment", "not_entailment")
_QNLI_SUBSET = (("train", (Source(Path("QNLI/train_subset/train.json"), ("text_a", "text_b"), "label"),)),)
_BINARY = ("0", "1")


def _yes_no(question: str, verbalizer: tuple[str, ...]) -> Phrasing:
    return Phrasing(question + " Yes or no?\nAnswer: {answer}", verbalizer)


_REGISTRY: dict[str, Task] = {t.name: t for t in (
    Task("sst2", ("sentence",), "{sentence} It was {answer}.", ("negative", "positive"),
         ("terrible", "great"), ("accuracy",), _GLUE, _glue("SST-2", (0,)), _BINARY,
         Phrasing("Review: {sentence}\nSentiment (positive or negative): {answer}", ("negative", "positive"))),
    Task("rte", ("sentence1", "sentence2"),
         "{sentence1} Question: {sentence2} True or false? Answer: {answer}", _NLI, ("yes", "no"),
         ("accuracy",), _GLUE, _either(_glue("RTE", (1, 2)), _superglue("RTE", ("premise", "hypothesis"))),
         decoder=_yes_no("{sentence1}\nQuestion: Does this imply that \"{sentence2}\"?", ("yes", "no"))),
    Task("mrpc", ("sentence1", "sentence2"),
         "{sentence1} Question: Does that mean the same as \"{sentence2}\"? Answer: {answer}",
         ("not_equivalent", "equivalent"), ("no", "yes"), ("accuracy", "f1"), _GLUE,
         _glue("MRPC", (3, 4), label=0), _BINARY,
         _yes_no("Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do they mean the same thing?",
                 ("no", "yes"))),
    Task("qnli", ("question", "sentence"),
         "{question} Sentence: {sentence} Does the sentence answer the question? Answer: {answer}",
         _NLI, ("yes", "no"), ("accuracy",), _GLUE, _either(_glue("QNLI", (1, 2)), _QNLI_SUBSET),
         decoder=_yes_no("Question: {question}\nSentence: {sentence}\nDoes the sentence answer the question?",
                         ("yes", "no"))),
    Task("boolq", ("question", "passage"), "{passage} Question: {question}? Answer: {answer}",
         ("False", "True"), ("no", "yes"), ("accuracy",), _SUPERGLUE,
         _superglue("BoolQ", ("question", "passage")),
         decoder=_yes_no("{passage}\nQuestion: {question}?", ("no", "yes"))),
    Task("cb", ("premise", "hypothesis"),
         "{premise} Question: {hypothesis} True, false, or neither? Answer: {answer}",
         ("entailment", "contradiction", "neutral"), ("yes", "no", "maybe"), ("accuracy", "macro_f1"),
         _SUPERGLUE, _superglue("CB", ("premise", "hypothesis")),
         decoder=Phrasing("{premise}\nQuestion: Does this imply that \"{hypothesis}\"? Yes, no, or maybe?\n"
                          "Answer: {answer}", ("yes", "no", "maybe"))),
    Task("copa", ("premise", "choice1", "choice2", "question"),
         "{premise} What was the {question}, the first or the second? First: {choice1} "
         "Second: {choice2} Answer: {answer}", ("choice1", "choice2"), ("first", "second"),
         ("accuracy",), _SUPERGLUE, _superglue("COPA", ("premise", "choice1", "choice2", "question")), _BINARY,
         Phrasing("{premise}\nWhat was the {question}?\nFirst: {choice1}\nSecond: {choice2}\n"
                  "Answer (first or second): {answer}", ("first", "second"))),
    Task("wic", ("word", "sentence1", "sentence2"),
         "{sentence1} {sentence2} Is the word \"{word}\" used with the same meaning in both "
         "sentences? Answer: {answer}", ("False", "True"), ("no", "yes"), ("accuracy",), _SUPERGLUE,
         _superglue("WiC", ("word", "sentence1", "sentence2")),
         decoder=_yes_no("Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Is the word \"{word}\" "
                         "used with the same meaning in both sentences?", ("no", "yes"))),
)}

TASK_NAMES: tuple[str, ...] = (*_REGISTRY, _GENERIC)


def get_task(name: str, generic: GenericTaskSpec | None = None, *, decoder: bool = False) -> Task:
    """Look a task up, phrased for a decoder LM when `decoder`; the generic task is built (and its
    files checked) from the spec, phrased as the user gave it."""
    if name == _GENERIC:
        if generic is None:
            raise UserError("Task 'generic' needs a spec: give the train file, dev file and text columns.")
        return _generic_task(generic)
    if name not in _REGISTRY:
        raise UserError(f"Unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}.")
    return phrased(_REGISTRY[name], decoder)


def phrased(task: Task, decoder: bool) -> Task:
    """The task with its decoder template and verbalizer in place, when asked and it has them."""
    if not decoder or task.decoder is None:
        return task
    return replace(task, template=task.decoder.template, verbalizer=task.decoder.verbalizer, decoder=None)


def task_from_record(record: dict) -> Task:
    """The task a trained prompt answers, as its task.json recorded it: the registry's entry when it
    matches (so its loaders and metrics apply), else a task built from the recorded template, fields
    and labels (a generic task, or a registry task whose definition has changed since)."""
    fields, labels = tuple(record["fields"]), tuple(record["label_names"])
    known = _REGISTRY.get(record["task"])
    for variant in (known, phrased(known, True)) if known is not None else ():
        if (variant.fields, variant.label_names, variant.template) == (fields, labels, record["template"]):
            return variant
    return Task(name=record["task"], fields=fields, template=record["template"], label_names=labels,
                verbalizer=tuple(record["verbalizer"]), metrics=known.metrics if known else ("accuracy", "macro_f1"))


def subset(items: list, limit: int, seed: int) -> list:
    """The examples a cap of `limit` selects: a seeded random subset, kept in file order (files are often sorted
    by label or source, so the first N would be a biased sample). Every command that caps a split (train's
    --max-*-examples, infer's --max-examples, reproduce) selects through this, so the same cap and seed give the
    same examples everywhere."""
    if not limit or limit >= len(items):
        return items
    import torch

    keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return [items[i] for i in keep.tolist()]


def describe_subset(limit: int, total: int, seed: int) -> str:
    """Which examples `subset` took, in words a report can print."""
    return f"all {total}" if not limit or limit >= total else f"the seeded subset of {limit} of {total} (seed {seed})"


def load_split(task: Task, split: str, data_dir: Path | None,
               generic: GenericTaskSpec | None = None) -> list[Example]:
    """Read one split. For the generic task a given spec replaces the files the task was built with."""
    task, found = _split_source(task, split, data_dir, generic)
    return _load_hub(task, split) if found is None else _load_file(task, *found)


def split_file(task: Task, split: str, data_dir: Path | None, generic: GenericTaskSpec | None = None) -> Path | None:
    """The file load_split reads for this split, or None when it comes from the Hub (what a run's
    settings record hashes, so a changed data file is noticed)."""
    _, found = _split_source(task, split, data_dir, generic)
    return None if found is None else found[1]


def _split_source(task: Task, split: str, data_dir: Path | None,
                  generic: GenericTaskSpec | None) -> tuple[Task, tuple[Source, Path] | None]:
    """The task (with a generic spec's files) and the first existing candidate file; None: the Hub."""
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if generic is not None:
        if task.name != _GENERIC:
            raise UserError(f"A generic spec was given for task {task.name!r}; it only applies to 'generic'.")
        task = replace(task, sources=_generic_sources(generic))
    if task.hub is not None:  # a built-in task: files live under data_dir, or come from the Hub
        if data_dir is None:
            return task, None
        if not Path(data_dir).is_dir():
            raise UserError(f"Data directory {data_dir} does not exist; "
                            "pass the folder that holds the task folders (SST-2, RTE, ...).")
    candidates = [(s, Path(data_dir or ".") / s.path) for s in dict(task.sources)[split]]
    for source, path in candidates:
        if path.is_file():
            return task, (source, path)
    expected = " or ".join(str(p) for _, p in candidates)
    raise UserError(f"Missing {split} data for task {task.name}: expected {expected}.")


# --- reading ------------------------------------------------------------------------------------

Row = Sequence[str] | dict[str, Any]
Table = tuple[list[str] | None, list[tuple[str, Row]]]  # (header or None for JSON, [(location, row)])


def _read_delimited(path: Path, **csv_options: Any) -> Table:
    # utf-8-sig strips the BOM that MRPC files start with and reads BOM-less files unchanged.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, **csv_options)
        header = next(reader, [])
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) < len(header):
                raise UserError(f"{path} line {reader.line_num} has {len(row)} fields but the header has "
                                f"{len(header)}; fix that row.")
            rows.append((f"line {reader.line_num}", row))
    return header, rows


def _read_jsonl(path: Path) -> Table:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            try:
                rows += [(f"line {number}", json.loads(line))] if line.strip() else []
            except ValueError as err:
                raise UserError(f"{path} line {number} is not valid JSON ({err}); fix that line.") from None
    return None, rows


def _read_json(path: Path) -> Table:
    """A list of objects, or an object mapping id -> object (the layout of the QNLI subset)."""
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    if isinstance(data, dict):
        return None, [(f"item {i} (id {key!r})", obj) for i, (key, obj) in enumerate(data.items(), 1)]
    if isinstance(data, list):
        return None, [(f"item {i}", obj) for i, obj in enumerate(data, 1)]
    raise UserError(f"{path} must hold a JSON list of objects or an object mapping ids to objects.")


# Our own readers, not `datasets.load_dataset("csv"/"json", ...)`: on the real files of ../shared/data (datasets
# 5.2, 2026-12-07) it refuses RTE/train.tsv (pandas: "Expected 4 fields in line 2166, saw 5", the extra empty
# field GLUE rows carry) and reads QNLI/train_subset/*.json (an object mapping ids to examples) as one row. It
# reads SST-2, RTE/dev and QNLI/dev TSVs and the SuperGLUE JSON Lines the same as these (labels as ints). These
# readers also keep each row's line for errors and write no cache per rank.
_READERS: dict[str, Callable[[Path], Table]] = {
    ".tsv": lambda p: _read_delimited(p, delimiter="\t", quoting=csv.QUOTE_NONE),
    ".csv": lambda p: _read_delimited(p),
    ".jsonl": _read_jsonl,
    ".json": _read_json,
}


def _records(path: Path, keys: tuple[Key, ...]) -> list[tuple[str, tuple[Any, ...]]]:
    """(location, values of `keys`) for every row: the only place that knows about file formats."""
    try:
        header, rows = _READERS[path.suffix.lower()](path)
    except (ValueError, csv.Error) as err:  # bad encoding, broken JSON, oversized CSV field
        raise UserError(f"{path} could not be read ({err}); fix the file or save it as UTF-8.") from None
    if header is not None:
        missing = [k for k in keys if isinstance(k, str) and k not in header]
        if missing:
            raise UserError(f"{path} has no column {missing[0]!r}; its header is {', '.join(header)}.")
        keys = tuple(header.index(k) if isinstance(k, str) else k for k in keys)
    out = []
    for where, row in rows:
        try:
            out.append((where, tuple(row[k] for k in keys)))  # type: ignore[index]
        except KeyError as err:
            raise UserError(f"{path} {where} has no column {err.args[0]!r}; every row needs it.") from None
        except TypeError:  # a JSON row that is not an object
            raise UserError(f"{path} {where} is not a JSON object with named columns; fix that row.") from None
    if not out:
        raise UserError(f"{path} has no examples; an empty split cannot be used.")
    return out


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _load_file(task: Task, source: Source, path: Path) -> list[Example]:
    raw_labels = task.raw_labels or task.label_names
    lookup = {_text(v).lower(): i for i, v in enumerate(raw_labels)}
    examples = []
    for where, (*texts, raw) in _records(path, (*source.columns, source.label)):
        label = lookup.get(_text(raw).lower())
        if label is None:
            raise UserError(f"{path} {where} has label {raw!r}, which is not one of {', '.join(raw_labels)}; "
                            "fix the label or the label names.")
        examples.append(Example(tuple(map(_text, texts)), label))
    return examples


def _load_hub(task: Task, split: str) -> list[Example]:
    import datasets  # slow to import, and only this path needs it

    path, config = task.hub, task.name
    try:
        rows = datasets.load_dataset(path, config, split=_HUB_SPLIT[split])
    except OSError as err:  # offline (ConnectionError) or not found (DatasetNotFoundError)
        raise UserError(f"Could not load {path}/{config} from the Hugging Face Hub ({err}); "
                        "pass a data directory instead.") from None
    examples = []
    for i, row in enumerate(rows):
        label = int(row["label"])
        if not 0 <= label < len(task.label_names):  # e.g. -1 on unlabeled test splits
            raise UserError(f"Hub dataset {path}/{config} {split} row {i} has label {label}, "
                            f"outside 0..{len(task.label_names) - 1}.")
        examples.append(Example(tuple(_text(row[f]) for f in task.fields), label))
    if not examples:
        raise UserError(f"Hub dataset {path}/{config} has an empty {split} split.")
    return examples


# --- the generic task ---------------------------------------------------------------------------


def _generic_sources(spec: GenericTaskSpec) -> Sources:
    if not spec.text_columns:
        raise UserError("The generic task needs at least one text column.")
    out = []
    for split, file in zip(SPLITS, (spec.train_file, spec.dev_file)):
        path = Path(file).expanduser().resolve()  # absolute, so data_dir never applies
        if path.suffix.lower() not in _READERS:
            raise UserError(f"{path} has an unknown format; use a .tsv, .csv, .jsonl or .json file.")
        if not path.is_file():
            raise UserError(f"The generic {split} file {path} does not exist.")
        out.append((split, (Source(path, tuple(spec.text_columns), spec.label_column),)))
    return tuple(out)


def _generic_task(spec: GenericTaskSpec) -> Task:
    sources = _generic_sources(spec)
    names = tuple(spec.label_names or ())
    if not names:  # sorted distinct train labels, as the same strings _load_file compares
        train = dict(sources)["train"][0]
        names = tuple(sorted({_text(raw) for _, (raw,) in _records(train.path, (train.label,))}))
    fields = tuple(spec.text_columns)
    task = Task(
        name=_GENERIC, fields=fields,
        template=spec.template or " ".join(f"{c}: {{{c}}}" for c in fields) + " Answer: {answer}",
        label_names=names, verbalizer=tuple(spec.verbalizer or (n.lower() for n in names)),
        metrics=("accuracy", "macro_f1"), sources=sources,
    )
    check_task_parts(task.fields, task.template, task.label_names, task.verbalizer)
    return task


def check_task_parts(fields: Sequence[str], template: str | None = None, label_names: Sequence[Any] | None = None,
                     verbalizer: Sequence[str] | None = None) -> None:
    """Reject a template, labels or verbalizer other modules could not rely on. A part given as None is not
    checked: Config checks what the flags give before any work starts, the loader the whole task once the
    label names are read from the data."""
    for f in fields:
        try:
            ok = f != "answer" and ("{" + f + "}").format_map({f: "x"}) == "x"
        except (KeyError, IndexError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise UserError(f"Column {f!r} cannot be a template placeholder; rename it (letters, digits, _).")
    if template is not None:
        try:
            used = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError:
            used = []
        if sorted(used) != sorted((*fields, "answer")) or used[-1] != "answer":
            wanted = ", ".join("{" + f + "}" for f in fields)
            raise UserError(f"Template {template!r} must use {wanted} once each, with {{answer}} after them "
                            "(text may follow it).")
    if label_names is not None:
        keys = [_text(n).lower() for n in label_names]
        if len(keys) < 2 or "" in keys or len(set(keys)) != len(keys):
            raise UserError(f"Label names {list(label_names)} must be at least two distinct non-empty "
                            "values (compared case-insensitively).")
        if verbalizer is not None and len(verbalizer) != len(keys):
            raise UserError(f"The verbalizer has {len(verbalizer)} words for {len(keys)} labels; give one per label.")
    if verbalizer is not None and (any(w.split() != [w] or w != w.lower() for w in verbalizer)
                                   or len(set(verbalizer)) != len(verbalizer)):
        raise UserError(f"Verbalizer {list(verbalizer)} must be distinct single lowercase words.")


# --- metrics ------------------------------------------------------------------------------------


def _f1(predictions: Sequence[int], labels: Sequence[int], cls: int) -> float:
    tp = sum(p == cls and y == cls for p, y in zip(predictions, labels))
    wrong = sum((p == cls) != (y == cls) for p, y in zip(predictions, labels))  # fp + fn
    return 2 * tp / (2 * tp + wrong) if tp else 0.0


def _macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    # Averages over the classes that occur, like sklearn's default and the SuperGLUE CB scorer.
    classes = sorted(set(predictions) | set(labels))
    return sum(_f1(predictions, labels, c) for c in classes) / len(classes)


_METRICS: dict[str, Callable[[Sequence[int], Sequence[int]], float]] = {
    "accuracy": lambda p, y: sum(a == b for a, b in zip(p, y)) / len(y),
    "f1": lambda p, y: _f1(p, y, 1),  # binary: label 1 is the positive class (mrpc "equivalent")
    "macro_f1": _macro_f1,
}


def compute_metrics(task: Task, predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """The task's metrics as floats in [0, 1]."""
    preds, gold = [int(p) for p in predictions], [int(y) for y in labels]
    if not gold or len(preds) != len(gold):
        raise UserError(f"Metrics need equally many predictions and labels, at least one "
                        f"(got {len(preds)} and {len(gold)}).")
    return {name: float(_METRICS[name](preds, gold)) for name in task.metrics}
