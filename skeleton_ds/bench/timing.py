"""Timing: every contender once per round in a rotated order, so drift hits all alike; peak memory and
an operator profile."""

from __future__ import annotations

import gc
import statistics
import time

import torch

from skeleton_ds import data
from skeleton_ds.inference import sync
from skeleton_ds.bench.config import BenchConfig
from skeleton_ds.bench.contenders import Contender
from skeleton_ds.bench.cost import PeakProbe
from skeleton_ds.bench.workloads import Workload

# ------------------------------------------------------------------ timing
def _run(c: Contender, w: Workload) -> None:
    for items in w.batches:
        c.run(items)


def time_contenders(contenders: list[Contender], workloads: list[Workload], cfg: BenchConfig,
                    device: torch.device, probe: PeakProbe) -> None:
    for w in workloads:
        for c in contenders:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            for _ in range(max(1, cfg.warmup)):
                _run(c, w)
            sync(device)
            if device.type == "cuda":
                c.peak_bytes[w.key] = c.weight_bytes + torch.cuda.max_memory_allocated(device) - before
            c.seconds[w.key] = []
        for r in range(cfg.rounds):
            probe.sample()
            shift = r % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                sync(device)
                start = time.perf_counter()
                _run(c, w)
                sync(device)
                c.seconds[w.key].append(time.perf_counter() - start)


def profile_contender(contender: Contender, items: list[data.Encoded], device: torch.device, repeats: int = 3) -> dict:
    """Where one batch's time goes: torch.profiler's operator self times against the wall clock. What
    no operator accounts for is Python (ours and the model's) between kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    contender.run(items)
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            contender.run(items)
        sync(device)
        wall = (time.perf_counter() - start) / repeats
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    op_us = sum(e.self_cpu_time_total for e in ops) / repeats
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return {"contender": contender.name, "batch": len(items), "wall_ms": round(wall * 1e3, 3),
            "aten_self_ms": round(op_us / 1e3, 3), "outside_ops_share": round(max(0.0, 1 - op_us / 1e6 / wall), 4),
            "top_ops": [{"op": e.key, "ms": round(e.self_cpu_time_total / repeats / 1e3, 3)} for e in top]}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3
