"""Every measured table in the README is the one a script wrote next to its JSON: regenerate each
table from its JSON and find it, line for line, in the README."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_lines(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def _bench(stem: str) -> str:
    from skeleton_ds.bench import markdown_table

    return markdown_table(json.loads((REPO / "docs" / f"{stem}.json").read_text()))


def _compensation() -> str:
    return _script("study_compensation").markdown(json.loads((REPO / "docs" / "study_compensation.json").read_text()))


TABLES = {
    "bench_llama3-8b_h100": lambda: _bench("bench_llama3-8b_h100"),
    "study_compensation": _compensation,
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_readme_table_matches_its_json(name):
    generated = TABLES[name]()
    assert (REPO / "docs" / f"{name}.md").read_text() == generated, f"docs/{name}.md differs from its JSON"
    missing = [line for line in _table_lines(generated) if line not in README.splitlines()]
    assert not missing, f"README lacks these rows of docs/{name}.md: {missing[:3]}"
