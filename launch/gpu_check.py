"""The GPU check of issue 18, one prepared script for one call of the device machine (one H100/H200,
about 10 minutes with its start). Run through launch/gpu_check.sh, which says how; a CPU dry run on
tiny shapes is in the test suite (tests/test_gpu_check.py):

    python launch/gpu_check.py --device cpu --bench-shape tiny --train-shape tiny --data-dir ../shared/data \\
        --output /tmp/gpu-check --examples 64 --rounds 1 --aligns 64

1. bench: `skeleton-ds bench` on --bench-shape (random weights; llama3-8b by default) in bf16, fixed
   128-token inputs at batch 1, 8 and 32: fair PEFT (last-position logits), full, compact FFN 0.5 / 0.3 /
   0.2 and FFN 0.3 head-pruned (KV keep 0.5), every row eager (--static off), plus full and compact-0.3 at
   static shapes with a captured CUDA graph per bucket (--graphs). Each contender's share of its roofline
   is in the bench record. Then compact-0.3 again at each other --aligns width (128, 256), against full.
   The random base is built once (bench --base-dir) for all of them.
2. train: for ZeRO-2 and ZeRO-3 (one rank; NCCL on CUDA, gloo on CPU), a random-init --train-shape
   decoder (tinyllama-1.1b) on a slice of SST-2 (the generic task: the random model's word-level tokenizer
   has no English, so the verbalizer is two of its words): prompt, attribute, localize, convert, teacher,
   retune and infer, each with its wall seconds, seconds per optimizer step (prompt, retune) and peak GPU memory
   (torch.cuda.max_memory_allocated, reset per stage; on CPU the process's peak RSS). The ZeRO
   configs as shipped: their AdamW runs as torch's (DeepSpeed's torch_adam), so nothing is compiled on the device.

Writes OUT/gpu_check.json (provenance; the commit the device copy was prepared from) after every phase,
atomically, each bench's own record as OUT/<name>.json and the main bench's picture as OUT/bench.png;
models, checkpoints and runs stay in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from skeleton_ds.checkpoint import write_json  # noqa: E402
from skeleton_ds.stage_specs import STAGE_ORDER  # noqa: E402
from skeleton_ds.provenance import provenance  # noqa: E402

TRAIN_STAGES = STAGE_ORDER  # the teacher pass included: decoders distill by default
VERBALIZER = "w5,w6"  # two words of the random model's tokenizer (skeleton_ds.bench.random_base)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the check) | cpu (a dry run)")
    p.add_argument("--output", "--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu-check"),
                   metavar="DIR",
                   help="where gpu_check.json and the bench records go (default $OUT, else runs/gpu-check; --out: "
                        "deprecated alias)")
    p.add_argument("--data-dir", type=Path, default=REPO / ".device" / "data", help="holds SST-2/{train,dev}.tsv")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-check-work"), help="models, checkpoints, runs")
    p.add_argument("--bench-shape", default="llama3-8b")
    p.add_argument("--train-shape", default="tinyllama-1.1b")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--aligns", default="64,128,256", help="FFN width multiples; the first is the main bench's")
    p.add_argument("--examples", type=int, default=256, help="SST-2 training (and dev) examples per ZeRO run")
    p.add_argument("--zero", default="2,3", help="ZeRO stages of the training phase")
    p.add_argument("--phases", default="bench,train")
    p.add_argument("--prepare-data", type=Path, default=None, metavar="GLUE_DIR",
                   help="here, before the call: write the SST-2 slice (--examples lines of each split) and this "
                        "checkout's commit into .device/, then exit")
    p.add_argument("--train-one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one ZeRO run
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> None:
    """What travels to the device: ../shared does not, so a slice of SST-2; .git does not, so the commit."""
    target = REPO / ".device"
    for split in ("train", "dev"):
        lines = (args.prepare_data / "SST-2" / f"{split}.tsv").read_text().splitlines(keepends=True)
        (target / "data" / "SST-2").mkdir(parents=True, exist_ok=True)
        (target / "data" / "SST-2" / f"{split}.tsv").write_text("".join(lines[:args.examples + 1]))
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True, check=True).stdout.strip()
    (target / "commit").write_text(commit + "\n")
    print(f"prepared {target}: SST-2 slices of {args.examples} examples, commit {commit}")


def _record(args: argparse.Namespace) -> dict:
    commit_file = REPO / ".device" / "commit"
    return {"provenance": provenance(),
            "prepared_from": commit_file.read_text().strip() if commit_file.is_file() else None,
            "settings": {k: str(v) for k, v in vars(args).items() if k not in ("prepare_data", "train_one")}}


def _save(args: argparse.Namespace, record: dict) -> None:
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "gpu_check.json", record)


def bench_phase(args: argparse.Namespace, record: dict) -> None:
    import torch

    from skeleton_ds.bench import BenchConfig, random_base, run_bench

    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    aligns = [int(a) for a in args.aligns.split(",")]
    cuda = args.device.startswith("cuda")
    start = time.perf_counter()
    base = random_base(args.bench_shape, args.work / f"base-{args.bench_shape}",
                       torch.bfloat16 if cuda else torch.float32,
                       torch.device(args.device))  # built once for every bench below
    record["bench_base_seconds"] = round(time.perf_counter() - start, 1)
    common = dict(shape=args.bench_shape, base_dir=base, device=args.device, dtype="bf16" if cuda else "fp32",
                  batch_sizes=sizes, text_length=128, rounds=args.rounds, warmup=2)
    # head pruning at FFN 0.3 only, and no compact-1: each 8B compact is 5-11 GB to write, verify and load
    runs = {"bench": BenchConfig(**common, ffn_keeps=(0.5, 0.3, 0.2), head_keep=0.5, head_ffn_keeps=(0.3,),
                                 align=aligns[0], graphs=True, output=args.work / "bench")}
    runs |= {f"align{a}": BenchConfig(**common, ffn_keeps=(0.3,), head_keep=1.0, align=a, skip_peft=True,
                                      output=args.work / f"align{a}") for a in aligns[1:]}
    for name, cfg in runs.items():
        start = time.perf_counter()
        result = run_bench(cfg)
        shutil.copy(cfg.output / "bench.json", args.output / f"{name}.json")
        if name == "bench":
            shutil.copy(cfg.output / "bench.png", args.output / "bench.png")
        record.setdefault("bench", {})[name] = {
            "seconds": round(time.perf_counter() - start, 1), "json": f"{name}.json",
            "rows": [{k: r.get(k) for k in ("contender", "batch", "ms_median", "roofline_ms", "roofline_limit",
                                            "of_roofline", "speedup_vs_full", "flop_ratio_vs_full",
                                            "of_flop_ratio_vs_full", "peak_mib")} for r in result["rows"]]}
        _save(args, record)


def _train_flags(args: argparse.Namespace, base: Path, out: Path, zero: int) -> list[str]:
    data = args.data_dir / "SST-2"
    return ["--model", str(base), "--config", str(REPO / "ds_configs" / f"zero{zero}.json"), "--output", str(out),
            "--task", "generic", "--train-file", str(data / "train.tsv"), "--dev-file", str(data / "dev.tsv"),
            "--text-columns", "sentence", "--label-column", "label", "--label-names", "0,1", "--verbalizer", VERBALIZER,
            "--template", "{sentence} {answer}", "--max-train-examples", str(args.examples),
            "--max-eval-examples", str(args.examples), "--attr-examples", str(min(args.examples, 64)),
            "--batch-size", "16", "--max-length", "64", "--epochs", "1", "--ffn-keep", "0.3", "--head-keep", "0.5"]


def train_one(args: argparse.Namespace) -> None:
    """One ZeRO stage's run, in its own process (a process group per run): every stage, then inference."""
    import torch

    from skeleton_ds.bench import random_base
    from skeleton_ds.config import config_from_args
    from skeleton_ds.inference import InferenceConfig, Predictor
    from skeleton_ds.stages.pipeline import run_pipeline
    from skeleton_ds.tasks import get_task, load_split

    zero, cuda = args.train_one, args.device.startswith("cuda")
    base = args.work / f"base-{args.train_shape}"
    if not (base / "config.json").is_file():
        random_base(args.train_shape, base, torch.bfloat16 if cuda else torch.float32, torch.device(args.device))
    out = args.work / f"zero{zero}"
    shutil.rmtree(out, ignore_errors=True)  # a measurement: no stage may be reused from an earlier run
    flags = _train_flags(args, base, out, zero)

    def peak() -> int:
        if cuda:
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    stages = {}
    for stage in TRAIN_STAGES:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run_pipeline(config_from_args([*flags, "--stages", stage]))
        entry = {"seconds": round(time.perf_counter() - start, 2), "peak_bytes": peak()}
        metrics = out / stage / "metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            if m.get("steps"):
                entry |= {"steps": m["steps"], "seconds_per_step": m["train_seconds"] / m["steps"],
                          "accuracy": m["metrics"]["accuracy"]}
        stages[stage] = entry
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    predictor = Predictor.from_checkpoint(out / "compact", InferenceConfig(device=args.device))
    config = config_from_args(flags)
    dev = load_split(get_task(config.task, config.generic_spec()), "dev", config.data_dir)[:args.examples]
    result = predictor.evaluate(dev)
    stages["infer"] = {"seconds": round(time.perf_counter() - start, 2), "peak_bytes": peak(),
                       "examples_per_s": result["examples_per_s"], "accuracy": result["metrics"]["accuracy"]}
    write_json(args.work / f"train_zero{zero}.json", {"zero": zero, "world_size": 1, "stages": stages,
                                                     "backend": "nccl" if cuda else "gloo"})


