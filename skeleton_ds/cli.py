"""`skeleton-ds <command>`: one subcommand per launch script, each a plain function of argv.

User mistakes (UserError) become one `error: ...` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence

from skeleton_ds.errors import UserError
from skeleton_ds.packaged_models import PACKAGED
from skeleton_ds.preemption import PREEMPTED_EXIT_CODE, Preempted

ALIASES = ", ".join(PACKAGED)


def quiet_libraries() -> None:
    """Quiet the libraries before a command loads them, without importing DeepSpeed to do it: infer, bench
    and serve never use it (nor should they pay seconds to import it), and from 0.17.6 its logger starts
    at WARNING. A DeepSpeed already imported in this process (an in-process caller) is set to WARNING."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, instead of DeepSpeed warning that it guessed
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "deepspeed" in sys.modules:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # deepspeed.utils.logger


def train(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline stages named by --stages (default: all)."""
    from skeleton_ds.config import config_from_args

    cfg = config_from_args(list(argv) if argv is not None else None)
    quiet_libraries()
    from skeleton_ds.preemption import stop_on_signals
    from skeleton_ds.stages.pipeline import run_pipeline

    with stop_on_signals():  # SIGUSR1/SIGTERM: finish the step, checkpoint, exit PREEMPTED_EXIT_CODE
        run_pipeline(cfg)
    return 0


def _one_stage(stage: str) -> Callable[[Sequence[str] | None], int]:
    def command(argv: Sequence[str] | None = None) -> int:
        return train([*(argv or []), "--stages", stage])

    command.__doc__ = f"Run only the {stage} stage (same flags as train)."
    command.stage = stage
    return command


def convert(argv: Sequence[str] | None = None) -> int:
    """Slice a skeleton out of a base checkpoint into a compact Hugging Face model directory."""
    import argparse
    from pathlib import Path

    from skeleton_ds.config import add_flag

    p = argparse.ArgumentParser(prog="skeleton-ds convert", description=convert.__doc__)
    p.add_argument("--base", required=True, help=f"base model: local directory, Hub id, a packaged alias ({ALIASES})")
    p.add_argument("--skeleton", required=True, type=Path, help="skeleton.json from the localize stage")
    p.add_argument("--prompt", type=Path, default=None, help="stage-1 prompt directory to ship with the model")
    p.add_argument("--output", "--out", required=True, type=Path, metavar="DIR",
                   help="the compact checkpoint directory to create, atomically (--out: deprecated alias)")
    p.add_argument("--revision", default=None)
    add_flag(p, "allow_pickle")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_flag(p, "slice_lm_head", help="decoders: keep only the verbalizer rows of the LM head (needs --prompt)")
    add_flag(p, "compensate", enforce_choices=True)  # the setting train's --compensate is: one definition
    p.add_argument("--scores", type=Path, default=None,
                   help="attribution.safetensors with the mean activations (default: beside --skeleton)")
    args = p.parse_args(list(argv) if argv is not None else None)
    from skeleton_ds.conversion import convert as run_convert, summary_line

    summary = run_convert(args.base, args.skeleton, args.prompt, args.output, revision=args.revision,
                          allow_pickle=args.allow_pickle, overwrite=args.overwrite, slice_lm_head=args.slice_lm_head,
                          compensate=args.compensate, scores=args.scores)
    print(summary_line(summary, args.output))
    return 0


def export_peft(argv: Sequence[str] | None = None) -> int:
    """Write a trained prompt as a PEFT prompt-tuning adapter directory."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="skeleton-ds export-peft", description=export_peft.__doc__)
    p.add_argument("--prompt", required=True, type=Path, help="DIR/prompt (or DIR/retune)")
    p.add_argument("--output", "--out", required=True, type=Path, metavar="DIR",
                   help="adapter directory to create (--out: deprecated alias)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(list(argv) if argv is not None else None)
    from skeleton_ds.interop import export_peft as run_export

    print(f"skeleton_ds: PEFT adapter -> {run_export(args.prompt, args.output, overwrite=args.overwrite)}")
    return 0


def infer(argv: Sequence[str] | None = None) -> int:
    """Answer a task with a compact checkpoint (or the full model + its prompt): evaluate a split, or
    label raw records (JSON Lines with the task's fields, or text lines) into JSON Lines."""
    import argparse
    import json
    from pathlib import Path

    from skeleton_ds.config import Config

    p = argparse.ArgumentParser(prog="skeleton-ds infer", description=infer.__doc__)
    m = p.add_argument_group("model: --checkpoint, or --base with --prompt")
    m.add_argument("--checkpoint", type=Path,
                   help="compact checkpoint directory (DIR/compact); its manifest is verified")
    m.add_argument("--base", help=f"full base model (local directory, Hub id, a packaged alias ({ALIASES}))")
    m.add_argument("--prompt", type=Path, help="stage-1 (or retune) prompt directory for --base")
    m.add_argument("--revision", default=None, help="Hub revision of --base")
    i = p.add_argument_group("what to answer: --input, or a task split")
    i.add_argument("--input", help="JSON Lines records or plain text lines; '-' reads standard input")
    i.add_argument("--output", default="-", help="where the JSON Lines predictions go ('-': standard output)")
    i.add_argument("--task", help="evaluate this built-in task's split (must be the checkpoint's task); with "
                                  "--input, only checked against the checkpoint's task")
    i.add_argument("--data-dir", type=Path, help="read the split from DIR/<TASK>/ (else the Hugging Face Hub)")
    i.add_argument("--split", default="validation", choices=("validation", "dev", "train"))
    i.add_argument("--max-examples", type=int, default=0, help="evaluate a seeded subset of N examples, the one "
                   "train's --max-eval-examples N selects with the same --seed (0: all)")
    i.add_argument("--seed", type=int, default=Config.seed, help="which subset --max-examples takes (train's --seed)")
    r = _runtime_flags(p)
    r.add_argument("--quant", default="none", help="none | 8bit | 4bit (bitsandbytes NF4)")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--no-prompt-cache", action="store_true",
                   help="decoders: recompute the prompt's keys/values per batch")
    r.add_argument("--compile", action="store_true", help="torch.compile the forward")
    args = p.parse_args(list(argv) if argv is not None else None)
    if bool(args.checkpoint) == bool(args.base or args.prompt) or (args.base and not args.prompt) \
            or (args.prompt and not args.base):
        raise UserError("give the model as --checkpoint DIR/compact, or as --base M --prompt DIR/prompt")
    if args.input and args.data_dir:
        raise UserError(f"--data-dir goes with --task T to evaluate a split, and --input {args.input} gives the "
                        "records to label: drop --data-dir (or --input)")
    if not args.input and not args.task:
        raise UserError("--data-dir D needs --task T, the task whose split to evaluate" if args.data_dir else
                        "give what to answer: --input FILE (or - for standard input) to label records, or "
                        "--task T [--data-dir D] to evaluate a split")
    from skeleton_ds.inference import InferenceConfig, Predictor, evaluation_examples, label_accuracy, read_records

    cfg = InferenceConfig(device=args.device, dtype=args.dtype, quant=args.quant, batch_size=args.batch_size,
                          prompt_cache=not args.no_prompt_cache, compile=args.compile, static=args.static,
                          warmup_buckets=args.warmup_buckets)
    lines = None
    if args.input:  # read before loading the model: bad input fails fast
        source = "standard input" if args.input == "-" else args.input
        if args.input != "-" and not Path(args.input).is_file():
            raise UserError(f"--input {args.input} does not exist")
        raw = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
        try:
            lines = raw.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"{source} is not UTF-8 (byte {e.start}: {e.reason}): save it as UTF-8") from None
    quiet_libraries()
    predictor = Predictor.from_checkpoint(args.checkpoint, cfg) if args.checkpoint else \
        Predictor.from_prompt(args.base, args.prompt, cfg, revision=args.revision)
    task = predictor.task
    if args.task and args.task != task.name:  # with --input, --task only checks which task the records are
        fix = f"pass --task {task.name}" if lines is None else \
            f"drop --task (the records are read as {task.name!r}) or pass --task {task.name}"
        raise UserError(f"{predictor.source} answers task {task.name!r}, not {args.task!r}: {fix}")
    if lines is None:
        examples, selection = evaluation_examples(task, args.data_dir, args.split, args.max_examples, args.seed)
        result = predictor.evaluate(examples)
        print(json.dumps(result | {"split": args.split, "selection": selection}))
        print(f"skeleton_ds: {task.name} {args.split}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
              + f" over {selection} examples, {result['examples_per_s']:.1f} examples/s", file=sys.stderr)
        return 0
    examples = read_records(lines, task, source)
    predictions = predictor.predict(examples)
    text = "".join(json.dumps(p) + "\n" for p in predictions)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        from skeleton_ds.checkpoint import write_text

        write_text(Path(args.output), text)
    metrics = label_accuracy(predictions, examples, task)
    if metrics:
        print(f"skeleton_ds: {len(examples)} labelled records: "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), file=sys.stderr)
    return 0


