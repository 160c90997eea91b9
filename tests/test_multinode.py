"""Two nodes on one machine: two DeepSpeed launchers started the way launch/slurm/skeleton.sbatch starts
them on each node (`deepspeed --hostfile H --no_ssh --num_nodes 2 --node_rank R ...`), one rank each,
run one ZeRO-3 job together and end with the prompt a single launcher with 2 local ranks gets.

DeepSpeed's --no_ssh needs a hostfile listing every node (without one it refuses --num_nodes > 1 and
forces the master address to 127.0.0.1); its host names are only labels there (--node_rank picks the
line, nothing resolves or contacts them), so `node0`/`node1` serve on one machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from skeleton_ds.cluster import write_hostfile
from skeleton_ds.distributed import free_port, without_rendezvous
from test_distributed import _argv, _ok, _prompt, launch

pytestmark = pytest.mark.multirank

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def node_command(hostfile: Path, node_rank: int, port: int, argv: list[str]) -> list[str]:
    return [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--node_rank", str(node_rank),
            "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py", *argv]


def run_nodes(commands: list[list[str]], logs: list[Path], timeout: float = 600) -> list[subprocess.Popen]:
    """Start every node's launcher (each in its own process group, with its ranks); when one fails, or
    the time is up, kill every group still running. Returns the finished processes."""
    env = without_rendezvous(os.environ)
    procs = []
    try:
        for cmd, log in zip(commands, logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]  # poll every one (any() would stop at the first running)
            if None not in codes or any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher, its per-node launcher and its rank
                p.wait()
    return procs


def group_gone(pgid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _tail(log: Path) -> str:
    return log.name + ":\n" + log.read_text()[-3000:]


def test_two_launchers_as_two_nodes_match_one_node_with_two_ranks(tiny_models, sentiment_files, tmp_path):
    model = tiny_models["llama"]
    flags = ("--max-steps", "6", "--stages", "prompt")
    _ok(launch(2, _argv(model, sentiment_files, tmp_path / "one-node", 3, *flags)))

    hostfile = write_hostfile(tmp_path / "hostfile", ["node0", "node1"], 1)
    port = free_port()
    out = tmp_path / "two-nodes"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = run_nodes([node_command(hostfile, r, port, _argv(model, sentiment_files, out, 3, *flags)) for r in (0, 1)],
                      logs)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(map(_tail, logs))
    for rank, log in enumerate(logs):  # each launcher really ran one node of a 2-node world
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in log.read_text(), _tail(log)

    a, b = _prompt(tmp_path / "one-node"), _prompt(out)
    assert a.keys() == b.keys()
    for key in a:
        # Same global batch and data order; only the all-reduce association may differ (as in
        # test_distributed: bound 1e-5 absolute on values of order 0.7).
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    summary = json.loads((out / "prompt" / "metrics.json").read_text())
    assert summary["world_size"] == 2


def test_a_failed_node_takes_the_other_down(tiny_models, sentiment_files, tmp_path):
    """Node 1 fails at once (a node rank outside the hostfile); node 0 would wait for it at the
    rendezvous until the timeout, so it is killed with its rank, and nothing of it survives."""
    hostfile = write_hostfile(tmp_path / "hostfile", ["node0", "node1"], 1)
    port = free_port()
    argv = _argv(tiny_models["llama"], sentiment_files, tmp_path / "out", 3, "--max-steps", "2", "--stages", "prompt")
    bad = node_command(hostfile, 1, port, argv)
    bad[bad.index("--node_rank") + 1] = "2"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    start = time.monotonic()
    procs = run_nodes([node_command(hostfile, 0, port, argv), bad], logs, timeout=300)
    assert procs[1].returncode != 0 and procs[0].returncode == -signal.SIGKILL, "\n".join(map(_tail, logs))
    assert time.monotonic() - start < 120
    assert all(group_gone(p.pid) for p in procs), "a launcher or rank outlived its node"
    assert not (tmp_path / "out" / "prompt").exists()