def train_phase(args: argparse.Namespace, record: dict) -> None:
    from skeleton_ds.distributed import without_rendezvous

    env = without_rendezvous(os.environ)
    for zero in (int(z) for z in args.zero.split(",")):
        argv = [sys.executable, __file__, "--train-one", str(zero), "--device", args.device,
                "--output", str(args.output), "--work", str(args.work), "--data-dir", str(args.data_dir),
                "--train-shape", args.train_shape, "--examples", str(args.examples)]
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, cwd=REPO)
        entry = {"returncode": done.returncode, "seconds": round(time.perf_counter() - start, 1)}
        result = args.work / f"train_zero{zero}.json"
        if done.returncode == 0 and result.is_file():
            entry |= json.loads(result.read_text())
        record.setdefault("train", {})[f"zero{zero}"] = entry
        _save(args, record)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.prepare_data is not None:
        prepare(args)
        return 0
    if args.train_one is not None:
        train_one(args)
        return 0
    record = _record(args)
    _save(args, record)
    phases = {"bench": bench_phase, "train": train_phase}
    for name in args.phases.split(","):
        start = time.perf_counter()
        phases[name](args, record)
        record.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        _save(args, record)
    failed = [k for k, v in record.get("train", {}).items() if v["returncode"] != 0]
    print(json.dumps({"out": str(args.output / "gpu_check.json"), "seconds": record["seconds"], "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