def bench(argv: Sequence[str] | None = None) -> int:
    """Time compact checkpoints against the full model and PEFT prompt tuning, in one process."""
    import argparse
    import shlex
    from pathlib import Path

    from skeleton_ds.bench import LENGTHS, PACKAGED_READOUT, SHAPES, BenchConfig
    from skeleton_ds.config import comma_list, float_list, int_list

    d = BenchConfig()
    p = argparse.ArgumentParser(prog="skeleton-ds bench", description=bench.__doc__)
    p.add_argument("--shape", default=d.shape, help=" | ".join(SHAPES))
    p.add_argument("--output", "--out", type=Path, default=None, metavar="DIR",
                   help="where bench.json and bench.png go (default runs/bench/SHAPE; --out: deprecated alias)")
    _runtime_flags(p, static=False)
    p.add_argument("--batch-sizes", type=int_list, default=d.batch_sizes, help="comma list (default 32,1)")
    p.add_argument("--text-length", type=int, default=d.text_length,
                   help="fixed inputs: tokens per example (default 128)")
    p.add_argument("--lengths", type=comma_list, default=d.lengths,
                   help=f"input groups, comma list of {', '.join(LENGTHS)}: fixed = --text-length random tokens; sst2 "
                        "= SST-2 dev lengths through the task template, length-sorted batches (needs --data-dir)")
    p.add_argument("--sst2-examples", type=int, default=d.sst2_examples,
                   help=f"sst2: examples per timed call, as whole length-sorted batches (default {d.sst2_examples})")
    p.add_argument("--prompt-length", type=int, default=d.prompt_length, help="soft prompt tokens (default 20)")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--ffn-keeps", type=float_list, default=d.ffn_keeps, help="comma list (default 1.0,0.5,0.3,0.2)")
    p.add_argument("--head-keep", type=float, default=d.head_keep,
                   help="decoders: also compacts with this KV-group keep")
    p.add_argument("--keep-mode", default=d.keep_mode,
                   help="uniform | global: compacts with per-layer widths (from --run-dir's scores), timed as our "
                        "loaders run them, each layer at its own width")
    p.add_argument("--protect-outliers", type=float, default=d.protect_outliers, metavar="FACTOR",
                   help="as the localize flag: keep FFN neurons with peak |activation| >= FACTOR x the layer median")
    p.add_argument("--run-dir", type=Path, default=None,
                   help=f"{', '.join(PACKAGED_READOUT)}: pipeline output whose prompt and scores to use")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="GLUE files: SST-2 dev for --lengths sst2, and dev accuracy for a packaged model "
                        "with --run-dir")
    p.add_argument("--quant", type=comma_list, default=(),
                   help="also time the FFN-0.3 compact in these bitsandbytes modes: 8bit,4bit")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the built checkpoints here (default: a temp dir)")
    p.add_argument("--base-dir", type=Path, default=None,
                   help="random shapes: time this saved base of the shape (e.g. WORK_DIR/base of an earlier run) "
                        "instead of building one")
    p.add_argument("--head-ffn-keeps", type=float_list, default=(),
                   help="the FFN keeps that also get a head-pruned compact (default: every one below 1)")
    p.add_argument("--skip-peft", action="store_true", help="leave out the PEFT contender")
    p.add_argument("--peft-full-logits", action="store_true",
                   help="decoders: also time PEFT computing the whole vocabulary at every position (a plain "
                        "CausalLM forward)")
    p.add_argument("--compile", action="store_true", help="also time the FFN-0.3 compact model under torch.compile")
    p.add_argument("--graphs", action="store_true",
                   help="decoders: also time full and FFN-0.3 compact at static shapes, a captured CUDA graph per "
                        "bucket on a GPU (infer --static on, the CUDA default); the other rows run --static off")
    p.add_argument("--profile", action="store_true",
                   help="profile the FFN-0.3 compact model: operator time against wall time, top operators")
    args = list(argv) if argv is not None else sys.argv[1:]
    parsed = vars(p.parse_args(args))
    parsed["output"] = parsed["output"] or Path("runs/bench") / parsed["shape"]
    cfg = BenchConfig(**parsed)
    quiet_libraries()
    from skeleton_ds.bench import print_summary, run_bench

    print_summary(run_bench(cfg, command=shlex.join(["skeleton-ds", "bench", *args])), cfg.output)
    return 0


