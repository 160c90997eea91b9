"""Runs the requested stages in order and summarises the run in DIR/metrics.json.

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR [--stages a,b,...]

Before any work, every finished stage's recorded settings (skeleton_ds.lineage) are compared with
the ones these flags give. A finished stage whose settings match is reused; one whose settings differ
stops the run with one error naming each change, unless `--overwrite` is given: then each changed
stage and every stage made from it (skeleton_ds.stage_specs: what each stage reads) are redone (with
`--overwrite` and no change, every requested stage is redone), and finished outputs of unrequested
stages made from what is being redone are removed. A stage that reads nothing redone is kept: a new
skeleton from the same prompt reuses its teacher pass. Each stage publishes its outputs atomically, so
an interrupted stage is never mistaken for a finished one (`--resume` continues it from its last checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace

from skeleton_ds import checkpoint, lineage, preemption
from skeleton_ds.stages import schedule
from skeleton_ds.config import STAGES, Config
from skeleton_ds.errors import UserError
from skeleton_ds.provenance import provenance
from skeleton_ds.stage_specs import SPEC
from skeleton_ds.stages.recipe import recipe_class
from skeleton_ds.stages.settings import RunSettings
from skeleton_ds.ui import Reporter


def _done(cfg: Config, stage: str) -> bool:
    return recipe_class(stage)(cfg).done()


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


@dataclass
class Plan:
    records: dict[str, dict]  # the settings record each requested stage writes (or has written)
    run: list[str]  # requested stages to run, in order
    reuse: list[str]  # requested stages finished with these settings
    remove: list[str]  # unrequested finished stages made from a stage this run redoes
    changes: list[str]  # "stage: setting old -> new"


def plan_stages(cfg: Config, settings: RunSettings | None = None) -> Plan:
    """Which requested stages run and which are reused, from the records on disk; refuses changed
    settings without --overwrite. A stage runs when it is unfinished, changed, or reads (directly or not)
    from a stage that runs: the stage graph (SPEC's upstream), not pipeline order, so a skeleton run that
    localizes anew keeps a teacher pass made from the same prompt. Reads files only, so every rank plans alike."""
    settings = settings or RunSettings(cfg)
    records: dict[str, dict] = {}
    current: dict[str, str | None] = {}  # the id of each stage's output as the stages after it will read it
    changes: list[str] = []
    run: set[str] = set()  # requested stages to run
    for stage in STAGES:
        recorded = lineage.read_record(cfg.output, stage)
        if stage not in cfg.stages:
            current[stage] = (recorded or {}).get("id")
            continue
        record = settings.record(stage, {u: current.get(u) for u in SPEC[stage].upstream})
        records[stage], current[stage] = record, record["id"]
        if not _done(cfg, stage):
            run.add(stage)
            continue
        found = lineage.value_changes(recorded, record)
        fed = bool(_reads_from(stage, run))
        if not fed:  # an input redone in this run is no change of this stage's own
            found += lineage.upstream_changes(recorded, record)
        changes += [f"{stage}: {change}" for change in found]
        if found or fed:
            run.add(stage)
    if changes and not cfg.overwrite:
        raise UserError(f"{cfg.output} holds finished stages made with other settings ({'; '.join(changes)}): pass "
                        f"--overwrite to redo them and the stages made from them, or choose another --output")
    requested = [s for s in STAGES if s in cfg.stages]
    if cfg.overwrite and not changes:
        run = set(requested)
    remove = [s for s in STAGES if s not in cfg.stages and _reads_from(s, run)
              and any((cfg.output / name).exists() for name in SPEC[s].outputs)]
    return Plan(records, [s for s in requested if s in run], [s for s in requested if s not in run], remove, changes)


def _reads_from(stage: str, stages: set[str]) -> set[str]:
    """Which of `stages` the stage's output is made from, directly or through the stages between."""
    found = set()
    for upstream in SPEC[stage].upstream:
        found |= ({upstream} & stages) | _reads_from(upstream, stages)
    return found


def _remove_outputs(cfg: Config, stages: list[str]) -> None:
    """Outputs of unrequested stages that a stage redone now makes stale: removed, never left looking current."""
    for stage in stages:
        for name in SPEC[stage].outputs:
            path = cfg.output / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        print(f"skeleton_ds: removed the {stage} outputs in {cfg.output}: they were made from a stage redone now")


def run_pipeline(cfg: Config) -> dict:
    if len(cfg.keep_schedule) > 1:
        return run_schedule(cfg)
    summary_file = cfg.output / "metrics.json"
    previous = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    seconds = dict(previous.get("stage_seconds", {}))
    plan = plan_stages(cfg)
    for stage in plan.remove:
        seconds.pop(stage, None)
    if _is_main():
        for stage in plan.reuse:
            print(f"skeleton_ds: stage {stage} is complete in {cfg.output} with these settings, skipping "
                  f"(--overwrite redoes it)")
        _remove_outputs(cfg, plan.remove)
    for stage in plan.run:
        recipe = recipe_class(stage)(cfg, plan.records[stage])
        if preemption.agreed_stop():  # a stop asked for during the last stage's evaluation or saving
            raise preemption.Preempted(f"stopped on {preemption.signal_name()} before stage {stage}; finished stages "
                                       f"are kept: run the same command with --resume")
        start = time.perf_counter()
        recipe.run()
        seconds[stage] = round(time.perf_counter() - start, 2)
    summary = summarize(cfg, seconds) | {"provenance": provenance()}
    if _is_main() and cfg.output.is_dir():
        checkpoint.write_json(summary_file, summary)
        Reporter(enabled=True).metrics_table(f"{cfg.task}: Skeleton pipeline", _table_rows(summary),
                                             caption=str(summary_file))
    return summary


def is_retuned(cfg: Config) -> bool:
    """Is the run's last stage (its last step's re-tuning) finished with exactly these settings? Then its results
    can be read from its records alone, without its compact model on disk: a table or study resumes from the light
    files of its runs (records, prompts, scores; launch/table_state.sh). A finished stage made with other settings
    is refused here, as the pipeline would."""
    final = schedule.step_configs(cfg)[-1] if len(cfg.keep_schedule) > 1 else cfg
    if final.previous_step is not None and lineage.read_record(final.previous_step, "retune") is None:
        return False
    recorded = lineage.read_record(final.output, "retune")
    return recorded is not None and recorded["id"] == plan_stages(replace(final, stages=STAGES)).records["retune"]["id"]


def _changed_outputs(cfg: Config) -> list[str]:
    """Requested stages whose settings record will differ from the one on disk once run (new or changed). A stage
    run again only because a file is missing (a light-file archive has no compact model) keeps its record id:
    what later steps read from it is unchanged."""
    plan = plan_stages(cfg)
    return [s for s in plan.run if (lineage.read_record(cfg.output, s) or {}).get("id") != plan.records[s]["id"]]


def run_schedule(cfg: Config) -> dict:
    """A keep schedule (skeleton_ds.stages.schedule): every phase planned before any work, up to the first one whose
    outputs change (new settings, or new at all); a later step holding finished stages made from what that changes
    is refused then, without --overwrite. Then every phase runs in turn. DIR/metrics.json summarises the last step
    and lists every step."""
    shared, steps = schedule.phases(cfg)
    stale: tuple[Config, tuple[str, ...]] | None = None  # the first phase whose outputs change, what that makes stale
    if shared is not None:
        changed = _changed_outputs(shared)
        if "prompt" in changed:
            stale = (shared, schedule.STEP_STAGES)
        elif "teacher" in changed and RunSettings(cfg).resolved["teacher_outputs"]:  # distilled re-tuning
            stale = (shared, ("retune",))
    for step in steps:
        if stale is None:
            if step.output != cfg.output and step.output.is_dir():
                schedule.mirror_shared(cfg, step)  # the shared outputs it will read, so its plan sees them
            ready = step.previous_step is None or lineage.read_record(step.previous_step, "retune") is not None
            if not ready or "retune" in _changed_outputs(step):
                stale = (step, schedule.STEP_STAGES)
            continue
        found = [s for s in step.stages if s in stale[1] and _done(step, s)]
        if found and not cfg.overwrite:
            raise UserError(f"{step.output} holds finished stages ({', '.join(found)}) made from what the keep "
                            f"schedule changes in {stale[0].output}: pass --overwrite to redo them too, or choose "
                            f"another --output")
    summary = run_pipeline(shared) if shared else {}
    rows = []
    for step in steps:
        if step.output != cfg.output:
            schedule.mirror_shared(cfg, step)
        summary = run_pipeline(step)
        rows.append(schedule.step_row(step, summary))
    summary |= {"keep_schedule": rows}
    if _is_main() and rows:
        checkpoint.write_json(cfg.output / "metrics.json", summary)
    return summary


def _read(path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def summarize(cfg: Config, stage_seconds: dict) -> dict:
    """What the stages produced so far: dev metrics of the full prompt-tuned model and of the skeleton
    before and after re-tuning, parameter counts, and each stage's wall time."""
    prompt = _read(cfg.output / "prompt" / "metrics.json")
    retune = _read(cfg.output / "retune" / "metrics.json")
    conversion = _read(cfg.output / "conversion.json")
    skeleton = _read(cfg.output / "skeleton.json")
    return {
        "task": cfg.task, "model": cfg.model,
        "full_prompt_tuned": prompt.get("metrics"),
        "skeleton_before_retune": retune.get("before_retune"),
        "skeleton_after_retune": retune.get("metrics"),
        "ffn_keep": skeleton.get("ffn_keep"), "head_keep": skeleton.get("head_keep"),
        "ffn_sizes": skeleton.get("ffn_sizes"),
        "parameters_full": conversion.get("parameters_full"),
        "parameters_compact": conversion.get("parameters_compact"),
        "parameters_kept": conversion.get("parameters_kept", conversion.get("parameters_compact")),
        "stage_seconds": stage_seconds,
        "settings_ids": {s: (lineage.read_record(cfg.output, s) or {}).get("id") for s in STAGES},
    }


def _table_rows(summary: dict) -> dict[str, float]:
    rows = {}
    for key, label in (("full_prompt_tuned", "full model, prompt-tuned"),
                       ("skeleton_before_retune", "skeleton, before retune"),
                       ("skeleton_after_retune", "skeleton, after retune")):
        if summary.get(key):
            rows[f"{label}: accuracy"] = summary[key]["accuracy"]
    if summary.get("parameters_full"):
        rows["parameters full (M)"] = summary["parameters_full"] / 1e6
        rows["parameters compact (M)"] = summary["parameters_compact"] / 1e6
        if summary["parameters_kept"] != summary["parameters_compact"]:
            rows["parameters kept, per-layer widths (M)"] = summary["parameters_kept"] / 1e6
    rows |= {f"{stage} seconds": s for stage, s in summary["stage_seconds"].items()}
    return rows
