"""A measured scale run: the pipeline stages on a ~1.1B-parameter LLaMA under ZeRO-0 (1 rank), ZeRO-3 (2
ranks) and ZeRO-3 with CPU offload (2 ranks), with every rank's resident memory sampled.

    python -m skeleton_ds.experiments.scale_run                # tinyllama-1.1b -> docs/results/scale_run.{json,md}
    python -m skeleton_ds.experiments.scale_run --shape small  # a few MB: a smoke test (scale_run_small.*)
    python -m skeleton_ds.experiments.scale_run --runs zero0,zero3 --work runs/scale --keep-base
    python -m skeleton_ds.experiments.scale_run --shape qwen2.5-1.5b --runs zero0_tuned,zero3_tuned  # real weights
    python -m skeleton_ds.experiments.scale_run --shape qwen2.5-1.5b --runs zero3_tuned --data-dir ../shared/data \
        --train-examples 256 --batch-size 16 --steps 16 --dev-examples 200 --attr-examples 64  # learns SST-2

1. Builds a random-init LLaMA of the shape (TinyLlama: hidden 2048, 22 layers, 32 heads / 4 KV heads,
   intermediate 5632, vocab 32000; 1.1B parameters, fp32) once, as sharded safetensors
   (`save_pretrained(max_shard_size=--shard-size)`), with a small word-level tokenizer, and a
   synthetic two-class CSV task (with --data-dir: real SST-2, and the report adds dev accuracy; its files
   are scale_run_SHAPE_sst2.*). `--keep-base` reuses a finished base in --work. A real shape
   (`--shape qwen2.5-1.5b`) uses the packaged model's converted checkpoint instead: nothing is built.
2. Runs each stage (prompt, attribute, localize, convert, retune) as its own launch, as a user would:
   `deepspeed --num_gpus 2 launch/train.py --config ds_configs/zero3.json ... --stages S` (and
   zero3_offload.json), and `python launch/train.py --config ds_configs/zero0.json ... --stages S`, with
   a few steps of a tiny global batch. Then `skeleton-ds infer` answers with the compact model the launches
   made, in one plain process (its accuracy beside re-tuning's on the same examples, seconds, peak RSS).
3. Samples every process of the launch's tree every --interval seconds (psutil): per rank the peak
   RSS (also the kernel's own high-water mark, VmHWM) and the peak anonymous RSS (RSS less
   file-backed and shared pages: memory-mapped checkpoint pages count in RSS but are page cache).
   Before the stages, a `load` launch runs this script with --probe-load on every rank: only
   loading.load_backbone, as the stages call it, reporting each rank's RSS and high-water mark after it.
4. Reports, per stage and rank, the peaks; the ratio of the largest ZeRO-3 rank's peak to the ZeRO-0
   peak; seconds per optimizer step (DIR/prompt and DIR/retune metrics.json: train_seconds / steps);
   and the convert stage's peak RSS growth on rank 0 (from the sample before its staging directory
   appears) against the largest tensor of the base checkpoint.

A run NAME_tuned (e.g. --runs zero0_tuned,zero3_tuned) adds the two settings the shipped configs lack (see
TUNED_ENV below). After each multi-rank launch the script removes the launch's DeepSpeed shared-memory
buffers from /dev/shm, which DeepSpeed leaves behind (66 MiB per rank). Writes the JSON and Markdown
reports atomically after every run, and prints a table; --render rewrites the Markdown (with --notes)
from the JSON. A measurement, not a test: tests/test_scale_run.py runs `--shape small` end to end.

docs/results/scale_run.md was made with
    python -m skeleton_ds.experiments.scale_run --runs zero0,zero0_tuned,zero3_tuned,zero3_offload_tuned \
        --stage3-limit 1e8
and docs/results/scale_run_before.md (shipped configs, transformers' loader) by the first version with the defaults.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from skeleton_ds.tables import markdown_table
from skeleton_ds.checkpoint import read_header, write_text
from skeleton_ds.distributed import free_port, without_rendezvous
from skeleton_ds.experiments import CHECKOUT, command_line
from skeleton_ds.provenance import provenance
from skeleton_ds.stage_specs import STAGE_ORDER

STAGES = STAGE_ORDER  # the teacher pass included: decoders distill by default
ROWS = ("load", *STAGES)  # "load": a launch that only loads the backbone as the stages do (the load probe)
LLAMA = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
SHAPES = {
    "tinyllama-1.1b": dict(LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
    "small": dict(LLAMA, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2048, max_position_embeddings=256),
}
REAL = ("qwen2.5-1.5b",)
"""Shapes with real weights: the packaged alias's converted checkpoint is the base (nothing is built)."""
RUNS = {  # name: (DeepSpeed config, ranks; 0 = plain python, no launcher)
    "zero0": ("ds_configs/zero0.json", 0),
    "zero3": ("ds_configs/zero3.json", 2),
    "zero3_offload": ("ds_configs/zero3_offload.json", 2),
}
LIMIT_KEYS = ("stage3_max_live_parameters", "stage3_max_reuse_distance")
TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
"""A run NAME_tuned is run NAME with glibc's mmap threshold fixed at 1 MiB (TUNED_ENV;
by default it grows up to 32 MiB as large blocks are freed, and ZeRO-3's gathered weights of 2-32 MiB then stay
in the heap after release) and, for ZeRO-3, the shipped config with LIMIT_KEYS set to --stage3-limit
(DeepSpeed's defaults, 1e9 elements each, keep a gathered parameter while it is used again within 1e9
elements of the module order: with a backward pass through frozen weights that is nearly all of a 1B
model)."""

