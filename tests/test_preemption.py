"""Preemption as a batch job sees it: a real SIGUSR1/SIGTERM reaches a running job mid-stage, every rank
finishes its step, a checkpoint is saved, the job exits 75, and the same command with --resume ends
where an uninterrupted run ends (prompt tuning, attribution, re-tuning)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, max_abs, max_abs_diff
from skeleton_ds.distributed import without_rendezvous
from skeleton_ds.preemption import PREEMPTED_EXIT_CODE, STEP_DELAY_ENV
from skeleton_ds.distributed import free_port
from test_distributed import _argv, _ok, _prompt, launch

pytestmark = pytest.mark.multirank


def start(ranks: int, argv: list[str], delay: float) -> subprocess.Popen:
    """Like test_distributed.launch, but returns at once; every step / attribution batch sleeps `delay`."""
    if ranks:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(free_port()), "launch/train.py", *argv]
    else:
        cmd = [sys.executable, "launch/train.py", *argv]
    env = without_rendezvous(os.environ) | {STEP_DELAY_ENV: str(delay)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ranks_of(job: subprocess.Popen) -> list[psutil.Process]:
    """The training processes (not the launchers): those started with --local_rank, or the job itself."""
    tree = psutil.Process(job.pid).children(recursive=True)
    found = [p for p in tree if any(a.startswith("--local_rank=") for a in p.cmdline())]
    rank = lambda p: next(a for a in p.cmdline() if a.startswith("--local_rank="))  # noqa: E731
    return sorted(found, key=rank) if found else [psutil.Process(job.pid)]


def wait_for(path: Path, job: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if job.poll() is not None:
            out, err = job.communicate()
            pytest.fail(f"job ended ({job.returncode}) before {path} appeared:\n{out[-2000:]}\n{err[-2000:]}")
        if time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.1)


def finish(job: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = job.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        for p in psutil.Process(job.pid).children(recursive=True):
            p.kill()
        job.kill()
        out, err = job.communicate()
        pytest.fail(f"job did not stop after the signal:\n{out[-2000:]}\n{err[-2000:]}")
    return job.returncode, out, err


def _latest_step(out: Path, stage: str) -> int:
    return int((out / "checkpoints" / stage / "latest").read_text().strip().removeprefix("step"))


def test_sigusr1_to_one_rank_stops_both_after_a_checkpoint_and_resume_matches(tiny_models, sentiment_files, tmp_path,
                                                                              measured):
    """SIGUSR1 reaches only rank 1 of a 2-rank ZeRO-3 prompt-tuning job: both ranks stop after the same
    step with a checkpoint, exit 75, and --resume ends with the uninterrupted run's prompt."""
    flags = ("--max-steps", "12", "--save-every", "2", "--stages", "prompt")
    model = tiny_models["llama"]
    _ok(launch(2, _argv(model, sentiment_files, tmp_path / "straight", 3, *flags)))

    out = tmp_path / "preempted"
    job = start(2, _argv(model, sentiment_files, out, 3, *flags), delay=0.5)
    wait_for(out / "checkpoints" / "prompt" / "latest", job)  # step 2 is done: mid-stage
    ranks = ranks_of(job)
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGUSR1)
    code, _, err = finish(job)
    assert code == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "preempted" in err and "--resume" in err
    stopped = _latest_step(out, "prompt")
    assert 2 < stopped < 12, "the stop step's checkpoint must be written"
    assert not (out / "prompt").exists(), "a preempted stage must not leave a finished-looking prompt"

    resumed = launch(2, _argv(model, sentiment_files, out, 3, *flags, "--resume"))
    _ok(resumed)
    assert f"at step {stopped}/12" in resumed.stdout
    a, b = _prompt(tmp_path / "straight"), _prompt(out)
    measured["prompt_max_abs_diff"] = max_abs_diff(a, b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)  # see test_distributed: ZeRO-3 reduce order


