"""Graceful stop for batch jobs: SIGUSR1 (SLURM's warning before the time limit) or SIGTERM
(preemption, `scancel`, the DeepSpeed launcher passing on its own SIGTERM) asks every rank to
finish its current step, save a resumable checkpoint, and exit with PREEMPTED_EXIT_CODE.

The handler only sets a flag: stopping mid-step (inside a collective or a half-applied optimizer
step) could leave ranks disagreeing or a checkpoint torn. The ranks agree on the flag at a step
boundary (a signal may reach one rank and not another, or reach them at different steps), so
they save the same step and stop together. The same command with `--resume` then continues.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING
from collections.abc import Iterator

if TYPE_CHECKING:
    import torch

PREEMPTED_EXIT_CODE = 75
"""EX_TEMPFAIL: stopped on request after saving a checkpoint; the same command with --resume continues."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

STEP_DELAY_ENV = "SKELETON_DS_STEP_DELAY"
"""Test hook: seconds to sleep after every training step and attribution batch, so a test can send a
real signal while a stage is running on a tiny model."""


class Preempted(Exception):
    """Raised on every rank after the checkpoint is saved; the CLI turns it into PREEMPTED_EXIT_CODE."""


_requested: list[int] = []


def _handler(signum, frame) -> None:
    _requested.append(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGUSR1/SIGTERM into a stop request for the block (main thread only); restore afterwards."""
    previous = {s: signal.signal(s, _handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def requested_here() -> bool:
    """Whether this process received a stop signal (no communication)."""
    return bool(_requested)


def signal_name() -> str:
    """What asked this rank to stop, for messages."""
    return signal.Signals(_requested[0]).name if _requested else "a stop signal to another rank"


def flag_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    """1.0 if this rank was asked to stop: add it to a tensor that is all-reduced with SUM anyway, and
    any rank's request stops all of them at the same step."""
    import torch

    return torch.tensor(float(requested_here()), device=device)


def agreed_stop() -> bool:
    """Whether any rank was asked to stop (a collective: every rank must call it at the same point)."""
    import torch.distributed

    if not torch.distributed.is_initialized():
        return requested_here()
    flag = flag_tensor("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(flag)
    return bool(flag.item() > 0)


def step_delay() -> None:
    """The STEP_DELAY_ENV test hook (nothing unless it is set)."""
    seconds = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def reset() -> None:
    """Forget requests (tests that run several stops in one process)."""
    _requested.clear()
