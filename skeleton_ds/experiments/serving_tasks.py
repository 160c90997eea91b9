"""Many real tasks for the serving figures: distinct prompts and skeletons on real GLUE/SuperGLUE data.

    python -m skeleton_ds.experiments.serving_tasks --base minilm --data-dir ../shared/data --tasks sst2,rte,cb,qnli \
        --seeds 4 \
        --keeps 0.2,0.3,0.4,0.5 --output runs/serving/minilm

Per task and seed, one pipeline run prompt-tunes and scores on a small subset (`--train-examples`,
`--attr-examples`): the seeds give distinct prompts. Each keep ratio then localizes and converts its own
skeleton from those scores (the way `skeleton-ds reproduce` builds its skeletons: the prompt and scores
copied, stages localize and convert), so 4 tasks x 4 seeds x 4 keep ratios are 64 distinct skeletons, 16
distinct prompts. Not re-tuned: every way of serving answers with the same stage-1 prompts. Writes
OUT/tasks-N.txt for each `--lists` size, one NAME=DIR line per task (what experiments.load_test --task-list
reads): the first N of the task x seed x keep grid, ordered so a shorter list spreads over tasks and seeds
before keep ratios. Finished runs are reused (the pipeline's own settings check).
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace
import sys
from pathlib import Path

from skeleton_ds.checkpoint import copy_atomically
from skeleton_ds.config import Config, comma_list, float_list, int_list
from skeleton_ds.experiments import CHECKOUT
from skeleton_ds.experiments.reproduce import task_fields
from skeleton_ds.stages.pipeline import run_pipeline


def build(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(name, run directory) of every skeleton, spread order: keep ratio last."""
    built = []
    for keep, task, seed in itertools.product(args.keeps, args.tasks, range(args.seeds)):
        full = args.output / f"{task}-s{seed}"
        common = Config(model=args.base, ds_config=Path(args.config), seed=seed, epochs=1.0, output=full,
                        max_train_examples=args.train_examples, max_eval_examples=args.eval_examples,
                        attr_examples=args.attr_examples, **task_fields(task, args.data_dir))
        run_pipeline(replace(common, stages=("prompt", "attribute")))
        run = args.output / f"{task}-s{seed}-k{keep:g}"
        for name in ("prompt", "attribution.safetensors"):
            if not (run / name).exists():
                copy_atomically(full / name, run / name)
        run_pipeline(replace(common, output=run, stages=("localize", "convert"), ffn_keep=keep))
        built.append((run.name, run))
    return built


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="minilm")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--tasks", type=comma_list, default=("sst2", "rte", "cb", "qnli"))
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--keeps", type=float_list, default=(0.2, 0.3, 0.4, 0.5))
    p.add_argument("--train-examples", type=int, default=256)
    p.add_argument("--attr-examples", type=int, default=64)
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--config", default="ds_configs/zero2.json")
    p.add_argument("--lists", type=int_list, default=(16, 64))
    p.add_argument("--output", "--out", type=Path, default=CHECKOUT / "runs" / "serving" / "minilm", metavar="DIR",
                   help="where the runs and the tasks-N.txt lists go (--out: deprecated alias)")
    args = p.parse_args(argv)
    built = build(args)
    for size in args.lists:
        listing = args.output / f"tasks-{size}.txt"
        listing.write_text("".join(f"{name}={run.resolve()}\n" for name, run in built[:size]))
        print(f"serving_tasks: {min(size, len(built))} tasks -> {listing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