def reproduce(argv: Sequence[str] | None = None) -> int:
    """Reproduce a results table: a real model on real tasks, Skeleton against random and magnitude controls."""
    import argparse
    import shlex
    from pathlib import Path

    from skeleton_ds.config import comma_list as names, float_list
    from skeleton_ds.experiments.reproduce import PLANS, ReproduceConfig

    p = argparse.ArgumentParser(prog="skeleton-ds reproduce", description=reproduce.__doc__)
    p.add_argument("--data-dir", type=Path, required=True, help="GLUE/SuperGLUE files (../shared/data)")
    p.add_argument("--output", type=Path, default=Path("runs/reproduce"),
                   help="where the pipeline runs go (default runs/reproduce)")
    p.add_argument("--model", default="minilm", help="base model (default: the packaged MiniLM; a decoder such as "
                                                     "smollm2-135m gets the decoder plan)")
    p.add_argument("--tasks", type=names, default=(), help="comma list; default: the plan's ("
                   + "; ".join(f"{kind}: {','.join(plan.tasks)}" for kind, plan in PLANS.items()) + ")")
    p.add_argument("--ffn-keeps", type=float_list, default=(), help="comma list; default: the plan's ("
                   + "; ".join(f"{kind}: {','.join(map(str, plan.ffn_keeps))}" for kind, plan in PLANS.items()) + ")")
    p.add_argument("--variants", type=names, default=(), help="comma list of the plan's skeletons; default: all ("
                   + "; ".join(f"{kind}: {','.join(plan.variants)}" for kind, plan in PLANS.items()) + ")")
    p.add_argument("--seeds", type=int, default=0, help="seeds per task (default 0: 3 for small tasks, else 1)")
    p.add_argument("--plan", dest="kind", default="", choices=tuple(PLANS),
                   help="default: the model's architecture's (encoder or decoder); size: the small SST-2 protocol "
                        "that compares decoder sizes (tables reproduce_MODEL_size.*)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny subsets, one epoch, no benchmark")
    p.add_argument("--docs", type=Path, default=Path("docs/results"),
                   help="where reproduce[_MODEL].{json,md,png} go (default docs/results)")
    p.add_argument("--no-docs", dest="docs", action="store_const", const=None, help="write only OUTPUT/reproduce.json")
    p.add_argument("--config", default="ds_configs/zero2.json",
                   help="DeepSpeed config for the stages (default ds_configs/zero2.json)")
    args = list(argv) if argv is not None else sys.argv[1:]
    cfg = ReproduceConfig(**vars(p.parse_args(args)), command=shlex.join(["skeleton-ds", "reproduce", *args]))
    quiet_libraries()
    from skeleton_ds.preemption import stop_on_signals
    from skeleton_ds.experiments.reproduce import markdown
    from skeleton_ds.experiments.reproduce import reproduce as run_reproduce

    with stop_on_signals():  # SIGUSR1/SIGTERM: the running stage checkpoints; the same command resumes the table
        record = run_reproduce(cfg)
    print(markdown(record))
    return 0


