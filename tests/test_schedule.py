"""Iterative localization (--keep-schedule) on a tiny LLaMA and a tiny Qwen2: every step's compact model is a
plain transformers checkpoint equal to the base masked to that step's skeleton, each skeleton lies within the one
before, the final one is in DIR like a one-shot run's, a killed run resumes mid-schedule to the same result, and a
changed step is refused before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import DS_CONFIGS, generic_flags
from skeleton_ds.architectures import Geometry, adapter_for
from skeleton_ds.attribution import read_attribution, to_base_indices
from skeleton_ds.cli import run_command, train, verify
from skeleton_ds.config import config_from_args
from skeleton_ds.errors import UserError
from skeleton_ds.localization import Skeleton, load_skeleton, masked, select
from skeleton_ds.stages.prompt_tuning import KILL_AFTER_STEP_ENV
from test_distributed import launch

SCHEDULE = ("--keep-schedule", "0.75,0.5")


def _argv(model, files, out, *extra):
    # epochs, not --max-steps: a schedule shares the re-tuning epochs out over its steps (0.5 / 2 = 3 steps each)
    return ["--model", str(model), "--config", str(DS_CONFIGS / "zero2.json"), "--output", str(out),
            "--batch-size", "8", "--prompt-length", "4", "--max-length", "24", "--lr", "0.1", "--seed", "3",
            "--epochs", "1", "--retune-epochs", "0.5", "--align", "8", *generic_flags(files), *extra]


def _equals_masked_base(base, compact_dir, skeleton_file, model_type) -> None:
    from transformers import AutoModelForCausalLM

    skeleton, meta = load_skeleton(skeleton_file)
    full = AutoModelForCausalLM.from_pretrained(base).eval()
    compact = AutoModelForCausalLM.from_pretrained(compact_dir).eval()  # plain transformers: the padded checkpoint
    ids = torch.randint(5, 25, (3, 11))
    with torch.no_grad(), masked(full, adapter_for(model_type), Geometry(**meta["geometry"]), skeleton):
        expected = full(input_ids=ids)[0]
    torch.testing.assert_close(compact(input_ids=ids)[0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_step_is_a_valid_compact_model_within_the_one_before(arch, tiny_models, sentiment_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_command(train, _argv(tiny_models[arch], sentiment_files, out, *SCHEDULE)) == 0
    step = out / "steps" / "ffn-0.75"
    first, _ = load_skeleton(step / "skeleton.json")
    final, _ = load_skeleton(out / "skeleton.json")
    assert sum(first.ffn_sizes()) == 96 and sum(final.ffn_sizes()) == 64  # 0.75 and 0.5 of 2 x 64 neurons
    assert all(set(b) <= set(a) for a, b in zip(first.ffn, final.ffn))
    for run, skeleton in ((step, step / "skeleton.json"), (out, out / "skeleton.json")):
        _equals_masked_base(tiny_models[arch], run / "compact", skeleton, arch)

    # The last step scored the first step's compact model: its scores are in base indices, only for the units
    # that model has, and say so.
    scores, meta = read_attribution(out / "attribution.safetensors")
    assert meta["within"] == {"ffn": first.ffn, "heads": first.heads}
    for i, kept in enumerate(first.ffn):
        dropped = sorted(set(range(64)) - set(kept))
        assert scores[f"ffn.{i}"][dropped].abs().sum() == 0 and scores[f"ffn.{i}"][kept].abs().sum() > 0

    # Re-tuning starts from the prompt the step before re-tuned, with half the budget, and records where from.
    step_retune = json.loads((step / "retune" / "metrics.json").read_text())
    retune = json.loads((out / "retune" / "metrics.json").read_text())
    assert retune["settings"]["values"]["previous_step"] == step_retune["settings"]["id"]
    assert retune["steps"] == step_retune["steps"] == 3  # 0.5 epoch of 12 steps, shared by two steps
    summary = json.loads((out / "metrics.json").read_text())
    assert [s["ffn_keep"] for s in summary["keep_schedule"]] == [0.75, 0.5]
    assert summary["keep_schedule"][1]["after_retune"] == retune["metrics"]
    assert run_command(verify, [str(out)]) == 0
    capsys.readouterr()

    # The same command reuses every step; a changed step is refused before any work, naming the change.
    assert run_command(train, _argv(tiny_models[arch], sentiment_files, out, *SCHEDULE)) == 0
    assert "ffn-0.75 with these settings" in capsys.readouterr().out.replace("\n", "")
    made = (step / "attribution.safetensors").stat().st_mtime_ns
    assert run_command(train, _argv(tiny_models[arch], sentiment_files, out, "--keep-schedule", "0.625,0.5")) == 2
    assert "made from what the keep schedule changes" in capsys.readouterr().err
    assert not (out / "steps" / "ffn-0.625").exists() and (step / "attribution.safetensors").stat().st_mtime_ns == made

    # Restored from light files (no compact models): the first step is converted and re-tuned again with the same
    # settings, so what the last step read from it is unchanged and its finished stages are reused.
    for name in ("compact", "checkpoints"):  # what launch/table_state.sh leaves out
        shutil.rmtree(step / name)
    last = (out / "attribution.safetensors").stat().st_mtime_ns
    assert run_command(train, _argv(tiny_models[arch], sentiment_files, out, *SCHEDULE)) == 0
    assert ((step / "compact" / "manifest.json").is_file()
            and (out / "attribution.safetensors").stat().st_mtime_ns == last)


def test_finished_steps_are_reused_when_only_the_teacher_is_new(tiny_models, sentiment_files, tmp_path, capsys):
    """A first step whose scores were copied in (as a study shares them) and a shared stage with work to do that
    no step reads (the teacher, without distillation): nothing is stale, the schedule runs."""
    out = tmp_path / "run"
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, out, "--stages", "prompt,attribute")) == 0
    step = out / "steps" / "ffn-0.75"
    step.mkdir(parents=True)
    shutil.copytree(out / "prompt", step / "prompt")
    shutil.copy(out / "attribution.safetensors", step / "attribution.safetensors")
    (out / "attribution.safetensors").unlink()
    assert run_command(train, _argv(tiny_models["llama"], sentiment_files, out, *SCHEDULE)) == 0, \
        capsys.readouterr().err
    assert "stage attribute is complete" in capsys.readouterr().out  # the copied scores were used


def test_a_run_killed_mid_schedule_resumes_to_the_same_result(tiny_models, sentiment_files, tmp_path):
    flags = (*SCHEDULE, "--save-every", "1")
    model = tiny_models["llama"]
    straight, out = tmp_path / "straight", tmp_path / "crashed"
    assert launch(0, _argv(model, sentiment_files, straight, *flags)).returncode == 0
    killed = launch(0, _argv(model, sentiment_files, out, *flags), env={KILL_AFTER_STEP_ENV: "retune:2"})
    assert killed.returncode != 0  # killed in the first step's re-tuning
    assert (out / "steps" / "ffn-0.75" / "compact").is_dir() and not (out / "steps" / "ffn-0.75" / "retune").exists()
    resumed = launch(0, _argv(model, sentiment_files, out, *flags, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2/3" in resumed.stdout
    for name in ("retune/prompt.safetensors", "steps/ffn-0.75/retune/prompt.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(out / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert (straight / "skeleton.json").read_text() == (out / "skeleton.json").read_text()


def test_selection_within_a_previous_skeleton_and_scores_mapped_back():
    geometry = Geometry(layers=2, ffn_size=8, heads=4, kv_heads=2, head_dim=4, hidden_size=16)
    within = Skeleton(ffn=[[0, 2, 5, 7], [1, 2, 3, 6]], heads=[[0, 1], [0, 1]])
    # Compact scores (padded to width 5: the fifth unit is padding) favour the last kept units.
    compact = {f"ffn.{i}": torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0]) for i in range(2)}
    compact |= {f"heads.{i}": torch.tensor([1.0, 2.0]) for i in range(2)}
    scores = to_base_indices(compact, within.ffn, within.heads, geometry)
    assert scores["ffn.0"].tolist() == [1, 0, 2, 0, 0, 3, 0, 4] and scores["ffn.1"].tolist() == [0, 1, 2, 3, 0, 0, 4, 0]
    # Units outside the previous skeleton score 0, above the kept ones' negative scores: still never kept.
    scores = {k: -v - 1 if k.startswith("ffn") else v for k, v in scores.items()}
    skeleton = select(scores, geometry, ffn_keep=0.25, head_keep=1.0, align=1, mode="uniform", within=within)
    assert skeleton.ffn == [[0, 2], [1, 2]]
    with pytest.raises(UserError, match="keep more units than the keep schedule's previous step"):
        select(scores, geometry, ffn_keep=0.75, head_keep=1.0, align=1, mode="uniform", within=within)


@pytest.mark.parametrize(("flags", "message"), [
    (["--keep-schedule", "0.3,0.5"], "each smaller than the one before"),
    (["--keep-schedule", "0.5,1.2"], "in \\(0, 1\\]"),
    (["--keep-schedule", "0.5,0.3", "--ffn-keep", "0.2"], "its last entry 0.3 is not --ffn-keep 0.2"),
    (["--keep-schedule", "0.5,0.3", "--compensate", "mean"], "--compensate"),
    (["--keep-schedule", "0.5,0.3", "--max-steps", "4"], "--retune-epochs"),
])
def test_bad_schedules_are_refused_with_what_to_fix(flags, message):
    with pytest.raises(UserError, match=message):
        config_from_args(flags)


def test_the_schedule_sets_the_final_keep():
    assert config_from_args(["--keep-schedule", "0.5,0.2"]).ffn_keep == 0.2
    assert config_from_args([]).ffn_keep == 0.3
