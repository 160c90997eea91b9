"""SLURM allocations as DeepSpeed sees them: the node list expanded by SLURM itself, the slots
(GPUs) per node, and the hostfile (`host slots=N` per line) the `deepspeed` launcher reads.

The bracket syntax of a node list (`gpu-a[01-03,07]`, `n[1-2]-ib,login`) is never parsed here:
`scontrol show hostnames` expands it, so whatever the site's SLURM accepts works.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from collections.abc import Mapping, Sequence

from skeleton_ds.errors import UserError

GPU_COUNT_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")
"""Where an allocation states its GPUs per node, in order of preference: SLURM_GPUS_ON_NODE (a plain
count, set in the job and its steps), then SLURM_GPUS_PER_NODE (as requested: 4, gpu:4, a100:4)."""

_SCONTROL_TIMEOUT_S = 60


def expand_nodelist(nodelist: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The host names of a SLURM node list, in SLURM's order, from `scontrol show hostnames`."""
    env = os.environ if env is None else env
    nodelist = nodelist.strip()
    if not nodelist:
        raise UserError("the node list is empty: run inside a SLURM allocation (SLURM_JOB_NODELIST) or pass "
                        "--nodelist 'node[01-04]'")
    scontrol = shutil.which("scontrol", path=env.get("PATH", os.defpath))
    if scontrol is None:
        raise UserError("scontrol is not on PATH: run this on a SLURM node (login or compute), or write the "
                        "hostfile yourself, one 'host slots=N' line per node")
    cmd = [scontrol, "show", "hostnames", nodelist]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=dict(env), timeout=_SCONTROL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"`scontrol show hostnames {nodelist}` did not answer within {_SCONTROL_TIMEOUT_S} s: "
                        "is slurmctld reachable from here?") from None
    if result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise UserError(f"`scontrol show hostnames {nodelist}` failed (exit {result.returncode}"
                        f"{': ' + said[-1] if said else ''}): check --nodelist or SLURM_JOB_NODELIST")
    hosts = result.stdout.split()
    if not hosts:
        raise UserError(f"`scontrol show hostnames {nodelist}` printed no hosts: check --nodelist or "
                        "SLURM_JOB_NODELIST")
    repeated = sorted({h for h in hosts if hosts.count(h) > 1})
    if repeated:
        raise UserError(f"node list {nodelist} names {', '.join(repeated)} more than once: list each node once "
                        "(DeepSpeed refuses a hostfile with a repeated host)")
    return hosts


def parse_gpu_count(value: str, name: str = "the GPU count") -> int:
    """GPUs per node from SLURM's forms: '4', 'gpu:4', 'a100:4', 'gpu:a100:4', several types
    comma-separated ('a100:2,v100:2' is 4), a trailing socket binding '(S:0-1)' ignored."""
    total = 0
    for item in value.split(","):
        item = re.sub(r"\(.*\)$", "", item.strip())
        count = item.rpartition(":")[2]
        if not count.isdigit():
            raise UserError(f"{name}={value!r} is not a GPU count like 4, gpu:4 or a100:4: pass --slots N")
        total += int(count)
    return total


def slots_per_node(env: Mapping[str, str] | None = None, slots: int | None = None) -> int:
    """Processes (GPUs) per node: `slots` if given, else the allocation's GPUs per node, else its
    SLURM_NTASKS_PER_NODE."""
    env = os.environ if env is None else env
    if slots is not None:
        if slots < 1:
            raise UserError(f"--slots {slots}: give a positive number of processes (GPUs) per node")
        return slots
    for name in GPU_COUNT_VARIABLES:
        value = env.get(name, "").strip()
        if value:
            count = parse_gpu_count(value, name)
            if count < 1:
                raise UserError(f"{name}={value!r} gives no GPUs per node: pass --slots N")
            return count
    tasks = env.get("SLURM_NTASKS_PER_NODE", "").strip()
    if tasks:
        if not tasks.isdigit() or int(tasks) < 1:
            raise UserError(f"SLURM_NTASKS_PER_NODE={tasks!r} is not a positive count: pass --slots N")
        return int(tasks)
    raise UserError("no slot count: pass --slots N, or run in an allocation made with --gpus-per-node "
                    "(SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE) or --ntasks-per-node")


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    """DeepSpeed's hostfile: one `host slots=N` line per node; the first host is node rank 0."""
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def write_hostfile(path: Path, hosts: Sequence[str], slots: int) -> Path:
    """Write the hostfile atomically (temporary sibling, fsync, rename): a reader on another node of a
    shared filesystem sees the old file or the whole new one."""
    from skeleton_ds.checkpoint import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # fsyncs the temporary before the rename, and the directory after
        tmp.write_text(hostfile_text(hosts, slots))
    return path


def slurm_hostfile(out: Path, nodelist: str | None = None, slots: int | None = None,
                   env: Mapping[str, str] | None = None) -> tuple[list[str], int]:
    """Expand `nodelist` (default: SLURM_JOB_NODELIST), count the slots, write the hostfile to `out`."""
    env = os.environ if env is None else env
    if nodelist is None:
        nodelist = env.get("SLURM_JOB_NODELIST", "") or env.get("SLURM_NODELIST", "")
        if not nodelist.strip():
            raise UserError("no node list: SLURM_JOB_NODELIST is unset (not inside a SLURM allocation); pass "
                            "--nodelist 'node[01-04]' or run inside sbatch/salloc")
    count = slots_per_node(env, slots)  # before scontrol: a missing count fails without a round trip
    hosts = expand_nodelist(nodelist, env)
    write_hostfile(out, hosts, count)
    return hosts, count
