"""launch/reproduce.py end to end on the real MiniLM and the real CB files, in its quick mode (tiny
subsets, one seed, one ratio): every variant is built, re-tuned and tabulated."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.realdata


def test_reproduce_quick_builds_every_variant(tmp_path):
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "launch" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    out = tmp_path / "reproduce"
    assert reproduce.main(["--data-dir", str(SHARED_DATA), "--tasks", "cb", "--seeds", "1", "--ffn-keeps", "0.5",
                           "--quick", "--no-docs", "--output", str(out)]) == 0
    record = json.loads((out / "reproduce.json").read_text())
    table = record["table"]
    assert sorted(r["variant"] for r in table) == sorted(reproduce.VARIANTS)
    for row in table:
        assert row["task"] == "cb" and row["ffn_keep"] == 0.5 and row["seeds"] == 1
        assert all(0 <= row[k] <= 1 for k in ("full_mean", "before_mean", "after_mean", "majority"))
        assert row["parameters_compact"] < row["parameters_full"]
    comp = json.loads((out / "cb" / "seed0" / "keep0.5-attribution+comp" / "compact" / "config.json").read_text())
    assert comp["skeleton_ds"]["compensate"] == "mean"
    text = reproduce.markdown(record)
    assert text.count("| cb (") == 4 and ("(learned)" in text or "(not learned)" in text)