def serve(argv: Sequence[str] | None = None) -> int:
    """Serve many tasks on one shared base model over HTTP, batched: as skeletons, or as plain prompt tuning
    (--mode)."""
    import argparse

    from skeleton_ds.serving.settings import MIX_RULES, POLICIES, ServeSettings

    d = ServeSettings()  # every default below is the settings' own
    p = argparse.ArgumentParser(prog="skeleton-ds serve", description=serve.__doc__)
    p.add_argument("--base", help=f"the shared base model: local directory, Hub id, a packaged alias ({ALIASES})")
    p.add_argument("--task-dir", action="append", default=[], metavar="[NAME=]DIR",
                   help="a pipeline output directory or a compact checkpoint, served as NAME (default: its task "
                        "name); repeat for each task")
    p.add_argument("--mode", choices=("skeleton", "prompt-tuning", "compact"), default="skeleton",
                   help="skeleton: each task on its skeleton of the shared base; the baselines: prompt-tuning, the "
                        "full base with each task's stage-1 prompt (DIR/prompt); compact: each task's compact "
                        "checkpoint loaded on its own, nothing shared")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the address is printed)")
    p.add_argument("--cache-bytes", type=int, default=None,
                   help="bytes of task-owned weights kept (LRU; default: half the device memory free once the base "
                        "is loaded); a task larger than this is refused at start; skeleton mode only")
    p.add_argument("--batching", choices=POLICIES, default=None,
                   help="cross-task (default; --mode compact: per-task): a pass mixes tasks, shared modules once, "
                        "each task's slices on its rows; per-task: one task per pass, tasks in turn; off: every "
                        "request alone (comparisons)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="most examples in one pass, all its tasks together")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="longest a request waits for others to merge with")
    p.add_argument("--mix-min", type=int, default=d.mix_min, metavar="N",
                   help="cross-task batching: mix tasks in a pass only when at least N examples wait; fewer, and the "
                        "task with the oldest request runs alone (light load: one-task passes answer sooner); 0: "
                        f"always mix (default {d.mix_min})")
    p.add_argument("--mix-by", choices=MIX_RULES, default=d.mix_by,
                   help="cross-task batching, from --mix-min waiting: cost (default) mixes tasks while mixed passes "
                        "serve rows faster than one-task passes, each way measured while serving and measured again "
                        "from time to time; count always mixes")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="most examples waiting, all tasks; a request beyond gets 503 with Retry-After (0: no bound)")
    p.add_argument("--timeout-ms", type=float, default=d.timeout_ms,
                   help="a request not answered by then gets 504 and is withdrawn")
    p.add_argument("--stall-s", type=float, default=d.stall_s, help="/healthz fails while one pass has run longer")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /healthz (else 401); default: the "
                        "SKELETON_DS_API_KEY environment variable, else no key")
    p.add_argument("--no-batching", action="store_true", help="the same as --batching off (deprecated)")
    p.add_argument("--max-inputs", type=int, default=d.max_inputs, help="most inputs in one request (more: 413)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (larger: 413)")
    _runtime_flags(p)
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    args = p.parse_args(list(argv) if argv is not None else None)
    if not args.base and args.mode != "compact":
        raise UserError(f"give the shared base model: --base M (a local directory, Hub id, a packaged alias "
                        f"({ALIASES}))")
    if not args.task_dir:
        raise UserError("give at least one task: --task-dir [NAME=]DIR (a pipeline output or a compact checkpoint), "
                        "repeatable")
    if args.mode != "skeleton" and args.cache_bytes is not None:
        raise UserError(f"--cache-bytes is for --mode skeleton: --mode {args.mode} holds every task, it caches nothing")
    batching = "off" if args.no_batching else args.batching or ("per-task" if args.mode == "compact" else "cross-task")
    if args.mode == "compact" and batching == "cross-task":
        raise UserError("--mode compact runs each task on its own model, so a pass cannot mix tasks: use "
                        "--batching per-task (its default) or off")
    try:
        from skeleton_ds.serving import server
    except ImportError as e:
        raise UserError(f"serving needs the serve extra ({e.name} is missing): "
                        f"pip install 'skeleton-ds[serve]'") from None
    from skeleton_ds.inference import InferenceConfig

    api_key = args.api_key if args.api_key is not None else os.environ.get("SKELETON_DS_API_KEY")
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_inputs=args.max_inputs,
                                    max_body_bytes=args.max_body_bytes,
                                    batching=batching, max_queue=args.max_queue,
                                    timeout_ms=args.timeout_ms, stall_s=args.stall_s, api_key=api_key,
                                    mix_min=args.mix_min, mix_by=args.mix_by)
    if api_key is None and not server.is_loopback(args.host):
        print(f"skeleton_ds: warning: serving on {args.host} without an API key: anyone who reaches the port can use "
              f"it; pass --api-key KEY (or set SKELETON_DS_API_KEY)", file=sys.stderr, flush=True)
    # One merged request is one forward pass: the model's batch size is the batcher's.
    cfg = InferenceConfig(device=args.device, dtype=args.dtype, batch_size=args.max_batch, static=args.static,
                          warmup_buckets=args.warmup_buckets)
    sock = server.bind(args.host, args.port)  # before the model loads: a port in use fails at once
    try:
        quiet_libraries()
        from skeleton_ds.serving.baselines import PromptTuningModel, SeparateCompactModels
        from skeleton_ds.serving.multitask import MultiTaskModel

        if args.mode == "prompt-tuning":
            model = PromptTuningModel(args.base, args.task_dir, cfg=cfg)  # checks the dirs
        elif args.mode == "compact":
            model = SeparateCompactModels(args.task_dir, cfg=cfg)
        else:
            model = MultiTaskModel(args.base, args.task_dir, cache_bytes=args.cache_bytes, cfg=cfg,
                                   mix_tasks=settings.batching == "cross-task")  # checks the dirs and sizes
        app = server.create_app(model, settings, batcher_thread=False)  # passes on this thread: server.run
        policy = ("no batching" if settings.batching == "off" else
                  f"{settings.batching} batching up to {settings.max_batch} examples, {settings.max_wait_ms:g} ms")
        if args.mode == "skeleton":
            policy += f"; cache {model.budget / 2**20:.0f} MiB"
        else:
            policy = f"{'plain prompt tuning' if args.mode == 'prompt-tuning' else 'separate compact models'}; {policy}"
        print(f"skeleton_ds: serving {len(model.task_names())} tasks ({', '.join(model.task_names())}) on "
              f"{server.address(sock)} ({policy})", flush=True)
        server.run(app, sock, log_level=args.log_level)
    finally:
        sock.close()
    return 0