# The synthetic task of tests/conftest.py: the label is which sentiment word a sentence holds.
POSITIVE = ["good", "great", "fine", "nice", "happy"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly"]
FILLER = ["the", "movie", "was", "plot", "actor", "story", "very", "quite", "film", "scene"]
VERBALIZER = ["no", "yes"]
WORDS = sorted(set(POSITIVE + NEGATIVE + FILLER + VERBALIZER + ["a", "?", "text", ":", "answer", "it"]
                   + ["Review", "Sentiment", "(", ")", "or", "positive", "negative"]))  # SST-2's decoder template
MIB = 2**20
SEED = 0  # every stage launch's --seed, and so the seeded dev subset infer answers


# ------------------------------------------------------------------ inputs
def write_task(directory: Path, train: int, dev: int) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, seed in (("train", train, 1), ("dev", dev, 2)):
        rng = random.Random(seed)
        path = directory / f"{name}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(n):
                positive = i % 2 == 0
                words = rng.choices(FILLER, k=rng.randint(2, 6))
                words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
                w.writerow([" ".join(words), "pos" if positive else "neg"])
        paths.append(path)
    return paths[0], paths[1]


def build_base(shape: str, directory: Path, shard_size: str) -> dict:
    """Random-init LLaMA of `shape` (bench.random_base), saved in shards of `shard_size`, with a word-level
    tokenizer over the synthetic task's words (the embedding has the shape's full vocabulary). One copy of
    the model in memory (no meta-device trick needed); safetensors serialises one shard at a time."""
    import psutil

    from skeleton_ds.bench import random_base

    start = time.perf_counter()
    config = dict(model_type="llama", **SHAPES[shape])
    parameters = _parameter_count(config)
    random_base(config, directory, words=WORDS, max_shard_size=shard_size)
    peak = _status(os.getpid()).get("VmHWM", 0) / 1024
    info = {"parameters": parameters, "seconds": round(time.perf_counter() - start, 1),
            "build_peak_rss_mib": round(peak),
            "shard_size": shard_size, "system_memory_mib": round(psutil.virtual_memory().total / MIB)}
    (directory / "scale_run_base.json").write_text(json.dumps(info, indent=2))
    return info


def _parameter_count(config: dict) -> int:
    """The model's parameter count, from a meta-device build (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec,
                                                                      tie_word_embeddings=False))
    return sum(p.numel() for p in model.parameters())


def real_base(alias: str) -> tuple[Path, dict]:
    """A packaged model's converted checkpoint (fetched and converted once: skeleton-ds models fetch ALIAS)."""
    import psutil

    from skeleton_ds.packaged_models import resolve_model_path

    base = Path(resolve_model_path(alias))
    parameters = sum(math.prod(info["shape"]) for shard in sorted(base.glob("*.safetensors"))
                     for name, info in read_header(shard)[0].items())
    return base, {"parameters": parameters, "real_weights": alias, "shard_size": "as converted",
                  "system_memory_mib": round(psutil.virtual_memory().total / MIB)}


def checkpoint_summary(directory: Path) -> dict:
    """Shards, total bytes and the largest tensor, from the safetensors headers alone."""
    shards = sorted(directory.glob("*.safetensors"))
    largest, total = ("", 0), 0
    for shard in shards:
        for name, info in read_header(shard)[0].items():
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            total += nbytes
            largest = max(largest, (name, nbytes), key=lambda x: x[1])
    return {"shards": len(shards), "largest_shard_mib": round(max(s.stat().st_size for s in shards) / MIB, 1),
            "checkpoint_mib": round(total / MIB, 1), "largest_tensor": largest[0],
            "largest_tensor_mib": round(largest[1] / MIB, 1)}


# ---------------------------------------------------------------- sampling
def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of /proc/PID/status, in KiB."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


@dataclass
class RankTrace:
    pid: int
    peak_rss: float = 0.0  # MiB, sampled
    peak_anon: float = 0.0
    hwm: float = 0.0  # the kernel's high-water mark of RSS, last read
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since launch, RSS MiB)


