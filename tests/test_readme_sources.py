"""Every guide table rendered from a JSON names its source under it: the commit, date, machine and
command from the record's provenance, or, for a table not re-measured since, that it was made before
provenance was recorded."""

from __future__ import annotations

import pytest

from skeleton_ds.provenance import source_line
from test_readme_tables import GUIDE, TABLES, _record, guide_text


@pytest.mark.parametrize("name", sorted(TABLES))
def test_guide_table_names_its_source(name):
    line = source_line(_record(name), f"docs/results/{name}.json")
    assert line in guide_text(name).splitlines(), f"docs/{GUIDE[name]} lacks the source line of {name}.json: {line}"


def test_source_line_names_the_commit_or_says_it_is_unknown():
    recorded = {"provenance": {"code_version": "abc1234", "date": "2026-12-01T10:00:00Z",
                               "command": "skeleton-ds bench",
                               "device": {"cpu": "Xeon", "cpu_cores": 2, "load_average_1min": 0.1}}}
    assert source_line(recorded, "docs/x.json") == ("Source: `docs/x.json`, made by commit `abc1234` on 2026-12-01 "
                                                    "(Xeon, 2 cores, load 0.1): `skeleton-ds bench`.")
    assert "before provenance was recorded" in source_line({"date": "2026-11-26"}, "docs/y.json")