def hostfile(argv: Sequence[str] | None = None) -> int:
    """Write a DeepSpeed hostfile ('host slots=N' per node) for a SLURM allocation."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="skeleton-ds hostfile", description=hostfile.__doc__)
    p.add_argument("--nodelist", default=None,
                   help="SLURM node list such as 'gpu-a[01-04]' (default: SLURM_JOB_NODELIST); expanded by "
                        "`scontrol show hostnames`")
    p.add_argument("--slots", type=int, default=None,
                   help="processes per node (default: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, else "
                        "SLURM_NTASKS_PER_NODE)")
    p.add_argument("--output", "--out", type=Path, default=Path("hostfile"), metavar="FILE",
                   help="where to write it (atomically; default ./hostfile; --out: deprecated alias)")
    args = p.parse_args(list(argv) if argv is not None else None)
    from skeleton_ds.cluster import slurm_hostfile

    hosts, slots = slurm_hostfile(args.output, nodelist=args.nodelist, slots=args.slots)
    print(f"skeleton_ds: hostfile for {len(hosts)} nodes x {slots} slots (first: {hosts[0]}) -> {args.output}")
    return 0


def verify(argv: Sequence[str] | None = None) -> int:
    """Check a run directory or a compact checkpoint: manifest hashes, safetensors integrity, skeleton
    against the model, prompt shape against the hidden size, stage markers. Exit 0 if all is well, 1 if not."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="skeleton-ds verify", description=verify.__doc__)
    p.add_argument("directory", type=Path, help="a run directory (--output of train) or a compact checkpoint")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = p.parse_args(list(argv) if argv is not None else None)
    from skeleton_ds.verify import as_json
    from skeleton_ds.verify import verify as run_verify

    findings = run_verify(args.directory)
    problems = [f for f in findings if not f.ok]
    if args.json:
        print(as_json(findings))
    else:
        for f in findings:
            print(f"{'ok  ' if f.ok else 'FAIL'}  {f.subject}" + (f": {f.detail}" if f.detail else ""))
        print(f"skeleton_ds: {args.directory}: " + (f"{len(problems)} problem(s)" if problems else "verified"))
    return 1 if problems else 0