class TreeSampler:
    """Samples the RSS of every process under `root` every `interval` seconds, on a thread.

    A rank is a process running launch/train.py that is not the DeepSpeed launcher: under
    `deepspeed` the one with RANK in its environment (set by deepspeed.launcher.launch), under
    plain python the root itself (rank 0). Other processes (launcher, compilers) count as "other"."""

    def __init__(self, root: int, *, direct: bool, interval: float, watch: list[Path] | None = None):
        self.root, self.direct, self.interval, self.watch = root, direct, interval, watch
        self.ranks: dict[int, RankTrace] = {}
        self.other_peak = 0.0
        self.tree_peak = 0.0  # largest sum over all processes at one sample
        self.watch_seen: float | None = None  # when a path matching one of the `watch` globs first appeared
        self._kind: dict[tuple[int, str], int | None] = {}
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _rank_of(self, proc) -> int | None:
        """Decided once per (pid, command line): a rank forked by the launcher still shows the launcher's
        command line and environment until it execs, and must be looked at again after that."""
        import psutil

        if self.direct:
            return 0 if proc.pid == self.root else None
        try:
            cmd = " ".join(proc.cmdline())
            key = (proc.pid, cmd)
            if key not in self._kind:
                env = proc.environ()
                is_rank = "RANK" in env and ("train.py" in cmd or "--probe-load" in cmd)
                self._kind[key] = int(env["RANK"]) if is_rank else None
        except (psutil.Error, ValueError):
            return None
        return self._kind[key]

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root)
        except psutil.Error:
            return
        while not self._stop.is_set():
            now = time.perf_counter() - self._t0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            total = 0.0
            for proc in procs:
                status = _status(proc.pid)
                if "VmRSS" not in status:
                    continue
                rss = status["VmRSS"] / 1024
                total += rss
                rank = self._rank_of(proc)
                if rank is None:
                    self.other_peak = max(self.other_peak, rss)
                    continue
                trace = self.ranks.setdefault(rank, RankTrace(proc.pid))
                trace.peak_rss = max(trace.peak_rss, rss)
                trace.peak_anon = max(trace.peak_anon, status.get("RssAnon", 0) / 1024)
                trace.hwm = max(trace.hwm, status.get("VmHWM", 0) / 1024)
                trace.samples.append((now, rss))
            self.tree_peak = max(self.tree_peak, total)
            if self.watch and self.watch_seen is None and any(any(w.parent.glob(w.name)) for w in self.watch):
                self.watch_seen = now
            self._stop.wait(self.interval)


# --------------------------------------------------------------------- runs
def tuned_settings(limit: int, prefetch: int | None) -> dict[str, int]:
    """The zero_optimization keys a ZeRO-3 NAME_tuned run sets over the shipped config."""
    settings = {k: limit for k in LIMIT_KEYS}
    if prefetch is not None:
        settings["stage3_prefetch_bucket_size"] = prefetch
    return settings


def run_config(run: str, work: Path, limit: int, prefetch: int | None = None) -> tuple[str, int]:
    """(DeepSpeed config path, ranks) of a run; a ZeRO-3 NAME_tuned run gets a patched copy in WORK/ds_configs."""
    shipped, ranks = RUNS[run.removesuffix("_tuned")]
    if not run.endswith("_tuned") or not ranks:
        return shipped, ranks
    cfg = json.loads((CHECKOUT / shipped).read_text())
    cfg["zero_optimization"].update(tuned_settings(limit, prefetch))
    path = work / "ds_configs" / f"{run}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return str(path), ranks


