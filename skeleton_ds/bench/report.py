"""The rows a run reports (latency, roofline share, speed-ups beside FLOP ratios), its dev accuracy and
its markdown and terminal tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from skeleton_ds import tables
from skeleton_ds.inference import evaluation_examples
from skeleton_ds.tasks import Task, compute_metrics
from skeleton_ds.bench.config import BenchConfig
from skeleton_ds.bench.contenders import Contender
from skeleton_ds.bench.cost import bytes_read, forward_flops, roofline_seconds
from skeleton_ds.bench.timing import quartiles
from skeleton_ds.bench.workloads import Workload

REFERENCES = ("peft", "full")
"""The contenders every row's speed-up is measured against (the fair PEFT contender and our full path)."""


@dataclass(frozen=True)
class Machine:
    """What the cost model needs about the run: element size of the weights and the measured peaks."""
    element_bytes: int
    peak_flop_per_s: float
    peak_bytes_per_s: float


def workload_cost(c: Contender, w: Workload, cfg: BenchConfig, machine: Machine
                  ) -> tuple[float, float | None, str | None]:
    """(FLOPs, roofline seconds, what limits it) of one call on the workload, summed over its batches.
    No roofline for bitsandbytes weights: their kernels compute in a precision whose peak is not measured."""
    flops = roofline = compute = memory = 0.0
    for items, width in zip(w.batches, w.widths()):
        shape = dict(batch=len(items), text=width, head=c.head, labels=2)
        f = forward_flops(c.config, prompt=cfg.prompt_length, prompt_cached=c.prompt_cached, **shape)
        nbytes = bytes_read(c.config, element_bytes=machine.element_bytes, **shape)
        flops += f
        roofline += roofline_seconds(f, nbytes, machine.peak_flop_per_s, machine.peak_bytes_per_s)
        compute += f / machine.peak_flop_per_s
        memory += nbytes / machine.peak_bytes_per_s
    if c.quant != "none":
        return flops, None, None
    return flops, roofline, "FLOPs" if compute >= memory else "bytes"


def summarize(contenders: list[Contender], workloads: list[Workload], cfg: BenchConfig, machine: Machine,
              accuracy: dict[str, dict]) -> list[dict]:
    """One row per contender and workload: latency per batch, throughput, FLOPs, the roofline and the
    share of it reached, speed-ups and the FLOP ratios beside them."""
    rows = []
    for w in workloads:
        cost = {c.name: workload_cost(c, w, cfg, machine) for c in contenders}
        median = {c.name: quartiles(c.seconds[w.key])[1] for c in contenders}
        per_batch = len(w.batches)
        for c in contenders:
            q1, q2, q3 = quartiles(c.seconds[w.key])
            flops, roofline, limit = cost[c.name]
            peak = c.peak_bytes.get(w.key)
            row = {"contender": c.name, "lengths": w.lengths, "batch": w.batch, "examples": w.examples,
                   "batches": per_batch, "ffn_keep": c.ffn_keep, "head_keep": c.head_keep, "quant": c.quant,
                   "parameters": c.parameters, "weight_mib": round(c.weight_bytes / 2**20, 1),
                   "peak_mib": None if peak is None else round(peak / 2**20, 1),
                   "ms_median": round(q2 / per_batch * 1e3, 3), "ms_q1": round(q1 / per_batch * 1e3, 3),
                   "ms_q3": round(q3 / per_batch * 1e3, 3), "examples_per_s": round(w.examples / q2, 2),
                   "gflop": float(f"{flops / per_batch / 1e9:.4g}"), "tflop_per_s": float(f"{flops / q2 / 1e12:.4g}"),
                   "roofline_ms": None if roofline is None else round(roofline / per_batch * 1e3, 3),
                   "roofline_limit": limit, "of_roofline": None if roofline is None else round(roofline / q2, 4)}
            for ref in REFERENCES:
                if ref in cost:
                    speedup, ratio = median[ref] / q2, cost[ref][0] / flops
                    row |= {f"speedup_vs_{ref}": _digits(speedup), f"flop_ratio_vs_{ref}": _digits(ratio),
                            f"of_flop_ratio_vs_{ref}": _digits(speedup / ratio)}
            rows.append(row | ({"accuracy": accuracy[c.name]} if c.name in accuracy else {}))
    return rows


def dev_accuracy(contenders: list[Contender], task: Task, data_dir: Path | None, batch: int) -> dict[str, dict]:
    """Dev metrics of every contender on the real task (PEFT through its own forward)."""
    examples, _ = evaluation_examples(task, data_dir, "dev")
    reference = next(c.predictor for c in contenders if c.predictor is not None)
    items = reference.encode(examples)
    labels = [e.label for e in items]
    out = {}
    for c in contenders:
        logits = torch.cat([c.run(items[i:i + batch]) for i in range(0, len(items), batch)])
        out[c.name] = compute_metrics(task, logits.argmax(-1).tolist(), labels)
    return out