def models(argv: Sequence[str] | None = None) -> int:
    """The packaged base models (--model ALIAS): list them, or fetch an opt-in one from PyPI and prepare it."""
    import argparse
    import subprocess

    from skeleton_ds import packaged_models

    p = argparse.ArgumentParser(prog="skeleton-ds models", description=models.__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="each alias, where it comes from, and whether it is installed")
    f = sub.add_parser("fetch", help="pip-install an alias's pinned packages (no dependencies) and convert it once")
    f.add_argument("alias", help=" | ".join(packaged_models.PACKAGED))
    f.add_argument("--force", action="store_true", help="reinstall the packages (a part that failed its sha256 check)")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.action == "list":
        for alias, spec in packaged_models.PACKAGED.items():
            where = (f"{spec.parts.count} packages {spec.parts.distribution.format(n='N')}" if spec.parts
                     else spec.distribution)
            state = "installed" if packaged_models.installed(spec) else f"not installed: {spec.install}"
            print(f"{alias:14} {spec.hub_id:40} {where} ({state})")
        return 0
    spec = packaged_models.PACKAGED.get(args.alias)
    if spec is None:
        raise UserError(f"no packaged model {args.alias!r}: one of {', '.join(packaged_models.PACKAGED)}")
    command = packaged_models.fetch_command(spec, force=args.force)  # pinned: nothing to do when they are there
    print("skeleton_ds: " + " ".join(command[1:]), flush=True)
    if subprocess.run(command).returncode:
        raise UserError(f"pip could not install {args.alias}'s packages (see its message above)")
    quiet_libraries()
    print(f"skeleton_ds: {args.alias} is ready in {packaged_models.resolve_model_path(args.alias)}")
    return 0