def test_attribution_stopped_by_signal_resumes_to_the_same_scores(tiny_models, sentiment_files, tmp_path, measured):
    """SIGUSR1 to both ranks mid-attribution: partial sums are saved, exit 75; --resume gives the scores
    of an uninterrupted 2-rank run."""
    from skeleton_ds.attribution import read_attribution

    model = tiny_models["llama"]
    _ok(launch(0, _argv(model, sentiment_files, tmp_path / "base", 2, "--max-steps", "4", "--stages", "prompt")))
    flags = ("--stages", "attribute", "--save-every", "3")
    for name in ("straight", "preempted"):
        shutil.copytree(tmp_path / "base" / "prompt", tmp_path / name / "prompt")
    _ok(launch(2, _argv(model, sentiment_files, tmp_path / "straight", 3, *flags)))

    out = tmp_path / "preempted"
    partial = out / "checkpoints" / "attribute" / "partial.safetensors"
    job = start(2, _argv(model, sentiment_files, out, 3, *flags), delay=0.4)
    wait_for(partial, job)  # 3 of 12 batches scored
    for rank in ranks_of(job):
        rank.send_signal(signal.SIGUSR1)
    code, _, err = finish(job)
    assert code == PREEMPTED_EXIT_CODE, err[-3000:]
    assert partial.is_file() and not (out / "attribution.safetensors").exists()

    refused = launch(2, _argv(model, sentiment_files, out, 3, *flags))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = launch(2, _argv(model, sentiment_files, out, 3, *flags, "--resume"))
    _ok(resumed)
    assert "resumed attribution" in resumed.stdout
    assert not partial.exists(), "partial sums are removed once the scores are written"
    one, meta_one = read_attribution(tmp_path / "straight" / "attribution.safetensors")
    two, meta_two = read_attribution(out / "attribution.safetensors")
    assert meta_one["examples"] == meta_two["examples"] == 96
    measured.update(scores_max_abs_diff=max_abs_diff(two, one), scores_max_abs=max_abs(one))
    for key in one:
        # Float64 partial sums added in another order, then rounded to float32.
        torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-12)


def test_sigterm_during_retune_checkpoints_and_resumes(tiny_models, sentiment_files, tmp_path, measured):
    """SIGTERM (what a preempting scheduler sends) to a single-process job during re-tuning."""
    flags = ("--max-steps", "10", "--save-every", "4", "--align", "8", "--ffn-keep", "0.5")
    model = tiny_models["bert-head"]
    _ok(launch(0, _argv(model, sentiment_files, tmp_path / "straight", 2, *flags)))

    out = tmp_path / "preempted"
    _ok(launch(0, _argv(model, sentiment_files, out, 2, *flags, "--stages", "prompt,attribute,localize,convert")))
    job = start(0, _argv(model, sentiment_files, out, 2, *flags, "--stages", "retune"), delay=0.4)
    wait_for(out / "checkpoints" / "retune" / "latest", job)
    job.send_signal(signal.SIGTERM)
    code, _, err = finish(job)
    assert code == PREEMPTED_EXIT_CODE, err[-3000:]
    assert 4 <= _latest_step(out, "retune") < 10 and not (out / "retune").exists()

    resumed = launch(0, _argv(model, sentiment_files, out, 2, *flags, "--resume"))
    _ok(resumed)
    a = load_file(str(tmp_path / "straight" / "compact" / "prompt.safetensors"))
    b = load_file(str(out / "compact" / "prompt.safetensors"))
    measured["retune_max_abs_diff"] = max_abs_diff(a, b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_teacher_pass_stopped_by_signal_resumes_to_the_same_outputs(tiny_models, sentiment_files, tmp_path):
    """SIGUSR1 to both ranks mid teacher pass: each rank saves its rows, exit 75; --resume gives the outputs of
    an uninterrupted 2-rank pass."""
    model = tiny_models["llama"]
    _ok(launch(0, _argv(model, sentiment_files, tmp_path / "base", 2, "--max-steps", "4", "--stages", "prompt")))
    flags = ("--stages", "teacher", "--save-every", "3", "--distill-kl", "1", "--distill-hidden", "1",
             "--distill-layers", "1")
    for name in ("straight", "preempted"):
        shutil.copytree(tmp_path / "base" / "prompt", tmp_path / name / "prompt")
    _ok(launch(2, _argv(model, sentiment_files, tmp_path / "straight", 3, *flags)))

    out = tmp_path / "preempted"
    partial = out / "checkpoints" / "teacher" / "rank0.safetensors"
    job = start(2, _argv(model, sentiment_files, out, 3, *flags), delay=0.4)
    wait_for(partial, job)  # 3 of 12 batches done
    for rank in ranks_of(job):
        rank.send_signal(signal.SIGUSR1)
    code, _, err = finish(job)
    assert code == PREEMPTED_EXIT_CODE, err[-3000:]
    assert partial.is_file() and not (out / "teacher.safetensors").exists()

    refused = launch(2, _argv(model, sentiment_files, out, 3, *flags))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = launch(2, _argv(model, sentiment_files, out, 3, *flags, "--resume"))
    _ok(resumed)
    assert "resumed the teacher pass" in resumed.stdout
    assert not partial.exists(), "partial rows are removed once the outputs are written"
    one, two = (load_file(str(tmp_path / "straight" / "teacher.safetensors")),
                load_file(str(out / "teacher.safetensors")))
    assert sorted(one) == sorted(two) == ["final", "layer.1", "logits"] and one["logits"].shape[0] == 96
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=0)