def _launcher(ranks: int) -> list[str]:
    python = Path(sys.executable)
    if ranks:
        return [str(python.parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    return [str(python)]


def task_flags(files: tuple[Path, Path] | None, data_dir: Path | None) -> list[str]:
    """The synthetic task's files, or real SST-2 with its own template and verbalizer (--data-dir)."""
    if data_dir is not None:
        return ["--task", "sst2", "--data-dir", str(data_dir)]
    train, dev = files
    return ["--task", "generic", "--train-file", str(train), "--dev-file", str(dev), "--text-columns", "text",
            "--label-names", "neg,pos", "--verbalizer", ",".join(VERBALIZER), "--template", "{text} ? {answer}"]


def stage_command(config: str, ranks: int, stage: str, base: Path, task: list[str], out: Path,
                  flags: list[str]) -> list[str]:
    return [*_launcher(ranks), "launch/train.py", "--config", config, "--model", str(base), "--output", str(out),
            *task, *flags, "--stages", stage]


def stage_flags(args: argparse.Namespace) -> list[str]:
    """Memory runs: a few steps on the synthetic task, two KV groups in four cut. A --data-dir run learns SST-2:
    the size plan's prompt and sequence lengths, the decoder's default localization (every KV group kept)."""
    align = "32" if args.shape == "small" else "64"
    real = args.data_dir is not None
    return ["--batch-size", str(args.batch_size), "--prompt-length", "20" if real else "4",
            "--max-length", "128" if real else "32", "--max-steps", str(args.steps),
            "--max-train-examples", str(args.train_examples), "--max-eval-examples", str(args.dev_examples),
            "--attr-examples", str(args.attr_examples), "--save-every", "1000", "--seed", str(SEED),
            "--ffn-keep", "0.3", "--head-keep", "1.0" if real else "0.5", "--align", align]


def run_stage(cmd: list[str], log: Path, *, direct: bool, interval: float, watch: list[Path] | None,
              extra_env: dict[str, str]) -> tuple[int, float, TreeSampler]:
    env = without_rendezvous(os.environ) | extra_env
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=CHECKOUT, env=env, stdout=f, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, direct=direct, interval=interval, watch=watch).start()
        code = proc.wait()
        sampler.stop()
    if "--master_port" in cmd:
        remove_shm_buffers(cmd[cmd.index("--master_port") + 1])
    return code, time.perf_counter() - start, sampler


def remove_shm_buffers(port: str) -> int:
    """DeepSpeed's CPU shared-memory allreduce (ops/csrc/cpu/comm/shm.cpp) creates one 66 MiB file per rank in
    /dev/shm, named after the master port, and never unlinks it: each multi-rank launch would leave 2 x 66 MiB
    of RAM behind. Remove this launch's (its ranks have exited). Returns the bytes freed."""
    freed = 0
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        freed += path.stat().st_size
        path.unlink(missing_ok=True)
    return freed


def seconds_per_step(run_dir: Path, stage: str) -> float | None:
    path = run_dir / stage / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    return round(m["train_seconds"] / m["steps"], 2) if m.get("steps") else None


def conversion_growth(sampler: TreeSampler) -> dict:
    """Rank 0's peak RSS from the start of the conversion (its staging directory appearing) less the RSS just before."""
    trace = sampler.ranks.get(0)
    if trace is None or not trace.samples:
        return {}
    seen = sampler.watch_seen
    before = [rss for t, rss in trace.samples if seen is None or t < seen]
    after = [rss for t, rss in trace.samples if seen is not None and t >= seen]
    baseline = before[-1] if before else trace.samples[0][1]
    peak = max(after) if after else trace.peak_rss
    return {"baseline_mib": round(baseline), "peak_mib": round(peak), "growth_mib": round(peak - baseline),
            "staging_seen": seen is not None}


def measure(run: str, args, base: Path, task: list[str], flags: list[str]) -> dict:
    config, ranks = run_config(run, args.work, args.stage3_limit, args.stage3_prefetch)
    out = args.work / "runs" / run
    shutil.rmtree(out, ignore_errors=True)
    result = {"config": config, "ranks": max(ranks, 1), "launcher": "deepspeed" if ranks else "python",
              "output": str(out), "stages": {}}
    env = TUNED_ENV if run.endswith("_tuned") else {}
    if run.endswith("_tuned") and ranks:
        result["config"] = f"{RUNS[run.removesuffix('_tuned')][0]} with " + ", ".join(
            f"{k}={v:g}" for k, v in tuned_settings(args.stage3_limit, args.stage3_prefetch).items())
    result["env"] = env
    for stage in ("load", *STAGES):
        if stage == "load":  # the backbone load alone, as the stages do it: the load probe on every rank
            cmd = [*_launcher(ranks), "--module" if ranks else "-m", "skeleton_ds.experiments.scale_run",
                   "--probe-load", str(base), config]  # as a module: the checkout's package (cwd), not a copy
        else:
            cmd = stage_command(config, ranks, stage, base, task, out, flags)
        # the conversion starts when its staging directory appears (a small model's is renamed to compact/ at once)
        watch = [out / ".compact.partial-*", out / "compact"] if stage == "convert" else None
        log = args.work / "logs" / f"{run}-{stage}.log"
        print(f"[scale_run] {run} {stage}: {shlex.join(cmd[:6])} ...", flush=True)
        code, wall, sampler = run_stage(cmd, log, direct=not ranks, interval=args.interval, watch=watch, extra_env=env)
        if code != 0:
            raise SystemExit(f"[scale_run] {run} {stage} exited {code}; log tail:\n{log.read_text()[-4000:]}")
        entry = {"wall_s": round(wall, 1), "tree_peak_rss_mib": round(sampler.tree_peak),
                 "other_peak_rss_mib": round(sampler.other_peak),
                 "ranks": {str(r): {"peak_rss_mib": round(t.peak_rss), "hwm_mib": round(t.hwm),
                                    "peak_anon_mib": round(t.peak_anon)} for r, t in sorted(sampler.ranks.items())}}
        timeline = {str(r): [(round(t, 1), round(v)) for t, v in trace.samples] for r, trace in sampler.ranks.items()}
        log.with_suffix(".rss.json").write_text(json.dumps(timeline))
        if stage == "load":
            probes = [json.loads(m) for m in re.findall(r"SCALE_RUN_PROBE (\{[^}]*\})", log.read_text())]
            entry["after_load"] = {str(p["rank"]): p for p in sorted(probes, key=lambda p: p["rank"])}
        if stage == "convert":
            entry["conversion"] = conversion_growth(sampler)
        result["stages"][stage] = entry
        ranks_text = ", ".join(f"rank {r} {v['peak_rss_mib']} MiB (anon {v['peak_anon_mib']})"
                               for r, v in entry["ranks"].items())
        print(f"[scale_run] {run} {stage}: {wall:.0f} s, peak RSS {ranks_text}", flush=True)
    result["seconds_per_step"] = {s: seconds_per_step(out, s) for s in ("prompt", "retune")}
    prompt = json.loads((out / "prompt" / "metrics.json").read_text())
    result["backbone_fraction_on_rank0"] = prompt.get("backbone_fraction_on_rank0")
    ckpt = out / "checkpoints" / "prompt"
    result["prompt_checkpoint_mib"] = round(sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / MIB, 2)
    summary = json.loads((out / "metrics.json").read_text())
    result["accuracy"] = {"dev_examples": prompt.get("dev_examples"),
                          **{k: (summary.get(k) or {}).get("accuracy")
                             for k in ("full_prompt_tuned", "skeleton_before_retune", "skeleton_after_retune")}}
    conversion = json.loads((out / "conversion.json").read_text())
    result["parameters_full"], result["parameters_compact"] = (conversion["parameters_full"],
                                                               conversion["parameters_compact"])
    result["infer"] = infer = measure_infer(args, out, task, run)
    print(f"[scale_run] {run} infer: {infer['wall_s']:.0f} s, peak RSS {infer['peak_rss_mib']} MiB, "
          f"accuracy {infer['accuracy']:.3f} (re-tuning measured "
          f"{result['accuracy']['skeleton_after_retune']:.3f})", flush=True)
    if not args.keep_outputs:
        shutil.rmtree(out / "compact", ignore_errors=True)
    return result


def infer_command(out: Path, task: list[str], dev_examples: int) -> list[str]:
    """`skeleton-ds infer` on the run's compact model, as a user answers with it: one plain process, no launcher.
    SST-2: the seeded dev subset the stages evaluated (same cap, same seed). The synthetic task has no built-in
    split: the rows of its dev file that the stages evaluated become labelled JSON Lines records to label."""
    from skeleton_ds.tasks import subset

    cmd = [sys.executable, "-m", "skeleton_ds", "infer", "--checkpoint", str(out / "compact")]
    if "--data-dir" in task:
        return cmd + [*task, "--split", "dev", "--max-examples", str(dev_examples), "--seed", str(SEED)]
    records = out / "infer_input.jsonl"
    with open(task[task.index("--dev-file") + 1], newline="") as f:
        rows = subset(list(csv.DictReader(f)), dev_examples, SEED)  # as the stages' --max-eval-examples
    records.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return cmd + ["--input", str(records), "--output", str(out / "infer.jsonl")]


def measure_infer(args, out: Path, task: list[str], run: str) -> dict:
    """The compact model this run made under its launcher, answered by `skeleton-ds infer`: peak RSS, seconds, and
    its accuracy beside the one re-tuning measured on the same examples (the same prompt, so they agree unless a
    near-tie flips)."""
    cmd = infer_command(out, task, args.dev_examples)
    log = args.work / "logs" / f"{run}-infer.log"
    print(f"[scale_run] {run} infer: {shlex.join(cmd[1:6])} ...", flush=True)
    code, wall, sampler = run_stage(cmd, log, direct=True, interval=args.interval, watch=None, extra_env={})
    if code != 0:
        raise SystemExit(f"[scale_run] {run} infer exited {code}; log tail:\n{log.read_text()[-4000:]}")
    trace = sampler.ranks.get(0, RankTrace(0))  # never sampled only if it exited within one interval
    if "--input" in cmd:
        predictions = [json.loads(line) for line in (out / "infer.jsonl").read_text().splitlines()]
        labels = [json.loads(line)["label"] for line in (out / "infer_input.jsonl").read_text().splitlines()]
        if len(predictions) != len(labels):
            raise SystemExit(f"[scale_run] {run} infer answered {len(predictions)} of {len(labels)} records")
        accuracy, examples = sum(p["label"] == y for p, y in zip(predictions, labels)) / len(labels), len(labels)
    else:  # the evaluation result is infer's one JSON line on stdout
        answer = json.loads(next(line for line in log.read_text().splitlines() if line.startswith("{")))
        accuracy, examples = answer["metrics"]["accuracy"], answer["examples"]
    return {"command": shlex.join(["skeleton-ds", *cmd[3:]]), "wall_s": round(wall, 1),
            "peak_rss_mib": round(max(trace.peak_rss, trace.hwm)), "peak_anon_mib": round(trace.peak_anon),
            "examples": examples, "accuracy": accuracy}


def peak(stage: dict, key: str = "peak_rss_mib") -> float:
    """The largest rank's peak: the sampled peak or, for RSS, the kernel high-water mark if higher."""
    values = [max(r[key], r["hwm_mib"]) if key == "peak_rss_mib" else r[key] for r in stage["ranks"].values()]
    return max(values)


def ratios(runs: dict) -> dict:
    """Per stage: largest ZeRO-3 rank's peak / the ZeRO-0 rank's peak (RSS and anonymous RSS); a NAME_tuned
    run is compared with zero0_tuned when there is one."""
    out = {}
    for run in runs:
        ref = "zero0_tuned" if run.endswith("_tuned") and "zero0_tuned" in runs else "zero0"
        if run.startswith("zero0") or ref not in runs:
            continue
        a, b = runs[run]["stages"], runs[ref]["stages"]
        out[run] = {stage: {"rss": round(peak(a[stage]) / peak(b[stage]), 3),
                            "anon": round(peak(a[stage], "peak_anon_mib") / peak(b[stage], "peak_anon_mib"), 3),
                            "vs": ref} for stage in measured_rows(runs)}
    return out


def measured_rows(runs: dict) -> tuple[str, ...]:
    """The ROWS a record measured (one made before the teacher stage existed has no teacher row)."""
    first = next(iter(runs.values()))["stages"]
    return tuple(stage for stage in ROWS if stage in first)


# ------------------------------------------------------------------ report
def table(result: dict) -> tuple[list[str], list[list[str]]]:
    """One row per run and rank: peak RSS (anonymous RSS) per stage in MiB, and seconds per step; after each
    ZeRO-3 run, its ratio row (largest rank's peak over the ZeRO-0 peak)."""
    runs, rat = result["runs"], result["ratios"]
    stages = measured_rows(runs)
    header = ["run", "rank", *stages, "s/step prompt", "s/step retune"]
    rows = []
    for run, r in runs.items():
        for k in range(r["ranks"]):
            row = [run, str(k)]
            for stage in stages:
                v = r["stages"][stage]["ranks"].get(str(k))
                row.append("-" if v is None else f"{max(v['peak_rss_mib'], v['hwm_mib'])} ({v['peak_anon_mib']})")
            steps = r["seconds_per_step"]
            row += [str(steps["prompt"]), str(steps["retune"])] if k == 0 else ["", ""]
            rows.append(row)
        if run in rat:
            rows.append([run, f"/ {rat[run]['prompt']['vs']}"]
                        + [f"{rat[run][s]['rss']:.2f} ({rat[run][s]['anon']:.2f})" for s in stages] + ["", ""])
    return header, rows


def summary_table(result: dict) -> list[str]:
    """The cluster guide's table: per training stage, the largest rank's peak RSS (MiB) of each ZeRO-3 run and its
    ratio to the ZeRO-0 run it is compared with."""
    runs, rat = result["runs"], result["ratios"]
    ref = next(iter(rat.values()))["prompt"]["vs"] if rat else None
    if ref is None:
        return []
    names = {run: ("ZeRO-3 offload" if "offload" in run else "ZeRO-3") + f", {runs[run]['ranks']} ranks (ratio)"
             for run in rat}
    lines = markdown_table(["stage", "ZeRO-0", *names.values()])
    compact = f"retune ({runs[ref]['parameters_compact'] / 1e6:.0f}M compact)"
    for stage in ("prompt", "attribute", "retune"):
        cells = [f"{peak(runs[run]['stages'][stage]):.0f} ({rat[run][stage]['rss']:.2f})" for run in rat]
        label = compact if stage == "retune" else stage
        lines.append(f"| {label} | {peak(runs[ref]['stages'][stage]):.0f} MiB | " + " | ".join(cells) + " |")
    return lines


def accuracy_table(result: dict) -> list[str]:
    """A --data-dir run's guide table: per run, SST-2 dev accuracy (full prompt tuning, the compact model before and
    after re-tuning), seconds per step and the largest rank's peak RSS in the stages that hold the model."""
    if result.get("task") != "sst2":
        return []
    inferred = all("infer" in r for r in result["runs"].values())  # a record made before the infer row has none
    lines = markdown_table(["run", "ranks", "dev examples", "full prompt tuning", "compact before re-tuning",
                            "compact after re-tuning", *(["compact, `skeleton-ds infer`"] if inferred else []),
                            "s/step prompt", "s/step retune", "peak RSS prompt", "peak RSS attribute",
                            "peak RSS retune", *(["peak RSS infer"] if inferred else [])])
    for run, r in result["runs"].items():
        a, steps = r["accuracy"], r["seconds_per_step"]
        infer = r.get("infer") if inferred else None
        lines.append(f"| {run} | {r['ranks']} | {a['dev_examples']} | {a['full_prompt_tuned']:.3f} "
                     f"| {a['skeleton_before_retune']:.3f} | {a['skeleton_after_retune']:.3f} "
                     + (f"| {infer['accuracy']:.3f} " if infer else "")
                     + f"| {steps['prompt']} | {steps['retune']} | "
                     + " | ".join(f"{peak(r['stages'][s]):.0f} MiB" for s in ("prompt", "attribute", "retune"))
                     + (f" | {infer['peak_rss_mib']} MiB" if infer else "") + " |")
    return lines


def guide_table(result: dict) -> list[str]:
    """What docs/cluster.md shows of a record: the ratio summary, and a --data-dir run's accuracy table."""
    summary, accuracy = summary_table(result), accuracy_table(result)
    return summary + ([""] if summary and accuracy else []) + accuracy


def markdown(result: dict) -> str:
    header, rows = table(result)
    summary, accuracy = summary_table(result), accuracy_table(result)
    base = result["base"]
    weights = f"real weights (`--model {base['real_weights']}`)" if base.get("real_weights") else "random weights"
    built = ("The packaged model's converted checkpoint, used as it is." if base.get("real_weights") else
             f"Built (random init, then save_pretrained) in {base['seconds']} s at a peak RSS of "
             f"{base['build_peak_rss_mib']} MiB: one copy of the model.")
    lines = [f"# Scale run: {result['shape']} ({base['parameters'] / 1e9:.2f}B parameters, fp32, {weights})", "",
             f"Measured {result['date']} on {result['environment']['machine']}.", "", "Command:", "", "```bash",
             result["command"], "```", "",
             *(["Summary: the largest rank's peak RSS per training stage, in MiB, and its ratio to ZeRO-0:", "",
                *summary, ""] if summary else []),
             *(["Dev accuracy on SST-2 (the seeded dev subset; each run's DIR/metrics.json) and the largest rank's "
                "peak RSS:", "", *accuracy, ""] if accuracy else []),
             f"Base checkpoint: {base['checkpoint_mib']:.0f} MiB in {base['shards']} safetensors shards "
             f"(`save_pretrained(max_shard_size=\"{base['shard_size']}\")`, "
             f"largest shard {base['largest_shard_mib']:.0f} MiB); "
             f"largest tensor `{base['largest_tensor']}` {base['largest_tensor_mib']:.0f} MiB. {built}", "",
             "Stage flags (every run): `" + " ".join(result["stage_flags"]) + "`", "",
             "Runs: " + "; ".join(f"`{run}` {r['launcher']} x {r['ranks']}, {r['config']}"
                                  + (" + " + " ".join(f"{k}={v}" for k, v in r["env"].items()) if r["env"] else "")
                                  for run, r in result["runs"].items()) + ".", "",
             "Peak resident memory per stage launch and rank, in MiB: RSS (the larger of the 0.2 s samples and the "
             "kernel's VmHWM) and, in brackets, anonymous RSS (RSS less file-backed pages such as a memory-mapped "
             "checkpoint); `load` is a launch that only loads the backbone as the stages do. Ratio rows (`/ zero0`): "
             "the largest ZeRO-3 rank's peak over the ZeRO-0 peak. Seconds per optimizer step: DIR/prompt and "
             "DIR/retune metrics.json, train_seconds / steps.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Conversion (rank 0, streaming from the on-disk base): peak RSS growth over the RSS before it "
                  f"started (sampled; and the process's VmHWM less the same), against the largest base tensor "
                  f"({base['largest_tensor_mib']:.0f} MiB):", ""]
    for run, r in result["runs"].items():
        c = r["stages"]["convert"].get("conversion", {})
        if c:
            hwm = r["stages"]["convert"]["ranks"]["0"]["hwm_mib"] - c["baseline_mib"]  # the process's own peak
            lines.append(f"- {run}: {c['baseline_mib']} -> {c['peak_mib']} MiB, growth **{c['growth_mib']} MiB** = "
                         f"{c['growth_mib'] / base['largest_tensor_mib']:.2f} x the largest tensor (by VmHWM: "
                         f"{hwm} MiB = {hwm / base['largest_tensor_mib']:.2f} x)")
    lines += ["", "Load probe (`scale_run --probe-load`, the backbone load alone under the run's launcher "
                  "and config): seconds, share of the backbone stored per rank, RSS per rank right after loading:", ""]
    for run, r in result["runs"].items():
        after = r["stages"]["load"].get("after_load", {})
        lines.append(f"- {run}: " + "; ".join(f"rank {k} {v['seconds']} s, share {v['fraction']}, "
                                                 f"RSS {v['rss_mib']} MiB "
                                                f"(anon {v['anon_mib']})" for k, v in after.items()))
    lines += ["", "Per run: backbone share stored on rank 0 (prompt stage), prompt-stage DeepSpeed checkpoint size, "
                  "parameters full -> compact:", ""]
    for run, r in result["runs"].items():
        lines.append(f"- {run}: {r['backbone_fraction_on_rank0']:.3f}, checkpoint {r['prompt_checkpoint_mib']} MiB, "
                     f"{r['parameters_full'] / 1e6:.1f}M -> {r['parameters_compact'] / 1e6:.1f}M; stage wall seconds "
                     + ", ".join(f"{s} {v['wall_s']}" for s, v in r["stages"].items()))
    inferred = {run: r["infer"] for run, r in result["runs"].items() if "infer" in r}
    if inferred:
        lines += ["", "The compact model each run made, answered in one plain process (no launcher, no DeepSpeed) "
                      "as a user would: accuracy against the one re-tuning measured on the same examples, seconds, "
                      "peak RSS:", ""]
        for run, i in inferred.items():
            lines.append(f"- {run}: `{i['command']}`: {i['accuracy']:.3f} on {i['examples']} examples (re-tuning: "
                         f"{result['runs'][run]['accuracy']['skeleton_after_retune']:.3f}), {i['wall_s']} s, "
                         f"peak RSS {i['peak_rss_mib']} MiB (anon {i['peak_anon_mib']})")
    if result.get("notes"):
        lines += ["", result["notes"].rstrip()]
    return "\n".join(lines) + "\n"


def print_result(result: dict, json_path: Path) -> None:
    from skeleton_ds.ui import print_table

    header, rows = table(result)
    base = result["base"]
    print_table(f"{result['shape']}: peak RSS (anon) MiB per stage and rank, {result['date']}", header, rows,
                caption=f"{json_path}; largest tensor {base['largest_tensor_mib']:.0f} MiB")
    for run, r in result["runs"].items():
        c = r["stages"]["convert"].get("conversion", {})
        if c:
            print(f"{run}: conversion peak RSS growth {c['growth_mib']} MiB "
                  f"({c['growth_mib'] / base['largest_tensor_mib']:.2f} x largest tensor "
                  f"{base['largest_tensor_mib']:.0f} MiB)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES) + list(REAL),
                   help="a random-weights LLaMA shape, or a packaged real model "
                        "(fetched first: skeleton-ds models fetch)")
    p.add_argument("--runs", default=",".join(RUNS),
                   help=f"comma list of {','.join(RUNS)}, each also as NAME_tuned (glibc mmap threshold 1 MiB and, "
                        f"for ZeRO-3, --stage3-limit)")
    p.add_argument("--stage3-limit", type=float, default=1e8,
                   help="stage3_max_live_parameters and stage3_max_reuse_distance of the ZeRO-3 NAME_tuned runs")
    p.add_argument("--stage3-prefetch", type=float, default=None,
                   help="stage3_prefetch_bucket_size of the ZeRO-3 NAME_tuned runs (default: DeepSpeed's); 0 gathers "
                        "each module only when it runs, so no prefetched module is held beside it")
    p.add_argument("--work", type=Path, default=None,
                   help="base model, data, run outputs, logs (default runs/scale/SHAPE)")
    p.add_argument("--json", type=Path, default=None,
                   help="default docs/results/scale_run.json (docs/results/scale_run_SHAPE.json)")
    p.add_argument("--md", type=Path, default=None,
                   help="default docs/results/scale_run.md (docs/results/scale_run_SHAPE.md)")
    p.add_argument("--shard-size", default="500MB", help="save_pretrained max_shard_size of the base checkpoint")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of prompt tuning and re-tuning")
    p.add_argument("--batch-size", type=int, default=2, help="global batch")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="learn real SST-2 from this GLUE folder (../shared/data) instead of the synthetic task, "
                        "and report dev accuracy beside memory")
    p.add_argument("--train-examples", type=int, default=16, help="training examples (--max-train-examples)")
    p.add_argument("--dev-examples", type=int, default=4, help="dev examples (--max-eval-examples)")
    p.add_argument("--attr-examples", type=int, default=4, help="attribution examples")
    p.add_argument("--interval", type=float, default=0.2, help="RSS sampling period, seconds")
    p.add_argument("--keep-base", action="store_true", help="reuse a finished base model in --work")
    p.add_argument("--keep-outputs", action="store_true", help="keep the compact models of the runs")
    p.add_argument("--notes", type=Path, default=None, help="Markdown appended to the report (findings)")
    p.add_argument("--render", action="store_true", help="only rewrite --md (and --notes into --json) from --json")
    args = p.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in args.runs if r.removesuffix("_tuned") not in RUNS]
    if bad:
        p.error(f"--runs takes {', '.join(RUNS)} (each also as NAME_tuned); got {', '.join(bad)}")
    args.stage3_limit = int(args.stage3_limit)
    args.stage3_prefetch = None if args.stage3_prefetch is None else int(args.stage3_prefetch)
    suffix = ("" if args.shape == "tinyllama-1.1b" else f"_{args.shape}") + ("_sst2" if args.data_dir else "")
    args.work = args.work or CHECKOUT / "runs" / "scale" / args.shape
    args.json = args.json or CHECKOUT / "docs" / "results" / f"scale_run{suffix}.json"
    args.md = args.md or CHECKOUT / "docs" / "results" / f"scale_run{suffix}.md"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--probe-load" in argv:  # a rank of the load probe (see measure); the launcher adds --local_rank=N
        return probe_load(*[a for a in argv if a != "--probe-load" and not a.startswith("--local_rank")])
    args = parse_args(argv)
    if args.render:
        result = json.loads(args.json.read_text())
        save(result, args)
        print_result(result, args.json)
        return 0
    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, instead of DeepSpeed warning that it guessed
    base = args.work / "base"
    if args.shape in REAL:
        base, info = real_base(args.shape)
        info |= checkpoint_summary(base)
    else:
        if not (args.keep_base and (base / "scale_run_base.json").is_file()):
            print(f"[scale_run] building the {args.shape} base model in {base} (shards of {args.shard_size}) ...",
                  flush=True)
            build_base(args.shape, base, args.shard_size)
        info = json.loads((base / "scale_run_base.json").read_text()) | checkpoint_summary(base)
    print(f"[scale_run] base: {info['parameters'] / 1e6:.1f}M parameters, {info['checkpoint_mib']:.0f} MiB in "
          f"{info['shards']} shards, largest tensor {info['largest_tensor_mib']:.0f} MiB", flush=True)
    task = task_flags(None if args.data_dir else write_task(args.work / "data", 32, 8), args.data_dir)
    flags = stage_flags(args)
    import platform

    import torch

    meta = {"format": "skeleton_ds.scale_run/1", "shape": args.shape, "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": command_line("scale_run", argv), "stage_flags": flags, "base": info,
            "task": "sst2" if args.data_dir else "synthetic",
            "stage3_limit": args.stage3_limit, "stage3_prefetch": args.stage3_prefetch, "tuned_env": TUNED_ENV,
            "environment": {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                                       f"{info['system_memory_mib'] / 1024:.0f} GiB RAM, "
                                       + ("CUDA" if _has_cuda() else "no GPU (CPU ranks over gloo)"),
                            "torch": torch.__version__, "python": platform.python_version(), **_versions()}}
    meta["provenance"] = provenance(meta["command"])
    runs: dict[str, dict] = {}
    for run in args.runs:
        runs[run] = measure(run, args, base, task, flags)
        result = {**meta, "runs": runs, "ratios": ratios(runs)}
        save(result, args)  # after every run: a crash keeps the finished ones
    print_result(result, args.json)
    return 0


