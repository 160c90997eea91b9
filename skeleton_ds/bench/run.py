"""One benchmark run: build the contenders, time them, summarize, write OUTPUT/bench.{json,md,png}."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from skeleton_ds import checkpoint
from skeleton_ds.inference import InferenceConfig
from skeleton_ds.bench.config import BenchConfig, note
from skeleton_ds.bench.contenders import build_contenders
from skeleton_ds.bench.cost import PeakProbe
from skeleton_ds.bench.report import COST_MODEL, Machine, dev_accuracy, markdown_table, summarize
from skeleton_ds.bench.timing import profile_contender, time_contenders
from skeleton_ds.bench.workloads import build_workloads, fixed_inputs

def run_bench(cfg: BenchConfig, command: str | None = None) -> dict:
    """Build, time and summarize every contender; write OUTPUT/bench.{json,md,png}. `command` is what the
    provenance record says was run (default: this process's command line)."""
    from skeleton_ds.provenance import provenance

    infer = InferenceConfig(device=cfg.device, dtype=cfg.dtype)
    device, dtype = infer.torch_device(), infer.torch_dtype()
    began = time.perf_counter()
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="skeleton-bench-") as tmp:
        work = cfg.work_dir or Path(tmp)
        contenders, task = build_contenders(cfg, work)
        seconds["build"] = round(time.perf_counter() - began, 1)
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        vocab = contenders[0].config["vocab_size"]
        full = next(c.predictor for c in contenders if c.name == "full")
        workloads, length_tokenizer = build_workloads(cfg, full, vocab)
        accuracy = dev_accuracy(contenders, task, cfg.data_dir, max(cfg.batch_sizes)) if task is not None else {}
        start = time.perf_counter()
        probe = PeakProbe(device, dtype)
        probe.sample(repeats=3)
        note(f"{len(contenders)} contenders built in {seconds['build']:.1f} s; timing {cfg.rounds} rounds of "
              f"{len(workloads)} workloads")
        time_contenders(contenders, workloads, cfg, device, probe)
        probe.sample(repeats=3)
        peaks = probe.record()
        del probe
        seconds["timing"] = round(time.perf_counter() - start, 1)
        profiles = [profile_contender(c, fixed_inputs(b, cfg.text_length, vocab, cfg.seed), device)
                    for c in contenders if cfg.profile and c.name == "compact-0.3" for b in cfg.batch_sizes]
    seconds["total"] = round(time.perf_counter() - began, 1)
    machine = Machine(torch.tensor([], dtype=dtype).element_size(), peaks["matmul_tflop_per_s"] * 1e12,
                      peaks["copy_gb_per_s"] * 1e9)
    rows = summarize(contenders, workloads, cfg, machine, accuracy)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
           "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        env |= {"gpu_memory_mib": round(torch.cuda.get_device_properties(device).total_memory / 2**20),
                "all_contenders_resident_mib": round(resident / 2**20)}  # every contender's weights at once
    result = {"format": "skeleton_ds.bench/2", "shape": cfg.shape, "provenance": provenance(command),
              "environment": env, "settings": checkpoint.json_record(cfg), "peaks": peaks,
              "cost_model": COST_MODEL, "workloads": [w.record() for w in workloads],
              "length_tokenizer": length_tokenizer, "rows": rows, "profiles": profiles, "seconds": seconds}
    cfg.output.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(cfg.output / "bench.json", result)
    (cfg.output / "bench.md").write_text(markdown_table(result))
    from skeleton_ds.plots import plot_bench

    plot_bench(rows, cfg.output / "bench.png", title=f"{cfg.shape} on {env['device']} ({env['dtype']})")
    return result
