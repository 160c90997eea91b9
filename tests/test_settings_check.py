"""A run does what its flags say or refuses: a finished stage made with other settings is never reused.

One finished run (tiny LLaMA-GQA, all five stages) is re-run with changed flags: each change is refused
before any work with one error naming the setting, its old and new value and the fix; with --overwrite
the changed stage and every stage made from it are redone (the others are reused), and the new
settings show in the outputs. verify names a compact model built from another skeleton.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import DS_CONFIGS, generic_flags
from skeleton_ds import lineage
from skeleton_ds.config import STAGES
from skeleton_ds.cli import run_command, train
from skeleton_ds.cli import verify as verify_command
from skeleton_ds.provenance import missing_fields


def _argv(model, files, out, *extra):
    return ["--model", str(model), "--config", str(DS_CONFIGS / "zero2.json"), "--output", str(out),
            "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--lr", "0.1", "--seed", "3",
            "--max-steps", "3", "--align", "8", "--ffn-keep", "0.5", *generic_flags(files), *extra]


def _mtimes(out) -> dict[str, int]:
    names = ("prompt/prompt.safetensors", "attribution.safetensors", "skeleton.json", "compact/manifest.json",
             "teacher.safetensors", "retune/prompt.safetensors")
    return {name: (out / name).stat().st_mtime_ns for name in names}


@pytest.fixture(scope="module")
def finished(tiny_models, sentiment_files, tmp_path_factory):
    """A finished run, copied fresh for each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, out)) == 0
    return out


@pytest.fixture
def run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


@pytest.mark.parametrize(("flags", "needles"), [
    (["--ffn-keep", "0.25"], ["localize: ffn_keep 0.5 -> 0.25"]),
    (["--scorer", "random"], ["attribute: scorer attribution -> random"]),
    (["--lr", "0.05", "--stages", "retune"], ["retune: lr 0.1 -> 0.05"]),
    (["--lr", "0.05"], ["prompt: lr 0.1 -> 0.05", "retune: lr 0.1 -> 0.05"]),
    (["--compensate", "mean", "--head-keep", "0.5"],
     ["localize: head_keep 1.0 -> 0.5", "convert: compensate none -> mean"]),
    (["--retune-lr", "0.05"], ["retune: lr 0.1 -> 0.05"]),  # re-tuning's own budget: stage 1 unchanged
    (["--keep-mode", "uniform"], ["localize: keep_mode global -> uniform"]),  # the decoder default, as recorded
    (["--protect-outliers", "0"], ["localize: protect_outliers 20.0 -> 0.0"]),
])
def test_changed_settings_are_refused_before_any_work(flags, needles, tiny_models, sentiment_files, run, capsys):
    before = _mtimes(run)
    capsys.readouterr()
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, run, *flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert all(n in err for n in needles), err
    assert "--overwrite" in err and "another --output" in err
    assert _mtimes(run) == before  # nothing was redone or touched


def test_resume_checks_finished_stages_too(tiny_models, sentiment_files, run, capsys):
    capsys.readouterr()
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, run, "--ffn-keep", "0.25", "--resume")) == 2
    assert "localize: ffn_keep 0.5 -> 0.25" in capsys.readouterr().err


def test_changed_data_file_is_noticed(tiny_models, sentiment_files, run, tmp_path, capsys):
    train_file, dev_file = sentiment_files
    edited = tmp_path / "train.csv"
    edited.write_text(train_file.read_text() + train_file.read_text().splitlines()[1] + "\n")
    argv = [a if a != str(train_file) else str(edited) for a in _argv(tiny_models["llama"], sentiment_files, run)]
    capsys.readouterr()
    assert run_command(train, argv) == 2
    assert "prompt: task.data_sha256.train" in capsys.readouterr().err