def _runtime_flags(p, *, static: bool = True):
    """--device and --dtype (and --static, --warmup-buckets), the runtime flags infer, serve and bench share:
    defined here once, their defaults InferenceConfig's. Returns the group, for a command's own runtime flags."""
    from skeleton_ds.inference import InferenceConfig

    d = InferenceConfig()
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=d.device, help="auto (cuda when available) | cuda | cpu | cuda:N")
    r.add_argument("--dtype", default=d.dtype,
                   help="auto (bf16 on GPUs that support it, else fp32) | bf16 | fp16 | fp32")
    if static:
        r.add_argument("--static", choices=("auto", "on", "off"), default=d.static,
                       help="decoders (serve: skeleton mode): run at bucketed static shapes (lengths in steps of 32, "
                            "batches in powers of 2), on CUDA as a captured CUDA graph per bucket; auto: on for CUDA, "
                            "off on CPU")
        r.add_argument("--warmup-buckets", action="store_true", default=d.warmup_buckets,
                       help="with static shapes: build (capture, compile) every bucket when a model is loaded instead "
                            "of on first use")
    return r




COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "train": train,
    "attribute": _one_stage("attribute"),
    "localize": _one_stage("localize"),
    "retune": _one_stage("retune"),
    "convert": convert,
    "export-peft": export_peft,
    "infer": infer,
    "bench": bench,
    "reproduce": reproduce,
    "serve": serve,
    "verify": verify,
    "hostfile": hostfile,
    "models": models,
}


