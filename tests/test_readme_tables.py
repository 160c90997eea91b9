"""Every measured table in the guides and the README is one a script wrote from its JSON: regenerate each
docs/results/NAME.md from docs/results/NAME.json and find its table, line for line, in the guide that shows
it; the README's headline tables are rows picked from the same JSONs (skeleton_ds/experiments/headlines.py)."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()
RESULTS = REPO / "docs" / "results"


def _script(name: str):
    return importlib.import_module(f"skeleton_ds.experiments.{name}")


def _record(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _bench(record: dict) -> tuple[str, str]:
    from skeleton_ds.bench import markdown_table

    return markdown_table(record), markdown_table(record)


def _profile(record: dict) -> tuple[str, str]:
    """bench.md with its profile table; the README shows the profile table alone."""
    from skeleton_ds.bench import markdown_table

    document = markdown_table(record)
    return document, document.split("\n\n", 1)[1]


def _same(render):
    return lambda record: (render(record), render(record))


def _scale_run(record: dict) -> tuple[str, str]:
    module = _script("scale_run")
    return module.markdown(record), "\n".join(module.guide_table(record))


def _reproduce(record: dict) -> tuple[str, str]:
    from skeleton_ds.experiments import reproduce

    return reproduce.markdown(record), reproduce.readme_table(record)


# docs/results/NAME.json -> (docs/results/NAME.md as its script renders it, the guide's table from the same record)
TABLES = {
    "bench_llama3-8b_h100": _bench,
    "bench_llama-160m_cpu": _bench,
    "bench_tinyllama-1.1b_cpu": _bench,
    "bench_minilm_cpu": _bench,
    "bench_smollm2-135m_cpu": _bench,
    "bench_qwen2.5-1.5b_cpu": _bench,
    "bench_llama-160m_profile": _profile,
    "bench_static_cpu": _bench,
    "study_compensation": _same(lambda r: _script("study_compensation").markdown(r)),
    "study_localization": _same(lambda r: _script("study_localization").markdown(r)),
    "study_decoder": _same(lambda r: _script("study_decoder").markdown(r)),
    "study_retune": _same(lambda r: _script("study_retune").markdown(r)),
    "study_layers": _same(lambda r: _script("study_layers").markdown(r)),
    "study_keep": _same(lambda r: _script("study_keep").markdown(r)),
    "scale_run": _scale_run,
    "scale_run_qwen2.5-1.5b": _scale_run,
    "reproduce": _reproduce,
    "reproduce_smollm2-135m": _reproduce,
    "reproduce_smollm2-135m_size": _reproduce,
    "reproduce_qwen2.5-1.5b_size": _reproduce,
    "scale_run_qwen2.5-1.5b_sst2": _scale_run,
    "load_test_minilm64": _same(lambda r: _script("load_test").markdown(r)),
    "load_test_minilm16": _same(lambda r: _script("load_test").markdown(r)),
    "load_test_smollm2": _same(lambda r: _script("load_test").markdown(r)),
    "soak_minilm64": _same(lambda r: _script("soak_test").markdown(r)),
    "profile_mixed_minilm64": _same(lambda r: _script("profile_mixed").markdown(r)),
    "profile_server": _same(lambda r: _script("profile_server").markdown(r)),
    "measured": _same(lambda r: _script("measured").markdown(r)),
}
GUIDE = {name: "benchmark.md" for name in TABLES if name.startswith("bench_")} | {"bench_static_cpu": "inference.md"}
GUIDE |= {name: "results.md" for name in TABLES if name.startswith(("study_", "reproduce", "measured"))}
GUIDE |= {name: "serving.md" for name in TABLES if name.startswith(("load_test_", "soak_", "profile_"))}
GUIDE |= {name: "cluster.md" for name in TABLES if name.startswith("scale_run")}


def guide_text(name: str) -> str:
    return (REPO / "docs" / GUIDE[name]).read_text()


def _table_lines(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_guide_table_matches_its_json(name):
    document, guide_table = TABLES[name](_record(name))
    assert (RESULTS / f"{name}.md").read_text() == document, f"docs/results/{name}.md differs from its JSON"
    lines = _table_lines(guide_table)
    assert lines, f"no table rendered from docs/results/{name}.json"
    missing = [line for line in lines if line not in guide_text(name).splitlines()]
    assert not missing, f"docs/{GUIDE[name]} lacks these rows rendered from docs/results/{name}.json: {missing[:3]}"


def test_every_result_json_has_its_table_checked():
    """A result JSON added without a renderer here would go unchecked."""
    unchecked = {p.stem for p in RESULTS.glob("*.json")} - set(TABLES) - {"scale_run_before"}
    assert not unchecked, f"add these to TABLES: {sorted(unchecked)}"


def test_readme_headline_tables_are_rows_of_the_results():
    """The README's results and speed tables are picked from the JSONs, with every source named under them."""
    headlines = _script("headlines")
    assert headlines.missing_from(README) == [], "README headline tables are stale: run experiments.headlines"
    for name in ("reproduce_smollm2-135m", "reproduce", "bench_llama-160m_cpu", "bench_llama3-8b_h100"):
        assert f"`docs/results/{name}.json`" in README


