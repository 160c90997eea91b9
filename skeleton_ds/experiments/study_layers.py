"""Which layers lose the task? A finished skeleton, pruned and restored one block of layers at a time.

    python -m skeleton_ds.experiments.study_layers --run runs/reproduce-smollm2/sst2/seed0/keep0.3-attribution \
        --run runs/reproduce-smollm2/sst2/seed0/keep0.5-attribution --docs

For each --run (a pipeline run directory that holds the stage-1 prompt in RUN/prompt and the skeleton in
RUN/skeleton.json, such as one cell of `skeleton-ds reproduce`), the prompted full model is evaluated on
the dev examples (the run's own settings; --max-eval-examples samples them) with the skeleton's unkept
FFN neurons and KV groups masked (the masked model equals the compact one; no re-tuning):

- the whole skeleton, and no mask at all (the two ends);
- per block of --block-size layers, only that block pruned (every other layer whole): what the block
  costs on its own;
- per block, the whole skeleton with only that block whole again: what restoring it buys back.

Writes OUTPUT/study.json (provenance, settings, every result), OUTPUT/study.md and OUTPUT/study.png;
with --docs also docs/results/study_layers.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from skeleton_ds import checkpoint
from skeleton_ds.tables import markdown_table
from skeleton_ds.cli import run_command
from skeleton_ds.config import Config
from skeleton_ds.errors import UserError
from skeleton_ds.experiments import command_line, publish
from skeleton_ds.provenance import provenance

PATH_FIELDS = {"output", "ds_config", "data_dir", "train_file", "dev_file"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", dest="runs", type=Path, action="append", required=True,
                   help="a run directory with prompt/ and skeleton.json (repeat for several skeletons)")
    p.add_argument("--block-size", type=int, default=5, help="layers per block")
    p.add_argument("--max-eval-examples", type=int, default=300, help="dev examples (0: the whole dev set)")
    p.add_argument("--output", type=Path, default=Path("runs/study-layers"))
    p.add_argument("--docs", action="store_true", help="also write docs/results/study_layers.{json,md,png}")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_config(run: Path, max_eval_examples: int) -> Config:
    """The run's own settings (as its stage-1 metrics record them), to evaluate the way it was evaluated."""
    for name in ("prompt/metrics.json", "skeleton.json"):
        if not (run / name).is_file():
            raise UserError(f"{run} has no {name}: pass a pipeline run directory that finished localization "
                            f"(for instance runs/reproduce-smollm2/sst2/seed0/keep0.3-attribution)")
    recorded = checkpoint.read_json(run / "prompt" / "metrics.json", "stage-1 metrics")["config"]
    known = {f.name for f in dataclasses.fields(Config)}
    values = {k: (Path(v) if k in PATH_FIELDS and v is not None else tuple(v) if isinstance(v, list) else v)
              for k, v in recorded.items() if k in known}
    return Config(**values | {"output": run, "stages": ("attribute",), "max_eval_examples": max_eval_examples,
                              "resume": False, "overwrite": False})


def blocks(layers: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, layers))) for start in range(0, layers, size)]


def mixed(skeleton, geometry, pruned: set[int]):
    """The skeleton's units in the `pruned` layers, every unit elsewhere."""
    from skeleton_ds.localization import Skeleton

    every_ffn, every_head = list(range(geometry.ffn_size)), list(range(geometry.kv_heads))
    return Skeleton(ffn=[skeleton.ffn[i] if i in pruned else every_ffn for i in range(geometry.layers)],
                    heads=[skeleton.heads[i] if i in pruned else every_head for i in range(geometry.layers)])