COST_MODEL = ("FLOPs: every projection over the positions computed (the prompt's too without the prompt cache), "
              "attention scores and values over all keys, the output rows computed; bytes read: every layer's "
              "projection weights and the output rows computed, once per batch, and the input tokens' embedding "
              "rows (norms, biases, activations and cached prompt keys/values not counted: a lower bound); "
              "roofline = max(FLOPs / peak matmul FLOP/s, bytes / peak copy bandwidth), per batch")


def _inputs_cell(result: dict, row: dict) -> str:
    return f"fixed {result['settings']['text_length']}" if row["lengths"] == "fixed" else "SST-2 dev"


def _digits(value: float) -> float:
    """Four significant digits: a ratio far below 1 (a tiny model's share of its FLOP ratio) keeps its precision."""
    return float(f"{value:.4g}")


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def _table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = result["rows"]
    refs = [r for r in ("peft", "peft-full-logits", "full") if f"speedup_vs_{r}" in rows[0]]  # (the
    # H100 table of format 1 was measured against peft-full-logits)
    header = ["contender", "inputs", "batch", "params (M)", "weights MiB", "peak MiB", "GFLOP/batch",
              "ms/batch median (q1-q3)", "examples/s", "roofline ms/batch (limit)", "of roofline"]
    header += [f"x {r} (FLOP ratio, % of it)" for r in refs] + (["accuracy"] if "accuracy" in rows[0] else [])
    table = []
    for r in rows:
        roofline = "-" if r.get("roofline_ms") is None else f"{r['roofline_ms']:.1f} ({r['roofline_limit']})"
        cells = [r["contender"], _inputs_cell(result, r), str(r["batch"]), f"{r['parameters'] / 1e6:.1f}",
                 f"{r['weight_mib']:.0f}", "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
                 f"{r['gflop']:.1f}",
                 f"{r['ms_median']:.1f} ({r['ms_q1']:.1f}-{r['ms_q3']:.1f})", f"{r['examples_per_s']:.1f}",
                 roofline, _percent(r.get("of_roofline"))]
        cells += [f"{r[f'speedup_vs_{ref}']:.2f} ({r[f'flop_ratio_vs_{ref}']:.2f}, "
                  f"{_percent(r[f'of_flop_ratio_vs_{ref}'])})" for ref in refs]
        if "accuracy" in rows[0]:
            cells.append(f"{r['accuracy']['accuracy']:.4f}" if "accuracy" in r else "-")
        table.append(cells)
    return header, table


def markdown_table(result: dict) -> str:
    """The tables as Markdown (bench.md), for READMEs and reports: the rows; when recorded, each
    workload's inputs and the measured peaks with the code version; the profile (--profile)."""
    lines = tables.markdown_table(*_table(result))
    if result.get("workloads"):
        lines += [""] + tables.markdown_table(
            ["inputs", "batch", "examples per call", "batches", "tokens per example, mean (min-max)", "padding"],
            [[_inputs_cell(result, w), str(w["batch"]), str(w["examples"]), str(w["batches"]),
              f"{w['tokens_mean']:.1f} ({w['tokens_min']}-{w['tokens_max']})", f"{w['padding_share']:.1%}"]
             for w in result["workloads"]])
    if result.get("peaks"):
        p, made = result["peaks"], result["provenance"]
        lines += [""] + tables.markdown_table(
            ["peak matmul TFLOP/s", "peak copy GB/s", "code", "load average (1 min)", "date"],
            [[f"{p['matmul_tflop_per_s']:.3g} ({p['matmul']})", f"{p['copy_gb_per_s']:.3g} ({p['copy']})",
              made["code_version"], str(made["device"].get("load_average_1min", "-")), made["date"]]])
    if result["profiles"]:  # --profile: where one batch's time goes
        lines += [""] + tables.markdown_table(
            ["profiled", "batch", "ms wall", "ms in PyTorch operators", "outside operators", "top operators (ms)"],
            [[p["contender"], str(p["batch"]), f"{p['wall_ms']:.1f}", f"{p['aten_self_ms']:.1f}",
              f"{p['outside_ops_share']:.1%}", ", ".join(f"{o['op']} {o['ms']:.1f}" for o in p["top_ops"])]
             for p in result["profiles"]])
    return "\n".join(lines) + "\n"


def print_summary(result: dict, output: Path) -> None:
    """The rich table of a run_bench result."""
    from skeleton_ds.ui import print_table

    header, table = _table(result)
    env = result["environment"]
    print_table(f"{result['shape']}: {env['device']}, {env['dtype']}, {env['threads']} threads, {env['date']}",
                header, table, caption=f"{output / 'bench.json'}, {output / 'bench.png'}")
    peaks = result["peaks"]
    print(f"roofline peaks: {peaks['matmul_tflop_per_s']:.3g} TFLOP/s ({peaks['matmul']}), "
          f"{peaks['copy_gb_per_s']:.3g} GB/s ({peaks['copy']})")
    for prof in result["profiles"]:
        ops = ", ".join(f"{o['op']} {o['ms']:.1f}" for o in prof["top_ops"])
        print(f"profile {prof['contender']} batch {prof['batch']}: {prof['wall_ms']:.1f} ms wall, "
              f"{prof['aten_self_ms']:.1f} ms in operators ({100 * prof['outside_ops_share']:.1f}% outside); "
              f"top: {ops}")