def reference() -> str:
    """Markdown reference of every command and flag, read off the parsers themselves (docs/cli.md)."""
    import contextlib
    import io

    parts = ["# `skeleton-ds` command reference", "",
             "Generated from the argument parsers by `python launch/cli_reference.py`; `tests/test_docs.py` fails "
             "when this file is stale. `deepspeed launch/train.py` takes the flags of `skeleton-ds train`; "
             "`python -m skeleton_ds CMD` is `skeleton-ds CMD`.", ""]
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"  # argparse wraps to the terminal: fix the width so the file is reproducible
    try:
        for name, command in COMMANDS.items():
            if getattr(command, "stage", None):  # attribute / localize / retune: train's flags, one stage
                parts += [f"## `skeleton-ds {name}`", "", f"{command.__doc__} Same as `skeleton-ds train ... "
                          f"--stages {command.stage}`.", ""]
                continue
            text = io.StringIO()
            with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
                command(["--help"])
            parts += [f"## `skeleton-ds {name}`", "", (command.__doc__ or "").strip().split("\n\n")[0], "", "```",
                      text.getvalue().rstrip(), "```", ""]
    finally:
        os.environ.pop("COLUMNS") if previous is None else os.environ.update(COLUMNS=previous)
    return "\n".join(parts)


def run_command(command: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    try:
        return command(argv)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank validates the same input; say it once
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment, not our code: a full disk, a read-only or missing path, permissions
        if os.environ.get("RANK", "0") == "0":
            hint = {errno.ENOSPC: "free space (or point --output elsewhere) and run the same command again",
                    errno.EDQUOT: "the disk quota is exhausted: free space and run the same command again",
                    errno.EROFS: "the file system is read-only: write to another directory"}.get(e.errno, "")
            where = f" ({e.filename})" if e.filename else ""
            print(f"error: {e.strerror or e}{where}" + (f": {hint}" if hint else ""), file=sys.stderr)
        return 2
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"skeleton_ds: preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        return 130


def run_and_exit(command: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """run_command for a process that exits right after: it also leaves the process group, since a gloo
    group still alive at interpreter teardown can abort a finished rank ("terminate called without an
    active exception", exit 250). In-process callers (tests) keep theirs: DeepSpeed caches it."""
    code = run_command(command, argv)
    import gc

    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()  # a stage left by an exception (preemption) still holds its engine in reference cycles
        if code in (0, PREEMPTED_EXIT_CODE):
            torch.distributed.barrier()  # every rank is here: none tears down a connection another still uses
        torch.distributed.destroy_process_group()
        _remove_shm_buffer()
    return code


def _remove_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) creates a 66 MiB /dev/shm file per rank and
    never removes it: RAM lost until reboot, a few GB after a day of multi-rank CPU jobs. Each rank
    removes its own once every rank is past the final barrier (a mapping outlives its name)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and hasattr(os, "getuid")):
        return
    from pathlib import Path

    for rank in {os.environ.get("RANK"), os.environ.get("LOCAL_RANK")} - {None}:
        Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: skeleton-ds {{{names}}} [flags]   (skeleton-ds <command> --help for flags)", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return run_and_exit(COMMANDS[argv[0]], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
