"""`skeleton-ds reproduce` end to end on the real MiniLM and the real CB files, in its quick mode (tiny
subsets, one seed, one ratio): every variant is built, re-tuned and tabulated, a second run reuses the
finished runs instead of redoing them, and a run whose plan changed since is refused, naming the change."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess

import pytest

from conftest import REPO, SHARED_DATA
from skeleton_ds.cli import reproduce, run_command
from skeleton_ds.config import as_flags, config_from_args
from skeleton_ds.tasks import get_task, load_split
from skeleton_ds.provenance import missing_fields
from skeleton_ds.experiments.reproduce import (ENCODER, PLANS, QUICK, ReproduceConfig, markdown, readme_table,
                                               stage_config, task_fields)


@pytest.mark.realdata
def test_reproduce_quick_builds_every_variant(tmp_path, capsys, monkeypatch):
    out = tmp_path / "reproduce"
    argv = ["--data-dir", str(SHARED_DATA), "--tasks", "cb", "--seeds", "1", "--ffn-keeps", "0.5", "--quick",
            "--no-docs", "--output", str(out)]
    assert run_command(reproduce, argv) == 0
    record = json.loads((out / "reproduce.json").read_text())
    assert record["command"].startswith("skeleton-ds reproduce --data-dir") and record["quick"] is True
    table = record["table"]
    assert [r["variant"] for r in table] == list(ENCODER.variants)
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

    # Only the runs' light files travel to another machine (launch/table_state.sh), no compact model and no
    # checkpoint; the table resumes from them and redoes nothing.
    retuned = {p.relative_to(out): p.read_text() for p in out.rglob("retune/metrics.json")}
    archive = tmp_path / "state" / "table.tar.gz"
    subprocess.run(["bash", str(REPO / "launch" / "table_state.sh"), "save", str(out), str(archive)], check=True)
    shutil.rmtree(out)
    subprocess.run(["bash", str(REPO / "launch" / "table_state.sh"), "load", str(archive), str(out)], check=True)
    assert not list(out.rglob("compact")) and list(out.rglob("prompt.safetensors"))
    assert run_command(reproduce, argv) == 0
    assert {p.relative_to(out): p.read_text() for p in out.rglob("retune/metrics.json")} == retuned
    assert not list(out.rglob("compact"))  # no stage ran
    assert json.loads((out / "reproduce.json").read_text())["table"] == table
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("retune/metrics.json")}

    # The plan changed since the runs were made: the finished runs are not read back as if they were new.
    monkeypatch.setitem(QUICK, "train", 48)
    capsys.readouterr()
    assert run_command(reproduce, argv) == 2
    err = capsys.readouterr().err
    assert "prompt: max_train_examples 64 -> 48" in err and str(out / "cb" / "seed0" / "full") in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("retune/metrics.json")} == finished


@pytest.mark.realdata
def test_a_stop_signal_to_the_table_checkpoints_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    """What a batch scheduler sends (SIGTERM) reaches the table between two pipeline runs: the table stops
    with the preemption exit code, keeps what finished, and the same command completes it."""
    from skeleton_ds import preemption
    from skeleton_ds.experiments import reproduce as module

    out = tmp_path / "reproduce"
    argv = ["--data-dir", str(SHARED_DATA), "--tasks", "cb", "--seeds", "1", "--ffn-keeps", "0.5", "--variants",
            "attribution", "--quick", "--no-docs", "--output", str(out)]
    real_stage, calls = module._stage, []

    def stage_then_signal(stage_argv):
        real_stage(stage_argv)
        calls.append(stage_argv)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the command, or it ends this test process

    monkeypatch.setattr(module, "_stage", stage_then_signal)
    try:
        assert run_command(reproduce, argv) == preemption.PREEMPTED_EXIT_CODE
    finally:
        preemption.reset()
    assert "preempted: stopped on SIGTERM" in capsys.readouterr().err
    assert (out / "cb" / "seed0" / "full" / "prompt" / "metrics.json").is_file()
    assert not (out / "reproduce.json").exists()
    full = (out / "cb" / "seed0" / "full" / "prompt" / "prompt.safetensors").stat().st_mtime_ns
    assert run_command(reproduce, argv) == 0
    assert (out / "cb" / "seed0" / "full" / "prompt" / "prompt.safetensors").stat().st_mtime_ns == full  # reused
    assert [r["variant"] for r in json.loads((out / "reproduce.json").read_text())["table"]] == ["attribution"]



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
@pytest.mark.parametrize(("kind", "task"), [(kind, task) for kind, plan in PLANS.items() for task in plan.tasks])
def test_every_planned_skeleton_is_a_valid_config_that_its_recorded_flags_give(kind, task, tmp_path):
    """Each task's and variant's plan passes the pipeline's own validation (a bad template or field would stop
    the table hours in), and the flags the table records for a variant give the same Config as the plan."""
    cfg = ReproduceConfig(data_dir=SHARED_DATA, output=tmp_path, kind=kind)
    config = stage_config(task, 0, cfg, tmp_path / "run")
    assert config.resume is True and config.max_train_examples == PLANS[kind].tasks[task]["train"]
    spec = get_task(config.task, config.generic_spec())  # checks the template against the fields
    assert load_split(spec, "dev", config.data_dir)
    for keep, head, name in cfg.skeletons(task):
        variant = PLANS[kind].variants[name]
        planned = dataclasses.replace(config, ffn_keep=keep, head_keep=head, **variant.fields())
        assert (planned.scorer, planned.compensate, planned.ffn_keep) == (variant.scorer, variant.compensate, keep)
        fields = {"model": cfg.model, "ds_config": cfg.config, "seed": 0, "epochs": planned.epochs,
                  "max_train_examples": planned.max_train_examples, "max_eval_examples": planned.max_eval_examples,
                  "attr_examples": planned.attr_examples, "retune_epochs": planned.retune_epochs,
                  "output": planned.output, "resume": True, "ffn_keep": keep, "head_keep": head,
                  **task_fields(task, cfg.data_dir), **variant.fields()}
        assert config_from_args(as_flags(fields)) == planned


def test_decoder_plan_runs_its_controls_and_head_row_and_tables_them(tmp_path):
    """The decoder plan: the method at every keep, the controls at 0.3 and 0.2, the labels-only ablation and the
    head-pruned row on SST-2; the tables show the zero-shot floor, the head row and its own speed-up."""
    cfg = ReproduceConfig(data_dir=SHARED_DATA, output=tmp_path, model="smollm2-135m", kind="decoder")
    runs = cfg.skeletons("sst2")
    assert {k for k, _, v in runs if v == "attribution"} == {0.2, 0.3, 0.5}
    assert {k for k, _, v in runs if v == "random"} == {k for k, _, v in runs if v == "weight-magnitude"} == {0.2, 0.3}
    assert [(k, h, v) for k, h, v in runs if h != 1.0] == [(0.3, 0.67, "attribution")]
    assert (0.3, 1.0, "attribution-labels") in runs and (0.3, 1.0, "attribution-retune3") in runs
    assert len(runs) == len(set(runs)) == 3 + 2 * 2 + 1 + 1 + 1
    # CB (three seeds): the method and its controls only; the ablation and the head row are SST-2's
    cb = cfg.skeletons("cb")
    assert len(cb) == 3 + 2 * 2 and {v for _, _, v in cb} == {"attribution", "random", "weight-magnitude"}
    assert ReproduceConfig(data_dir=SHARED_DATA, kind="decoder", variants=("random",)).skeletons("sst2") == [
        (0.2, 1.0, "random"), (0.3, 1.0, "random")]
    # every variant re-tunes distilled (the decoder default) but the ablation, which turns it off
    assert "distill_kl" not in PLANS["decoder"].variants["random"].fields()
    assert PLANS["decoder"].variants["attribution-labels"].flags()[-4:] == ["--distill-kl", "0.0", "--distill-hidden",
                                                                            "0.0"]
    assert PLANS["decoder"].variants["attribution-retune3"].flags()[-2:] == ["--retune-epochs", "3.0"]
    rows = [dict(task="sst2", seed=s, ffn_keep=k, head_keep=h, variant=v, full=0.8 + s / 100, before=0.5, after=0.7,
                 zero_shot=0.4, parameters_full=134_500_000, parameters_compact=90_000_000, train_examples=2000,
                 dev_examples=872, majority=0.5) for s in range(3) for k, h, v in runs]
    from skeleton_ds.experiments.reproduce import aggregate

    variants = list(cfg.variants)
    record = {"model": cfg.model, "date": "2026-12-02", "seconds": 60.0, "command": "c",
              "plan": {"sst2": cfg.plan("sst2")},
              "task_order": list(PLANS["decoder"].tasks), "variants": variants, "note": PLANS["decoder"].note,
              "table": aggregate(rows, PLANS["decoder"].tasks, variants), "speedups": {"0.3": 1.5, "0.3/0.67": 1.7}}
    assert [r["head_keep"] for r in record["table"]][-1:] == [0.67]
    assert record["table"][0]["full_std"] == pytest.approx(0.01)
    table = readme_table(record)
    assert "| zero-shot |" in table and "| 0.400 |" in table and "0.3, heads 0.67" in table and "1.70x" in table
    assert table.count("\n") == 2 + 4  # header, rule, one row per (keep, head keep)
    text = markdown(record)
    assert text.count("| 0.3, heads 0.67 |") == 1 and "--distill-kl 1 --distill-hidden 1" in text
    assert "cb 3 seed(s), all training examples, all scored, 4 epoch(s) (2 re-tuning)" in markdown(
        record | {"plan": {"sst2": cfg.plan("sst2"), "cb": cfg.plan("cb")}})


def test_reproduce_refuses_an_unknown_variant(tmp_path, capsys):
    assert run_command(reproduce, ["--data-dir", str(tmp_path), "--output", str(tmp_path / "out"),
                                   "--variants", "attribution,activation-magnitude"]) == 2
    assert "--variants takes a comma list of attribution, attribution+comp, random" in capsys.readouterr().err


@pytest.mark.parametrize(("model", "kind"), [("minilm", "encoder"), ("smollm2-135m", "decoder")])
def test_speedups_ask_the_benchmark_for_the_plans_skeletons(model, kind, tmp_path, monkeypatch):
    """The benchmark call at the end of a table (hours in) is built from the plan; its rows come back keyed as
    the table looks them up: a head-pruned row by the plan's head keep, whatever share it kept (global
    allocation kept 0.7 of the KV groups for a planned 0.67)."""
    import skeleton_ds.bench as bench
    from skeleton_ds.experiments.reproduce import speedups

    asked = []

    def fake_run_bench(config):
        asked.append(config)
        return {"rows": [{"contender": "compact-0.3", "ffn_keep": 0.3, "head_keep": 1.0, "quant": "none",
                          "speedup_vs_full": 1.8, "lengths": "fixed"},
                         {"contender": "compact-0.3-h0.7", "ffn_keep": 0.3, "head_keep": 0.7, "quant": "none",
                          "speedup_vs_full": 2.2, "lengths": "fixed"}]}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    prompt = tmp_path / "sst2" / "seed0" / "full" / "prompt"  # the run the decoder's benchmark reads
    prompt.mkdir(parents=True)
    (prompt / "prompt.safetensors").write_bytes(b"")
    cfg = ReproduceConfig(data_dir=SHARED_DATA, output=tmp_path, model=model, kind=kind, docs=None)
    planned = "0.3/0.67" if kind == "decoder" else "0.3/0.75"  # MiniLM plans no head row; bench's default
    assert speedups(cfg, tmp_path) == {"0.3": 1.8, planned: 2.2}
    config = asked[0]
    assert config.output == tmp_path / "bench" and config.batch_sizes == (32,) and 1.0 in config.ffn_keeps
    if kind == "decoder":
        assert (config.keep_mode, config.protect_outliers, config.head_keep) == ("global", 20.0, 0.67)
        assert config.run_dir == tmp_path / "sst2" / "seed0" / "full"


def test_size_plan_is_asked_for_by_name_has_its_own_tables_and_runs_only_on_decoders(tmp_path, capsys):
    """`--plan size` (the decoder-size comparison): the method at FFN keep 0.5 and 0.3 and the random control at
    0.3, re-tuned distilled as the decoder default does, on its own seeded 400 dev examples; tables of their own
    (a decoder's full table keeps its name); refused, before anything is written, on an encoder."""
    cfg = ReproduceConfig(data_dir=SHARED_DATA, output=tmp_path, model="smollm2-135m", kind="size")
    assert cfg.decoder and cfg.tasks == ("sst2",)
    assert cfg.skeletons("sst2") == [(0.3, 1.0, "attribution"), (0.3, 1.0, "random"), (0.5, 1.0, "attribution")]
    assert cfg.plan("sst2") == dict(seeds=1, train=500, attr=200, dev=400, epochs=2.0, retune_epochs=2.0)
    assert cfg.docs_stem == "reproduce_smollm2-135m_size"
    assert ReproduceConfig(data_dir=SHARED_DATA, model="smollm2-135m", kind="decoder").docs_stem == \
        "reproduce_smollm2-135m"
    assert ReproduceConfig(data_dir=SHARED_DATA, kind="encoder").docs_stem == "reproduce"
    out = tmp_path / "out"
    assert run_command(reproduce, ["--data-dir", str(SHARED_DATA), "--output", str(out), "--plan", "size"]) == 2
    assert "--plan size is for decoder models and --model minilm is an encoder" in capsys.readouterr().err
    assert not out.exists()
