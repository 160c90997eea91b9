"""`skeleton-ds reproduce` end to end on the real MiniLM and the real CB files, in its quick mode (tiny
subsets, one seed, one ratio): every variant is built, re-tuned and tabulated, a second run reuses the
finished runs instead of redoing them, and a run whose plan changed since is refused, naming the change."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA
from skeleton_ds.cli import reproduce, run_command
from skeleton_ds.config import config_from_args
from skeleton_ds.stages.common import generic_spec
from skeleton_ds.tasks import get_task, load_split
from skeleton_ds.provenance import missing_fields
from skeleton_ds.stages.reproduce import PLAN, QUICK, VARIANTS, ReproduceConfig, markdown, stage_flags


@pytest.mark.realdata
def test_reproduce_quick_builds_every_variant(tmp_path, capsys, monkeypatch):
    out = tmp_path / "reproduce"
    argv = ["--data-dir", str(SHARED_DATA), "--tasks", "cb", "--seeds", "1", "--ffn-keeps", "0.5", "--quick",
            "--no-docs", "--output", str(out)]
    assert run_command(reproduce, argv) == 0
    record = json.loads((out / "reproduce.json").read_text())
    assert record["command"].startswith("skeleton-ds reproduce --data-dir") and record["quick"] is True
    table = record["table"]
    assert [r["variant"] for r in table] == list(VARIANTS)
    for row in table:
        assert row["task"] == "cb" and row["ffn_keep"] == 0.5 and row["seeds"] == 1
        assert all(0 <= row[k] <= 1 for k in ("full_mean", "before_mean", "after_mean", "majority"))
        assert row["parameters_compact"] < row["parameters_full"]
    comp = json.loads((out / "cb" / "seed0" / "keep0.5-attribution+comp" / "compact" / "config.json").read_text())
    assert comp["skeleton_ds"]["compensate"] == "mean"
    text = markdown(record)
    assert text.count("| cb (") == 4 and ("(learned)" in text or "(not learned)" in text)

    finished = {p: p.stat().st_mtime_ns for p in out.rglob("retune/metrics.json")}
    assert run_command(reproduce, argv) == 0  # resumes: every run is complete, nothing is redone
    assert {p: p.stat().st_mtime_ns for p in out.rglob("retune/metrics.json")} == finished
    assert json.loads((out / "reproduce.json").read_text())["table"] == table
    assert missing_fields(record) == []

    # The plan changed since the runs were made: the finished runs are not read back as if they were new.
    monkeypatch.setitem(QUICK, "train", 48)
    capsys.readouterr()
    assert run_command(reproduce, argv) == 2
    err = capsys.readouterr().err
    assert "prompt: max_train_examples 64 -> 48" in err and str(out / "cb" / "seed0" / "full") in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("retune/metrics.json")} == finished


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "mnli"], "--tasks takes a comma list of"),
    (["--ffn-keeps", "0.3,1.5"], "--ffn-keeps takes ratios in (0, 1)"),
    (["--seeds", "-1"], "--seeds must be >= 0"),
])
def test_reproduce_refuses_bad_flags(tmp_path, capsys, flags, message):
    assert run_command(reproduce, ["--data-dir", str(tmp_path), "--output", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reproduce_refuses_a_missing_data_dir(tmp_path, capsys):
    assert run_command(reproduce, ["--data-dir", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.realdata
@pytest.mark.parametrize("task", sorted(PLAN))
def test_every_planned_task_gives_a_valid_stage_command(task, tmp_path):
    """Each task's flags pass the pipeline's own validation (a bad template would stop the table hours in)."""
    cfg = ReproduceConfig(data_dir=SHARED_DATA, output=tmp_path)
    config = config_from_args(stage_flags(task, 0, cfg) + ["--output", str(tmp_path / "run")])
    assert config.resume is True and config.max_train_examples == PLAN[task]["train"]
    spec = get_task(config.task, generic_spec(config))  # checks the template against the fields
    assert load_split(spec, "dev", config.data_dir)
