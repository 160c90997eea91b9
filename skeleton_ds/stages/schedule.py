"""Iterative localization: a keep schedule cuts the model in steps instead of at once.

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR --keep-schedule 0.5,0.3

One-shot localization removes most neurons in one go, far from the full model where activation x gradient
(a first-order estimate) holds. A schedule takes smaller steps: at each FFN keep it localizes, converts and
re-tunes; the next step scores the compact model just made (with its re-tuned prompt), keeps the top units
among those that model has, converts the base checkpoint to the new, smaller skeleton and re-tunes again,
starting from that prompt.

Layout: the steps before the last are ordinary run directories, DIR/steps/ffn-0.5/ ..., each with its own
skeleton.json, compact model and re-tuning; the last step is DIR itself, so DIR/skeleton.json (base-model
indices, like every skeleton) and DIR/compact are what verify, infer and serve read, as after a one-shot
run. Stage 1 and the teacher run once, in DIR, and are copied into each step. The re-tuning budget
(--retune-epochs, else --epochs) is shared evenly over the steps: a schedule trains the prompt for as many
optimizer steps as one-shot localization does (each step rounds its share up, so at most one more per step).

Each step is planned and run like any run (by skeleton_ds.stages.pipeline, which drives the phases
here): finished steps with the same settings are reused, a killed run resumes mid-schedule with --resume,
and a step whose settings changed is refused
without --overwrite; a later step records the id of the re-tuning it started from, so redoing a step makes
every step after it stale.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from skeleton_ds import checkpoint, distributed, lineage
from skeleton_ds.stage_specs import STAGE_ORDER
from skeleton_ds.config import Config

SHARED = ("prompt", "teacher")
"""Stages run once in DIR and copied into every step: the stage-1 prompt and the full model's outputs."""

COPIED = ("prompt", "teacher.safetensors")

STEP_STAGES = tuple(s for s in STAGE_ORDER if s not in SHARED)
"""The stages every step runs: a step's outputs are made from the step before."""


def step_dir(cfg: Config, keep: float) -> Path:
    return cfg.output / "steps" / f"ffn-{keep:g}"


def step_configs(cfg: Config) -> list[Config]:
    """The Config of every step in order, the last one for DIR itself, each with its share of re-tuning."""
    schedule = cfg.keep_schedule
    budget = (cfg.retune_epochs or cfg.epochs) / len(schedule)
    steps: list[Config] = []
    for i, keep in enumerate(schedule):
        last = i == len(schedule) - 1
        steps.append(replace(cfg, output=cfg.output if last else step_dir(cfg, keep), ffn_keep=keep, keep_schedule=(),
                             previous_step=steps[-1].output if steps else None, retune_epochs=budget,
                             stages=cfg.stages if last
                             else tuple(s for s in STAGE_ORDER if s not in ("prompt",))))
    return steps


def mirror_shared(cfg: Config, step: Config) -> None:
    """DIR's stage-1 prompt and teacher outputs, copied into a step (replacing copies of older ones)."""
    if distributed.init_distributed().is_main:
        for stage, name in zip(SHARED, COPIED):
            source, target = cfg.output / name, step.output / name
            if not source.exists():
                continue
            if (lineage.read_record(target.parent, stage) or {}).get("id") == \
                    (lineage.read_record(source.parent, stage) or {}).get("id") and target.exists():
                continue
            if target.is_dir():
                shutil.rmtree(target)
            target.unlink(missing_ok=True) if target.is_file() else None
            checkpoint.copy_atomically(source, target)
    torch.distributed.barrier()


def phases(cfg: Config) -> tuple[Config | None, list[Config]]:
    """What a scheduled run runs, in order: the requested shared stages in DIR (None if none), then every step
    (none if only shared stages are requested). The pipeline plans and runs each like a run of its own."""
    shared = tuple(s for s in cfg.stages if s in SHARED)
    steps = step_configs(cfg) if any(s not in SHARED for s in cfg.stages) else []
    return (replace(cfg, keep_schedule=(), stages=shared) if shared else None), steps


def step_row(step: Config, summary: dict) -> dict:
    """One step in DIR/metrics.json's keep_schedule list."""
    return {"ffn_keep": step.ffn_keep, "run": str(step.output), "before_retune": summary["skeleton_before_retune"],
            "after_retune": summary["skeleton_after_retune"], "parameters_kept": summary["parameters_kept"]}
