"""SLURM without a cluster: `skeleton-ds hostfile` against a stand-in `scontrol`, and the batch script
launch/slurm/skeleton.sbatch run by bash under a fake SLURM environment whose `srun`, `scontrol` and
`deepspeed` record how they were called."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from skeleton_ds.cli import COMMANDS, run_command
from skeleton_ds.cluster import parse_gpu_count, slots_per_node
from skeleton_ds.errors import UserError

SBATCH = REPO / "launch" / "slurm" / "skeleton.sbatch"

# Every stand-in appends one JSON line {"tool": ..., ...} to $FAKE_SLURM_LOG.
_RECORD = '''
import json, os, signal, subprocess, sys, time

def record(tool, **fields):
    line = json.dumps({"tool": tool, **fields}) + "\\n"
    fd = os.open(os.environ["FAKE_SLURM_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())  # one write per line: concurrent nodes do not interleave
    finally:
        os.close(fd)
'''

FAKE_SCONTROL = _RECORD + '''
args = sys.argv[1:]
record("scontrol", argv=args)
if args[:2] == ["show", "hostnames"]:
    if os.environ.get("FAKE_SCONTROL_FAIL"):
        print("scontrol: error: Invalid hostlist: " + args[2], file=sys.stderr)
        sys.exit(1)
    for host in os.environ.get("FAKE_HOSTS", "").split():
        print(host)
elif args[:1] != ["requeue"]:
    sys.exit(f"fake scontrol: unexpected {args}")
'''

# Like srun inside an allocation: one task per node, each with its SLURM_NODEID; a signal srun receives
# goes to every process of every task (slurmstepd signals the whole step); exit = the highest task exit.
FAKE_SRUN = _RECORD + '''
args = sys.argv[1:]
i = 0
while i < len(args) and args[i].startswith("-"):
    i += 1
record("srun", options=args[:i], command=args[i:])
hosts = os.environ["FAKE_HOSTS"].split()
tasks = [subprocess.Popen(args[i:], env=os.environ | {"SLURM_NODEID": str(n), "SLURMD_NODENAME": hosts[n]},
                          start_new_session=True) for n in range(int(os.environ["SLURM_NNODES"]))]

def forward(signum, frame):
    record("srun-signal", signal=signum)
    for task in tasks:
        try:
            os.killpg(task.pid, signum)
        except ProcessLookupError:
            pass

signal.signal(signal.SIGUSR1, forward)
codes = [task.wait() for task in tasks]
sys.exit(max(c if c >= 0 else 128 - c for c in codes))
'''

# The launcher and the rank in one: records its argv and whether SIGUSR1 reached it ignored (the batch
# script must make the launchers ignore it), then exits $FAKE_TRAIN, or with "wait-signal" waits for
# SIGUSR1 like a rank that checkpoints and exits 75.
FAKE_DEEPSPEED = _RECORD + '''
node = os.environ["SLURM_NODEID"]
record("deepspeed", node=node, argv=sys.argv[1:],
       usr1_ignored=signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)
mode = os.environ.get("FAKE_TRAIN", "0")
if mode != "wait-signal":
    sys.exit(int(mode))
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
open(os.path.join(os.environ["FAKE_SLURM_DIR"], f"started.{node}"), "w").close()
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
record("rank-signal", node=node, got=bool(got))
sys.exit(75 if got else 3)
'''


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """A directory with the stand-ins (and a `skeleton-ds` that runs this checkout's CLI)."""
    bin_dir = tmp_path / "fake" / "bin"
    bin_dir.mkdir(parents=True)
    _script(bin_dir / "scontrol", FAKE_SCONTROL)
    _script(bin_dir / "srun", FAKE_SRUN)
    _script(bin_dir / "deepspeed", FAKE_DEEPSPEED)
    _script(bin_dir / "skeleton-ds", "import sys\nfrom skeleton_ds.cli import main\nsys.exit(main())\n")
    return bin_dir


def records(log: Path, tool: str) -> list[dict]:
    if not log.exists():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["tool"] == tool]


# ---------------------------------------------------------------------------------------------------
# GPUs per node and slots