def test_overwrite_redoes_the_changed_stage_and_what_follows(tiny_models, sentiment_files, run, capsys):
    before = _mtimes(run)
    old_retune = json.loads((run / "retune" / "metrics.json").read_text())
    capsys.readouterr()
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, run, "--ffn-keep", "0.25",
                                    "--overwrite")) == 0
    out = capsys.readouterr().out
    assert "stage prompt is complete" in out and "stage attribute is complete" in out
    after = _mtimes(run)
    assert after["prompt/prompt.safetensors"] == before["prompt/prompt.safetensors"]
    assert after["attribution.safetensors"] == before["attribution.safetensors"]
    # the teacher reads the prompt only, not the skeleton: a new skeleton keeps its pass (distilled re-tuning)
    assert "stage teacher is complete" in out and after["teacher.safetensors"] == before["teacher.safetensors"]
    assert all(after[k] != before[k] for k in ("skeleton.json", "compact/manifest.json", "retune/prompt.safetensors"))
    skeleton = json.loads((run / "skeleton.json").read_text())
    sizes = skeleton["ffn_sizes"]  # 0.25 of 64 neurons per layer overall (decoder default: global), align 8
    assert skeleton["ffn_keep"] == 0.25 and abs(sum(sizes) - 16 * len(sizes)) <= 8 * len(sizes)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["ffn_keep"] == 0.25 and summary["ffn_sizes"] == skeleton["ffn_sizes"]
    assert summary["skeleton_after_retune"] != old_retune["metrics"] or \
        summary["skeleton_before_retune"] != old_retune["before_retune"]
    assert summary["settings_ids"]["localize"] == skeleton["settings"]["id"]
    assert (missing_fields(summary) == []
            and missing_fields(json.loads((run / "retune" / "metrics.json").read_text())) == [])
    # The same flags again: everything is reused.
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, run, "--ffn-keep", "0.25")) == 0
    assert capsys.readouterr().out.count("skipping") == len(STAGES)


def test_overwrite_retune_lr_takes_effect(tiny_models, sentiment_files, run):
    argv = _argv(tiny_models["llama"], sentiment_files, run, "--lr", "0.05", "--stages", "retune", "--overwrite")
    assert run_command(train, argv) == 0
    retune = json.loads((run / "retune" / "metrics.json").read_text())
    assert retune["config"]["lr"] == 0.05 and retune["settings"]["values"]["lr"] == 0.05
    prompt = json.loads((run / "prompt" / "metrics.json").read_text())
    assert prompt["settings"]["values"]["lr"] == 0.1  # stage 1 was not asked for: kept as it was


def test_retune_budget_is_its_own(tiny_models, sentiment_files, tmp_path):
    """--retune-epochs / --retune-lr set re-tuning's budget apart from stage 1's (0: the same)."""
    out = tmp_path / "run"
    argv = _argv(tiny_models["llama"], sentiment_files, out, "--max-steps", "0", "--epochs", "1",
                 "--retune-epochs", "2", "--retune-lr", "0.02")
    assert run_command(train, argv) == 0
    prompt = json.loads((out / "prompt" / "metrics.json").read_text())
    retune = json.loads((out / "retune" / "metrics.json").read_text())
    assert retune["steps"] == 2 * prompt["steps"] > 0
    assert (prompt["settings"]["values"]["epochs"], prompt["settings"]["values"]["lr"]) == (1.0, 0.1)
    assert (retune["settings"]["values"]["epochs"], retune["settings"]["values"]["lr"]) == (2.0, 0.02)


def test_redoing_a_stage_removes_unrequested_outputs_made_from_it(tiny_models, sentiment_files, run, capsys):
    argv = _argv(tiny_models["llama"], sentiment_files, run, "--ffn-keep", "0.25", "--stages", "localize",
                 "--overwrite")
    assert run_command(train, argv) == 0
    assert "removed the convert outputs" in capsys.readouterr().out
    assert not (run / "compact").exists() and not (run / "retune").exists() and not (run / "conversion.json").exists()
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["skeleton_after_retune"] is None and summary["ffn_keep"] == 0.25  # no stale results shown


def test_verify_names_a_compact_built_from_another_skeleton(tiny_models, sentiment_files, run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, other, "--ffn-keep", "0.25",
                                    "--stages", "localize", "--overwrite")) == 0
    shutil.copy(other / "skeleton.json", run / "skeleton.json")  # a skeleton from another run, beside the old compact
    problems = lineage.lineage_problems(run)
    assert [p for p, _ in problems] == [str(run / "compact")]
    capsys.readouterr()
    assert run_command(verify_command, [str(run)]) == 1
    out = capsys.readouterr().out
    assert "was built from another localize output" in out
    # and the pipeline refuses to reuse it
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, run, "--ffn-keep", "0.25")) == 2
    assert "convert: built from another localize output" in capsys.readouterr().err