def save(result: dict, args) -> None:
    """The record (with --notes, if given) as --json and its report as --md."""
    if args.notes is not None:
        result["notes"] = args.notes.read_text()
    write_text(args.json, json.dumps(result, indent=2) + "\n")
    write_text(args.md, markdown(result))


def probe_load(model: str, config: str) -> int:
    """Runs inside each rank (under the launcher): join the group, load the backbone as the stages do,
    and print this rank's RSS, high-water mark and anonymous RSS right after loading."""
    import torch

    from skeleton_ds import distributed
    from skeleton_ds.ds_config import resolve_ds_config
    from skeleton_ds.loading import load_backbone

    dist = distributed.init_distributed()
    ds_config = resolve_ds_config(Path(config), world_size=dist.world_size, batch_size=2 * dist.world_size,
                                  lr=0.03, precision="auto")
    start = time.perf_counter()
    backbone = load_backbone(model, ds_config, readout="verbalizer")
    seconds = time.perf_counter() - start
    status = _status(os.getpid())
    fraction = distributed.local_fraction(backbone.model.parameters())
    torch.distributed.barrier()
    line = "SCALE_RUN_PROBE " + json.dumps({"rank": dist.rank, "seconds": round(seconds, 1),
                                            "fraction": round(fraction, 3),
                                            "rss_mib": round(status["VmRSS"] / 1024),
                                            "hwm_mib": round(status["VmHWM"] / 1024),
                                            "anon_mib": round(status["RssAnon"] / 1024)})
    sys.stdout.flush()
    os.write(1, (line + "\n").encode())  # one write: the ranks share the launcher's stdout
    torch.distributed.destroy_process_group()
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _versions() -> dict:
    import deepspeed
    import transformers

    return {"deepspeed": deepspeed.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    sys.exit(main())