def study_run(run: Path, cfg: Config, block_size: int) -> dict:
    from skeleton_ds.localization import load_skeleton, masked
    from skeleton_ds.stages.attribute import AttributionRecipe

    rec = AttributionRecipe(cfg)
    rec.setup()
    geometry, backbone, adapter = rec.geometry, rec.model.backbone, rec.backbone.adapter
    skeleton, record = load_skeleton(run / "skeleton.json", geometry)

    def accuracy(pruned: set[int]) -> float:
        with masked(backbone, adapter, geometry, mixed(skeleton, geometry, pruned)):
            value = rec.evaluate()["accuracy"]
        rec.report.note(f"{run.name}: layers pruned {len(pruned)}: accuracy {value:.4f}")
        return value

    every = set(range(geometry.layers))
    result = {"run": str(run), "task": record["task"], "ffn_keep": record["ffn_keep"], "head_keep": record["head_keep"],
              "keep_mode": record["keep_mode"], "ffn_sizes": skeleton.ffn_sizes(),
              "head_counts": [len(h) for h in skeleton.heads], "dev_examples": len(rec.dev_set),
              "unpruned": accuracy(set()), "skeleton": accuracy(every), "blocks": []}
    for block in blocks(geometry.layers, block_size):
        result["blocks"].append({
            "layers": block, "ffn_kept": sum(len(skeleton.ffn[i]) for i in block),
            "ffn_total": len(block) * geometry.ffn_size,
            "pruned_alone": accuracy(set(block)), "restored": accuracy(every - set(block))})
    return result


def study(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.block_size < 1 or args.max_eval_examples < 0:
        raise UserError("--block-size must be at least 1 and --max-eval-examples at least 0")
    configs = [run_config(run, args.max_eval_examples) for run in args.runs]  # refuse a bad run before loading a model

    from skeleton_ds.cli import quiet_libraries
    from skeleton_ds.plots import plot_layers

    quiet_libraries()
    t_start = time.perf_counter()
    results = [study_run(run, cfg, args.block_size) for run, cfg in zip(args.runs, configs)]
    if os.environ.get("RANK", "0") != "0":
        return 0
    command = command_line("study_layers", argv)
    settings = {"runs": [str(r) for r in args.runs], "block_size": args.block_size,
                "max_eval_examples": args.max_eval_examples, "retuned": False}
    record = {"provenance": provenance(command), "settings": settings, "results": results,
              "seconds": round(time.perf_counter() - t_start, 1)}
    args.output.mkdir(parents=True, exist_ok=True)
    plot_layers(results, args.output / "study.png")
    publish(args.output, "study_layers", record, markdown(record), docs=args.docs, figure=True)
    print(f"skeleton_ds: layer study -> {args.output / 'study.json'} ({record['seconds']:.0f} s)")
    return 0


def _label(result: dict) -> str:
    heads = f", KV groups {result['head_keep']:g}" if result["head_keep"] != 1.0 else ""
    return f"{result['task']}, FFN keep {result['ffn_keep']:g}{heads} ({result['keep_mode']})"


def markdown(record: dict) -> str:
    """Per skeleton, per block: the FFN kept, the accuracy with only that block pruned (its cost against the
    unpruned model) and with only that block whole again (what it buys back against the whole skeleton)."""
    lines = []
    for r in record["results"]:
        lines += [f"**{_label(r)}**: unpruned {r['unpruned']:.3f}, whole skeleton {r['skeleton']:.3f} on "
                  f"{r['dev_examples']} dev examples (masked, no re-tuning).", "",
                  *markdown_table(["layers", "FFN kept", "only these pruned (cost)",
                                   "skeleton with these whole (gain)"])]
        for b in r["blocks"]:
            lines.append(f"| {b['layers'][0]}-{b['layers'][-1]} | {b['ffn_kept']} / {b['ffn_total']} "
                         f"({b['ffn_kept'] / b['ffn_total']:.2f}) | {b['pruned_alone']:.3f} "
                         f"({b['pruned_alone'] - r['unpruned']:+.3f}) | {b['restored']:.3f} "
                         f"({b['restored'] - r['skeleton']:+.3f}) |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_command(study, sys.argv[1:]))