@pytest.mark.parametrize(("value", "count"), [("4", 4), ("gpu:4", 4), ("a100:4", 4), ("gpu:a100:8", 8),
                                              ("a100:2,v100:2", 4), ("gpu:a100:4(S:0-1)", 4), (" 2 ", 2)])
def test_gpu_count_forms(value, count):
    assert parse_gpu_count(value) == count


@pytest.mark.parametrize("value", ["", "gpu", "a100:", "a100:x", "4x", "gpu:-1"])
def test_gpu_count_garbage_is_refused_by_name(value):
    with pytest.raises(UserError, match="SLURM_GPUS_PER_NODE=.*--slots"):
        parse_gpu_count(value, "SLURM_GPUS_PER_NODE")


def test_slots_come_from_flag_then_gpus_on_node_then_gpus_per_node_then_tasks():
    env = {"SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "a100:4", "SLURM_NTASKS_PER_NODE": "1"}
    assert slots_per_node(env, 2) == 2
    assert slots_per_node(env) == 8
    assert slots_per_node(env | {"SLURM_GPUS_ON_NODE": ""}) == 4
    assert slots_per_node({"SLURM_NTASKS_PER_NODE": "3"}) == 3
    with pytest.raises(UserError, match="no slot count: pass --slots N"):
        slots_per_node({})
    with pytest.raises(UserError, match="--slots 0"):
        slots_per_node(env, 0)
    with pytest.raises(UserError, match="SLURM_GPUS_ON_NODE='0' gives no GPUs"):
        slots_per_node({"SLURM_GPUS_ON_NODE": "0"})


# ---------------------------------------------------------------------------------------------------
# skeleton-ds hostfile


@pytest.fixture
def slurm_env(monkeypatch, fake_bin, tmp_path):
    """An allocation of gpu-a[01-02] with 4 GPUs per node, the stand-in scontrol first on PATH."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("RANK", raising=False)  # run_command prints errors on rank 0 only
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "log.jsonl"))
    monkeypatch.setenv("FAKE_HOSTS", "gpu-a01 gpu-a02")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-a[01-02]")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
    return tmp_path / "log.jsonl"


def test_hostfile_from_the_allocation(slurm_env, tmp_path, capsys):
    out = tmp_path / "shared" / "hostfile"
    assert run_command(COMMANDS["hostfile"], ["--output", str(out)]) == 0
    assert out.read_text() == "gpu-a01 slots=4\ngpu-a02 slots=4\n"
    assert [r["argv"] for r in records(slurm_env, "scontrol")] == [["show", "hostnames", "gpu-a[01-02]"]]
    assert sorted(p.name for p in out.parent.iterdir()) == ["hostfile"]  # no temporary left behind
    assert "2 nodes x 4 slots" in capsys.readouterr().out


def test_hostfile_flags_win_over_the_environment(slurm_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_HOSTS", "n7 n8 n9")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "")
    monkeypatch.setenv("SLURM_GPUS_PER_NODE", "a100:8")
    out = tmp_path / "hostfile"
    assert run_command(COMMANDS["hostfile"], ["--nodelist", "n[7-9]", "--output", str(out)]) == 0
    assert out.read_text() == "n7 slots=8\nn8 slots=8\nn9 slots=8\n"
    assert run_command(COMMANDS["hostfile"], ["--nodelist", "n[7-9]", "--slots", "2", "--output", str(out)]) == 0
    assert out.read_text() == "n7 slots=2\nn8 slots=2\nn9 slots=2\n"
    assert [r["argv"][2] for r in records(slurm_env, "scontrol")] == ["n[7-9]", "n[7-9]"]


def test_hostfile_takes_the_deprecated_out_alias(slurm_env, tmp_path):
    """--output is the flag; --out, its old spelling, still names the same file."""
    out = tmp_path / "hostfile"
    assert run_command(COMMANDS["hostfile"], ["--out", str(out)]) == 0
    assert out.read_text() == "gpu-a01 slots=4\ngpu-a02 slots=4\n"


def test_hostfile_is_fsynced_before_the_rename(slurm_env, tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), replace(a, b))[1])
    old = tmp_path / "hostfile"
    old.write_text("stale slots=1\n")
    assert run_command(COMMANDS["hostfile"], ["--output", str(old)]) == 0
    renames = [e for e in events if e[0] == "replace"]
    assert len(renames) == 1 and renames[0][2] == str(old)
    temporary = renames[0][1]
    assert ("fsync", temporary) in events[:events.index(renames[0])], events  # the new content is on disk first
    assert old.read_text() == "gpu-a01 slots=4\ngpu-a02 slots=4\n"


@pytest.mark.parametrize(("case", "hint"), [
    ("no scontrol", "scontrol is not on PATH"),
    ("scontrol fails", "failed (exit 1: scontrol: error: Invalid hostlist: gpu-a[01-02]): check --nodelist"),
    ("no hosts printed", "printed no hosts"),
    ("no node list", "SLURM_JOB_NODELIST is unset"),
    ("empty --nodelist", "the node list is empty"),
    ("no slot count", "no slot count: pass --slots N"),
    ("bad gpu variable", "SLURM_GPUS_PER_NODE='gpu:many' is not a GPU count"),
    ("repeated host", "names gpu-a01 more than once"),
])
def test_hostfile_errors_are_one_line_and_exit_2(case, hint, slurm_env, tmp_path, monkeypatch, capsys):
    argv = ["--output", str(tmp_path / "hostfile")]
    if case == "no scontrol":
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    elif case == "scontrol fails":
        monkeypatch.setenv("FAKE_SCONTROL_FAIL", "1")
    elif case == "no hosts printed":
        monkeypatch.setenv("FAKE_HOSTS", "")
    elif case == "no node list":
        monkeypatch.delenv("SLURM_JOB_NODELIST")
    elif case == "empty --nodelist":
        argv += ["--nodelist", " "]
    elif case == "no slot count":
        for name in ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
            monkeypatch.delenv(name)
    elif case == "bad gpu variable":
        monkeypatch.delenv("SLURM_GPUS_ON_NODE")
        monkeypatch.setenv("SLURM_GPUS_PER_NODE", "gpu:many")
    elif case == "repeated host":
        monkeypatch.setenv("FAKE_HOSTS", "gpu-a01 gpu-a01")
    assert run_command(COMMANDS["hostfile"], argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and hint in err[0], err
    assert not (tmp_path / "hostfile").exists()


def test_hostfile_error_through_the_entry_point(tmp_path):
    """The real process: one `error:` line, exit 2, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "RANK"}
    result = subprocess.run([sys.executable, "-m", "skeleton_ds.cli", "hostfile", "--slots", "4", "--output",
                             str(tmp_path / "hostfile")], cwd=REPO, env=env | {"PATH": str(tmp_path)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [("error: no node list: SLURM_JOB_NODELIST is unset (not inside a SLURM "
                                           "allocation); pass --nodelist 'node[01-04]' or run inside sbatch/salloc")]


# ---------------------------------------------------------------------------------------------------
# launch/slurm/skeleton.sbatch under a fake SLURM

TRAIN_ARGS = ["--config", "ds_configs/zero3.json", "--model", "m", "--output", "runs/x", "--prompt-init",
              "text:a great movie"]  # one argument with spaces: it must reach train.py as one


def test_batch_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = SBATCH.read_text()
    for line in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--signal=B:USR1@", "--requeue",
                 "--open-mode=append"):
        assert f"#SBATCH {line}" in text


def _batch_env(fake_bin: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SKELETON_"))}
    return env | {
        "PATH": f"{fake_bin}{os.pathsep}{env['PATH']}", "SKELETON_VENV": str(fake_bin.parent),
        "SKELETON_HOSTFILE": str(tmp_path / "shared" / "hostfile"), "FAKE_SLURM_LOG": str(tmp_path / "log.jsonl"),
        "FAKE_SLURM_DIR": str(tmp_path), "FAKE_HOSTS": "gpu-a01 gpu-a02",
        "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NODEID": "0",  # the batch shell's own; each task must get its node's
    } | extra


def _run_batch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)


def _expected_launch(tmp_path: Path, node: int) -> list[str]:
    return ["--hostfile", str(tmp_path / "shared" / "hostfile"), "--no_ssh", "--num_nodes", "2",
            "--node_rank", str(node), "--master_addr", "gpu-a01", "--master_port", str(20000 + 4242 % 10000),
            "--num_gpus", "4", "launch/train.py", *TRAIN_ARGS, "--resume"]


@pytest.mark.parametrize("train_exit", [0, 1])
def test_batch_script_launches_one_deepspeed_per_node(train_exit, fake_bin, tmp_path):
    env = _batch_env(fake_bin, tmp_path, FAKE_TRAIN=str(train_exit))
    result = _run_batch(env, *TRAIN_ARGS)
    assert result.returncode == train_exit, result.stderr
    log = tmp_path / "log.jsonl"
    assert (tmp_path / "shared" / "hostfile").read_text() == "gpu-a01 slots=4\ngpu-a02 slots=4\n"
    (srun,) = records(log, "srun")
    assert "--ntasks-per-node=1" in srun["options"] and "--nodes=2" in srun["options"]
    launches = sorted(records(log, "deepspeed"), key=lambda r: r["node"])
    assert [r["node"] for r in launches] == ["0", "1"]
    for node, launch in enumerate(launches):
        assert launch["argv"] == _expected_launch(tmp_path, node)
        assert launch["usr1_ignored"], "the DeepSpeed launchers must ignore SIGUSR1 (only the ranks handle it)"
    assert [r["argv"] for r in records(log, "scontrol")] == [["show", "hostnames", "gpu-a[01-02]"]]  # no requeue


def test_exit_75_requeues_the_job(fake_bin, tmp_path):
    result = _run_batch(_batch_env(fake_bin, tmp_path, FAKE_TRAIN="75"), *TRAIN_ARGS)
    assert result.returncode == 75, result.stderr
    assert records(tmp_path / "log.jsonl", "scontrol")[-1]["argv"] == ["requeue", "4242"]
    assert "requeueing job 4242" in result.stderr


def test_requeues_stop_at_the_limit(fake_bin, tmp_path):
    env = _batch_env(fake_bin, tmp_path, FAKE_TRAIN="75", SLURM_RESTART_COUNT="3", SKELETON_MAX_REQUEUES="3")
    result = _run_batch(env, *TRAIN_ARGS)
    assert result.returncode == 75
    assert [r["argv"][0] for r in records(tmp_path / "log.jsonl", "scontrol")] == ["show"]
    assert "not requeueing" in result.stderr


def test_sigusr1_reaches_the_ranks_and_the_job_is_requeued(fake_bin, tmp_path):
    """SLURM's warning goes to the batch shell (B:USR1); the shell passes it to srun, srun to every
    process of the step; the launchers ignore it, the ranks exit 75 and the script requeues."""
    env = _batch_env(fake_bin, tmp_path, FAKE_TRAIN="wait-signal")
    job = subprocess.Popen(["bash", str(SBATCH), *TRAIN_ARGS], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"started.{n}").exists() for n in (0, 1)):
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "the fake ranks did not start"
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 75, err
    log = tmp_path / "log.jsonl"
    assert [r["signal"] for r in records(log, "srun-signal")] == [signal.SIGUSR1]
    assert sorted((r["node"], r["got"]) for r in records(log, "rank-signal")) == [("0", True), ("1", True)]
    assert records(log, "scontrol")[-1]["argv"] == ["requeue", "4242"]
    assert "SIGUSR1" in err and "training exited 75 after SIGUSR1" in err


@pytest.mark.parametrize(("args", "extra", "hint"), [
    (["--overwrite"], {}, "--overwrite cannot be used in a requeueable job"),
    ([], {}, "give the launch/train.py arguments"),
    (TRAIN_ARGS, {"SLURM_JOB_ID": ""}, "not inside a SLURM batch job"),
    (TRAIN_ARGS, {"SLURM_GPUS_ON_NODE": "", "SLURM_NTASKS_PER_NODE": ""}, "error: no slot count"),
])
def test_batch_script_refuses_what_it_cannot_run(args, extra, hint, fake_bin, tmp_path):
    result = _run_batch(_batch_env(fake_bin, tmp_path, **extra), *args)
    assert result.returncode == 2
    assert hint in result.stderr
    assert not records(tmp_path / "log.jsonl", "srun")