REMEASURED = [name for name in ("bench_llama-160m_cpu", "bench_tinyllama-1.1b_cpu", "bench_minilm_cpu")
              if _record(name)["format"] == "skeleton_ds.bench/2" and "note" not in _record(name)]
"""The CPU tables measured with the current benchmark (a converted table carries a note saying it was not)."""


@pytest.mark.parametrize("name", REMEASURED)
def test_bench_tables_record_provenance_peaks_and_the_fair_peft(name):
    """The CPU tables were measured with the fair PEFT contender, the roofline and a provenance record."""
    from skeleton_ds.provenance import missing_fields

    record = _record(name)
    assert missing_fields(record) == [], name
    assert record["peaks"]["matmul_tflop_per_s"] > 0 and record["peaks"]["copy_gb_per_s"] > 0
    assert any(r["contender"] == "peft" for r in record["rows"])
    assert all(r["of_roofline"] is not None for r in record["rows"] if r["quant"] == "none")


def test_measured_table_keeps_what_the_tests_measured(tmp_path):
    """experiments.measured runs a row's test with the `measured` fixture on, and a summary row reads its table."""
    import shutil
    import subprocess

    shutil.copy(RESULTS / "bench_llama-160m_cpu.json", tmp_path)
    run = subprocess.run([sys.executable, "-m", "skeleton_ds.experiments.measured", "--rows", "streaming,bench_cpu",
                          "--docs",
                          str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    record = json.loads((tmp_path / "measured.json").read_text())
    rows = {r["key"]: r["figures"] for r in record["rows"]}
    assert rows.keys() == {"streaming", "bench_cpu"}
    assert rows["streaming"]["passed"] == 1 and 0 < rows["streaming"]["rss_growth_mib"] < rows["streaming"]["bound_mib"]
    bench = next(r for r in _record("bench_llama-160m_cpu")["rows"]
                 if r["contender"] == "compact-0.3" and r["batch"] == 32)
    assert rows["bench_cpu"]["speedup_vs_peft"] == bench[f"speedup_vs_{rows['bench_cpu']['peft']}"]
    assert (tmp_path / "measured.md").read_text() == _script("measured").markdown(record)

    refused = subprocess.run([sys.executable, "-m", "skeleton_ds.experiments.measured", "--rows", "nope", "--docs",
                              str(tmp_path)],
                             cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "choose from" in refused.stderr


def test_one_markdown_table_helper_writes_header_rule_and_rows():
    from skeleton_ds.tables import markdown_table

    assert markdown_table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |"]
    assert markdown_table(["", ""]) == ["| | |", "|---|---|"]  # an empty cell stays one space wide
