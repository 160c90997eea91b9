"""The results table: a real model on real tasks, Skeleton against honest controls.

    skeleton-ds reproduce --data-dir ../shared/data                        # MiniLM, five tasks (about 2 h, 2 cores)
    skeleton-ds reproduce --data-dir ../shared/data --model smollm2-135m   # the decoder (about 10 h; resumes)
    skeleton-ds reproduce --data-dir ../shared/data --tasks cb --seeds 1 --ffn-keeps 0.5 --quick   # minutes
    skeleton-ds reproduce --data-dir ../shared/data --model qwen2.5-1.5b --plan size   # one decoder size, SST-2

The plan follows the model's architecture (ModelPlan: ENCODER, DECODER); `--plan size` is the small SST-2
protocol that compares decoders of different sizes (SIZE). Per task and seed: prompt-tune
the full model (stage 1), score every unit (stage 2) and store the teacher's outputs (a decoder's re-tuning
distills) once; then build each of the plan's skeletons from that prompt and re-tune each the same way
(localize, convert, teacher, retune):
    attribution            activation x gradient scores (the method; decoders: with their localization)
    attribution+comp       the same skeleton with bias compensation (--compensate mean; encoders)
    attribution-labels     the method re-tuned on the labels alone, without distillation (decoders, ablation)
    attribution-retune3    the method re-tuned for three epochs instead of one (decoders: is re-tuning starved?)
    random                 seeded random scores (control)
    weight-magnitude       L2 norm of each unit's input weights (control)
and record the dev metric of the full prompt-tuned model, of each skeleton before and after re-tuning,
the parameter counts (kept: each layer at its own width), the majority-class baseline (did the full
model learn the task at all?) and, for a verbalizer readout, the zero-shot floor (the base model with
the same template and no prompt). Small tasks run several seeds (mean and standard deviation); large
training sets are subsampled (the table says how many examples each task used). The compact model's
speed-up over the full one comes from the benchmark (skeleton_ds.bench, one process). Every run is an
ordinary pipeline output directory, so an interrupted table resumes: a finished stage is reused only
when its recorded settings are the plan's, and a run made with other settings stops the table with
the pipeline's error naming them.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

from skeleton_ds.tables import markdown_table
from skeleton_ds.architectures import DECODER_DEFAULTS
from skeleton_ds.checkpoint import copy_atomically, write_json, write_text
from skeleton_ds.config import Config, as_flags
from skeleton_ds.errors import UserError
from skeleton_ds.lineage import read_record
from skeleton_ds.plots import plot_results
from skeleton_ds.provenance import provenance
from skeleton_ds.stages.pipeline import is_retuned, run_pipeline
from skeleton_ds.stages.settings import RunSettings


@dataclass(frozen=True)
class Variant:
    """One skeleton built from the shared prompt: its scorer, compensation and any other Config fields."""

    scorer: str
    compensate: str = "none"
    extra: dict = field(default_factory=dict)  # further Config fields (an ablation's allocation or re-tuning)
    keeps: tuple[float, ...] | None = None  # only at these FFN keep ratios (None: at every one)
    tasks: tuple[str, ...] | None = None  # only on these tasks (None: on every one)

    def fields(self) -> dict:
        return {"scorer": self.scorer, "compensate": self.compensate, **self.extra}

    def flags(self) -> list[str]:
        """The same fields as `skeleton-ds train` flags: the table's record of what each variant ran."""
        return as_flags(self.fields())


@dataclass(frozen=True)
class HeadRow:
    """Skeletons that also prune attention heads, at one FFN keep: the variants run, on which tasks."""

    ffn_keep: float
    head_keep: float
    variants: tuple[str, ...]
    tasks: tuple[str, ...] | None = None  # None: every task


@dataclass(frozen=True)
class ModelPlan:
    """What the table runs for one kind of model (tasks, skeleton variants, head-pruned rows), and why."""

    tasks: dict[str, dict]  # task -> seeds, train, attr, dev (examples; 0: all), epochs[, retune_epochs]
    variants: dict[str, Variant]
    ffn_keeps: tuple[float, ...]
    head_rows: tuple[HeadRow, ...] = ()
    zero_shot: bool = False  # a verbalizer readout has a floor: the base model with the template, no prompt
    note: str = ""
    architecture: str = "decoder"  # the models it is for (plan_kind): encoder | decoder


# The encoder plan (MiniLM, mean-pooled head: no zero-shot floor). Chosen so the whole table takes about two
# hours on 2 CPU cores (measured 2026-11-26, one seed: COPA 8 min, CB 9, SST-2 10, QNLI 25, RTE 32: its 2,490
# long pairs are re-tuned 12 times), so the small tasks get three seeds and the larger ones one seed, with
# SST-2 and QNLI sampled to 2,000 training examples.
ENCODER = ModelPlan(
    tasks={"sst2": dict(seeds=1, train=2000, attr=500, dev=0, epochs=1.0),
           "qnli": dict(seeds=1, train=2000, attr=1000, dev=0, epochs=1.0),
           "rte": dict(seeds=1, train=0, attr=1000, dev=0, epochs=1.0),
           "cb": dict(seeds=3, train=0, attr=0, dev=0, epochs=4.0),
           "copa": dict(seeds=3, train=0, attr=0, dev=0, epochs=4.0)},
    variants={"attribution": Variant("attribution"), "attribution+comp": Variant("attribution", "mean"),
              "random": Variant("random"), "weight-magnitude": Variant("weight-magnitude")},
    ffn_keeps=(0.2, 0.3, 0.5), architecture="encoder")

# The decoder plan (SmolLM2-135M: 10x MiniLM's non-embedding parameters). Every variant runs the decoder
# defaults (skeleton_ds.architectures.DECODER_DEFAULTS): a global threshold across layers, the massive-activation
# neurons protected (docs/results/study_decoder.md) and re-tuning distilled from the full model, label KL plus
# the final hidden state (docs/results/study_keep.md). The controls differ from the method only in their scores,
# re-tuned the same way, so the method, not the recipe, is what beats them; `attribution-labels` is the method
# re-tuned on the labels alone (the recipe before distillation), which shows what distillation adds, and
# `attribution-retune3` the method with three times the re-tuning budget, which shows whether re-tuning is
# starved (a flag, not a default: it triples re-tuning's cost). Measured on 2 cores (run logs of
# experiments.study_keep and of the first decoder table): a full-model forward and backward pass 2.8 SST-2
# examples/s and 0.9 CB examples/s; re-tuning 4-5 SST-2 examples/s. Estimated from these: one SST-2 skeleton
# about 10 min (2,000 examples, the full dev set before and after), an SST-2 seed about 2 h, a CB seed about
# 1 h, RTE about 1.2 h: the plan about 11 h, resumed across sessions from its light files.
SST2_ONLY = ("sst2",)
CONTROL_KEEPS = (0.3, 0.2)
DECODER = ModelPlan(
    tasks={"sst2": dict(seeds=3, train=2000, attr=300, dev=0, epochs=1.0),
           "cb": dict(seeds=3, train=0, attr=0, dev=0, epochs=4.0, retune_epochs=2.0),
           "rte": dict(seeds=1, train=1000, attr=300, dev=0, epochs=1.0)},
    variants={"attribution": Variant("attribution"),
              "attribution-labels": Variant("attribution", extra={"distill_kl": 0.0, "distill_hidden": 0.0},
                                            keeps=(0.3,), tasks=SST2_ONLY),
              "attribution-retune3": Variant("attribution", extra={"retune_epochs": 3.0}, keeps=(0.3,),
                                             tasks=SST2_ONLY),
              "random": Variant("random", keeps=CONTROL_KEEPS),
              "weight-magnitude": Variant("weight-magnitude", keeps=CONTROL_KEEPS)},
    ffn_keeps=(0.2, 0.3, 0.5),
    head_rows=(HeadRow(0.3, 0.67, ("attribution",), tasks=SST2_ONLY),),
    zero_shot=True,
    note="every variant with the decoder defaults (--keep-mode global, --protect-outliers 20, re-tuning distilled: "
         "--distill-kl 1 --distill-hidden 1) but attribution-labels (--distill-kl 0 --distill-hidden 0); the "
         "controls at FFN keep 0.3 and 0.2; attribution-labels, attribution-retune3 (--retune-epochs 3) and the "
         "head-pruned row on SST-2 only")
# Does a larger decoder keep the task better? (SmolLM2-135M against the real Qwen2.5-1.5B, 13x its parameters.) One
# SST-2 protocol small enough for a 1.5B in fp32 on 2 CPU cores: 500 training examples (2 epochs, and 2 of
# distilled re-tuning), 200 scored, a seeded 400 of the dev set (one standard error about 2 points); the decoder
# defaults; the method at FFN keep 0.5 and 0.3, the random control at 0.3. Estimated on 2 cores from a
# full-model forward and backward pass of about 1 SST-2 example/s for the 1.5B: about 1.5 h; SmolLM2 about 0.3 h.
SIZE = ModelPlan(
    tasks={"sst2": dict(seeds=1, train=500, attr=200, dev=400, epochs=2.0, retune_epochs=2.0)},
    variants={"attribution": Variant("attribution"), "random": Variant("random", keeps=(0.3,))},
    ffn_keeps=(0.3, 0.5), zero_shot=True,
    note="the decoder defaults (--keep-mode global, --protect-outliers 20, re-tuning distilled: --distill-kl 1 "
         "--distill-hidden 1); the random control at FFN keep 0.3, re-tuned the same way")
PLANS = {"encoder": ENCODER, "decoder": DECODER, "size": SIZE}
ARCHITECTURE_PLANS = ("encoder", "decoder")
"""The plans a model gets by its architecture; any other is asked for by name (--plan) and has its own tables."""
QUICK = dict(train=64, attr=32, dev=64, epochs=1.0)
GENERIC_QNLI = dict(task="generic", text_columns=("text_a", "text_b"), label_column="label",
                    label_names=("entailment", "not_entailment"),
                    template="{text_a} Sentence: {text_b} Does the sentence answer the question? Answer: {answer}",
                    verbalizer=("yes", "no"))


def plan_kind(model: str) -> str:
    """'decoder' or 'encoder', from the model's own config (through the adapter, never its name)."""
    from transformers import AutoConfig

    from skeleton_ds.architectures import adapter_for
    from skeleton_ds.loading import resolve_model_path

    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot read the config of --model {model!r} ({e.__class__.__name__}): pass a local "
                        f"model directory, a packaged alias (minilm, smollm2-135m) or a reachable Hub id") from None
    return "decoder" if adapter_for(config.model_type).causal else "encoder"


@dataclass
class ReproduceConfig:
    data_dir: Path
    output: Path = Path("runs/reproduce")
    model: str = "minilm"
    tasks: tuple[str, ...] = ()  # empty: the plan's
    ffn_keeps: tuple[float, ...] = ()  # empty: the plan's
    variants: tuple[str, ...] = ()  # empty: the plan's
    seeds: int = 0  # per task; 0: the plan's (3 for small tasks, else 1)
    quick: bool = False  # tiny subsets, one epoch, no benchmark: a smoke run
    docs: Path | None = Path("docs/results")  # where the table's json/md/png go (None: only OUTPUT/reproduce.json)
    config: str = "ds_configs/zero2.json"
    kind: str = ""  # the plan (PLANS: encoder | decoder | size); empty: the model's architecture's
    command: str = field(default="", compare=False)  # the command line, for the record

    def __post_init__(self) -> None:
        if not self.data_dir.is_dir():
            raise UserError(f"--data-dir {self.data_dir} is not a directory: point it at the GLUE/SuperGLUE files")
        if self.kind not in ("", *PLANS):
            raise UserError(f"--plan must be one of {', '.join(PLANS)}, got {self.kind!r}")
        self.kind = self.kind or plan_kind(self.model)
        plan = PLANS[self.kind]
        self.tasks = self.tasks or tuple(plan.tasks)
        self.ffn_keeps = self.ffn_keeps or plan.ffn_keeps
        self.variants = self.variants or tuple(plan.variants)
        unknown = [t for t in self.tasks if t not in plan.tasks]
        if unknown:
            raise UserError(f"--tasks takes a comma list of {', '.join(plan.tasks)} for this {self.kind}; "
                            f"got {', '.join(unknown)}")
        if any(not 0 < k < 1 for k in self.ffn_keeps):
            raise UserError(f"--ffn-keeps takes ratios in (0, 1), got {self.ffn_keeps}")
        unknown = [v for v in self.variants if v not in plan.variants]
        if unknown:
            raise UserError(f"--variants takes a comma list of {', '.join(plan.variants)} for this {self.kind}; "
                            f"got {', '.join(unknown)}")
        if self.seeds < 0:
            raise UserError(f"--seeds must be >= 0 (0: the plan's), got {self.seeds}")

    @property
    def model_plan(self) -> ModelPlan:
        return PLANS[self.kind]

    @property
    def decoder(self) -> bool:
        return self.model_plan.architecture == "decoder"

    @property
    def docs_stem(self) -> str:
        """docs/results/reproduce.* for the packaged MiniLM (the first table), docs/results/reproduce_<model>.*
        otherwise, and reproduce_<model>_<plan>.* for a plan asked for by name."""
        stem = "reproduce" if self.model == "minilm" else f"reproduce_{Path(self.model).name}"
        return stem if self.kind in ARCHITECTURE_PLANS else f"{stem}_{self.kind}"

    def check_architecture(self) -> None:
        """A plan asked for by name runs only on the architecture it was made for (reads the model's config)."""
        found = plan_kind(self.model)
        if self.model_plan.architecture != found:
            article = "an" if found == "encoder" else "a"
            raise UserError(f"--plan {self.kind} is for {self.model_plan.architecture} models and --model "
                            f"{self.model} is {article} {found}: choose another --plan or --model")

    def plan(self, task: str) -> dict:
        return self.model_plan.tasks[task] | (QUICK if self.quick else {})

    def skeletons(self, task: str) -> list[tuple[float, float, str]]:
        """(FFN keep, head keep, variant) of every skeleton a seed of `task` builds, in table order."""
        plan = self.model_plan

        def planned(variant: Variant, keep: float) -> bool:
            return ((variant.keeps is None or keep in variant.keeps)
                    and (variant.tasks is None or task in variant.tasks))

        runs = [(keep, 1.0, name) for keep in self.ffn_keeps for name in self.variants
                if planned(plan.variants[name], keep)]
        runs += [(row.ffn_keep, row.head_keep, name) for row in plan.head_rows
                 if row.ffn_keep in self.ffn_keeps and (row.tasks is None or task in row.tasks)
                 for name in row.variants if name in self.variants]
        return runs


def _stage(config: Config) -> None:
    run_pipeline(config)


def task_fields(task: str, data_dir: Path) -> dict:
    """The Config fields that name a task and its data."""
    if task == "qnli":  # the shared QNLI training data is a JSON subset: the generic task reads it
        folder = data_dir / "QNLI" / "train_subset"
        return GENERIC_QNLI | {"train_file": folder / "train.json", "dev_file": folder / "dev.json"}
    return {"task": task, "data_dir": data_dir}


def _seconds(run: Path) -> float:
    """Wall seconds the pipeline spent on a run (its metrics.json), so a resumed table still reports its cost."""
    return sum(json.loads((run / "metrics.json").read_text()).get("stage_seconds", {}).values())


def stage_config(task: str, seed: int, cfg: ReproduceConfig, output: Path) -> Config:
    """The pipeline configuration every stage run of a task and seed shares, writing to `output`."""
    plan = cfg.plan(task)
    return Config(model=cfg.model, ds_config=Path(cfg.config), seed=seed, epochs=plan["epochs"],
                  max_train_examples=plan["train"], max_eval_examples=plan["dev"], attr_examples=plan["attr"],
                  retune_epochs=plan.get("retune_epochs", 0.0), output=output,
                  resume=True,  # an interrupted run continues from its checkpoint
                  **task_fields(task, cfg.data_dir))


def _check_shared(run: Path, full: Path, stage: str) -> None:
    """A skeleton run's copy of the shared prompt (or scores) must be the full run's current one."""
    copied, shared = read_record(run, stage), read_record(full, stage)
    if copied is not None and shared is not None and copied["id"] != shared["id"]:
        raise UserError(f"{run} was built from another {stage} output than {full}: remove {run} (or choose another "
                        f"--output) to rebuild it from the current one")


def distills(config: Config) -> bool:
    """Does this skeleton re-tune distilled (the decoder default)? Then the full run's teacher outputs are its."""
    return bool(RunSettings(config).resolved["teacher_outputs"])


def _run_name(keep: float, head: float, variant: str) -> str:
    return f"keep{keep:g}-{variant}" if head == 1.0 else f"keep{keep:g}-heads{head:g}-{variant}"


def zero_shot(full: Path, cfg: ReproduceConfig, task: str, seed: int) -> float:
    """The floor: the base model's dev accuracy with the task's template and verbalizer and no soft prompt,
    on the same dev examples (FULL/zero_shot.json, reused while the prompt record it was made with stands)."""
    from skeleton_ds.inference import InferenceConfig, Predictor
    from skeleton_ds.tasks import load_split, subset

    prompt_id = read_record(full, "prompt")["id"]
    path = full / "zero_shot.json"
    if path.is_file():
        done = json.loads(path.read_text())
        if done["prompt_settings_id"] == prompt_id:
            return done["accuracy"]
    predictor = Predictor.from_prompt(cfg.model, full / "prompt", InferenceConfig(device="cpu", dtype="fp32"),
                                      zero_shot=True)
    # the pipeline's dev subset (tasks.subset); a generic task reads its own files through task_fields
    dev = subset(load_split(predictor.task, "dev", cfg.data_dir), cfg.plan(task)["dev"], seed)
    accuracy = predictor.evaluate(dev)["metrics"]["accuracy"]
    write_json(path, {"accuracy": accuracy, "dev_examples": len(dev), "prompt_settings_id": prompt_id})
    return accuracy


def run_task(task: str, seed: int, cfg: ReproduceConfig) -> list[dict]:
    """Every run goes through the pipeline, which reuses a finished stage only when its recorded
    settings are these flags' (and refuses a changed one), so a table never reads back a stale run."""
    base = cfg.output / task / f"seed{seed}"
    _stage(replace(stage_config(task, seed, cfg, base / "full"), stages=("prompt", "attribute", "teacher")))
    full = json.loads((base / "full" / "prompt" / "metrics.json").read_text())
    floor = zero_shot(base / "full", cfg, task, seed) if cfg.model_plan.zero_shot else None
    skeletons = cfg.skeletons(task)
    full_seconds = _seconds(base / "full") / len(skeletons)  # shared by every skeleton
    rows = []
    for keep, head, name in skeletons:
        variant = cfg.model_plan.variants[name]
        run = base / _run_name(keep, head, name)
        if not (run / "prompt").exists():  # every skeleton starts from the same stage-1 prompt
            copy_atomically(base / "full" / "prompt", run / "prompt")
        _check_shared(run, base / "full", "prompt")
        if variant.scorer == "attribution":
            if not (run / "attribution.safetensors").exists():
                copy_atomically(base / "full" / "attribution.safetensors", run / "attribution.safetensors")
            _check_shared(run, base / "full", "attribute")
        config = replace(stage_config(task, seed, cfg, run), ffn_keep=keep, head_keep=head,
                         stages=("attribute", "localize", "convert", "teacher", "retune"), **variant.fields())
        if distills(config):  # every distilled skeleton reads the full run's teacher outputs
            if not (run / "teacher.safetensors").exists():
                copy_atomically(base / "full" / "teacher.safetensors", run / "teacher.safetensors")
            _check_shared(run, base / "full", "teacher")
        if not is_retuned(config):  # finished with exactly these settings: its row is read from its records
            _stage(config)
        retune = json.loads((run / "retune" / "metrics.json").read_text())
        conversion = json.loads((run / "conversion.json").read_text())
        rows.append({"task": task, "seed": seed, "ffn_keep": keep, "head_keep": head, "variant": name,
                     "full": full["metrics"]["accuracy"], "before": retune["before_retune"]["accuracy"],
                     "after": retune["metrics"]["accuracy"], "zero_shot": floor,
                     "parameters_full": conversion["parameters_full"],
                     "parameters_compact": conversion.get("parameters_kept", conversion["parameters_compact"]),
                     "train_examples": full["train_examples"], "dev_examples": full["dev_examples"],
                     "majority": full.get("dev_majority"), "run": str(run),
                     "seconds": round(_seconds(run) + full_seconds, 1)})
    return rows


def _key(r: dict) -> tuple:
    return r["task"], r["ffn_keep"], r.get("head_keep", 1.0), r["variant"]


def aggregate(rows: list[dict], record_plan: dict, variants: list[str]) -> list[dict]:
    """Mean and standard deviation over seeds per (task, FFN keep, head keep, variant), in plan order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_key(r), []).append(r)

    def order(key: tuple) -> tuple:
        return list(record_plan).index(key[0]), -key[2], -key[1], variants.index(key[3])

    out = []
    for key in sorted(groups, key=order):
        rs = groups[key]
        stats = {}
        for k in ("full", "before", "after"):
            values = [r[k] for r in rs]
            stats |= {f"{k}_mean": statistics.mean(values),
                      f"{k}_std": statistics.stdev(values) if len(values) > 1 else 0.0}
        floors = [r["zero_shot"] for r in rs if r.get("zero_shot") is not None]
        first = rs[0]
        out.append({"task": key[0], "ffn_keep": key[1], "head_keep": key[2], "variant": key[3], "seeds": len(rs),
                    **stats, "zero_shot_mean": statistics.mean(floors) if floors else None,
                    **{k: first[k] for k in ("majority", "parameters_full", "parameters_compact", "train_examples",
                                             "dev_examples")}})
    return out


def speedups(cfg: ReproduceConfig, work: Path) -> dict[str, float]:
    """The compact model's speed-up over the full model per skeleton (batch 32, this machine), measured in one
    process: MiniLM at uniform keeps; a decoder from the first task's real scores with the plan's localization,
    so each layer runs at the width the table's skeletons keep. Keys: "0.3", or "0.3/0.67" with head pruning."""
    from skeleton_ds.bench import SHAPES, BenchConfig, run_bench

    heads = sorted({head for task in cfg.tasks for _, head, _ in cfg.skeletons(task) if head != 1.0})
    if cfg.decoder:
        if Path(cfg.model).name not in SHAPES:  # the benchmark builds only the shapes it knows
            return {}
        task = cfg.tasks[0]
        bench = BenchConfig(shape=Path(cfg.model).name, run_dir=cfg.output / task / "seed0" / "full",
                            data_dir=cfg.data_dir, keep_mode=DECODER_DEFAULTS.keep_mode,
                            protect_outliers=DECODER_DEFAULTS.protect_outliers,
                            ffn_keeps=(1.0, *cfg.ffn_keeps), head_keep=heads[0] if heads else 1.0, batch_sizes=(32,),
                            rounds=5, warmup=1, skip_peft=True, output=work / "bench")
    else:
        bench = BenchConfig(shape="minilm", ffn_keeps=(1.0, *cfg.ffn_keeps), batch_sizes=(32,), rounds=5, warmup=1,
                            skip_peft=True, output=work / "bench")
    result = run_bench(bench)
    # a head-pruned row records the share of KV groups it kept, which under global allocation is not the plan's
    # ratio (0.67 planned keeps 63 of SmolLM2's 90 groups: 0.7); the table looks it up by the plan's
    return {_speedup_key(r["ffn_keep"], bench.head_keep if r["head_keep"] < 1 else 1.0):
            r["speedup_vs_full"] for r in result["rows"] if r["contender"].startswith("compact")
            and r["quant"] == "none" and "speedup_vs_full" in r and r.get("lengths", "fixed") == "fixed"}


def learned(row: dict) -> bool | None:
    """Did the full prompt-tuned model beat the majority class (by more than 2 points)?"""
    return None if row["majority"] is None else row["full_mean"] > row["majority"] + 0.02


def _full_cell(row: dict) -> str:
    """The full model's metric, and whether it learned the task at all."""
    flag = {None: "", True: " (learned)", False: " (not learned)"}[learned(row)]
    return _pm(row["full_mean"], row["full_std"], row["seeds"]) + flag


def _label(record: dict, r: dict) -> str:
    """task (train / dev examples, seeds); a training split cut to the plan's cap says "sampled"."""
    cap = record["plan"][r["task"]]["train"]
    sampled = " sampled" if cap and r["train_examples"] >= cap else ""
    return f"{r['task']} ({r['train_examples']}{sampled} / {r['dev_examples']}, {r['seeds']})"


def _plan_note(record: dict) -> str:
    order = record.get("task_order") or list(ENCODER.tasks)
    plan = sorted(record["plan"].items(), key=lambda kv: order.index(kv[0]))  # JSON sorts the keys
    note = "Plan (0: all): " + "; ".join(
        f"{task} {p['seeds']} seed(s), {p['train'] or 'all'} training examples, {p['attr'] or 'all'} scored, "
        f"{p['epochs']:g} epoch(s)" + (f" ({p['retune_epochs']:g} re-tuning)" if p.get("retune_epochs") else "")
        for task, p in plan) + "."
    return note + (f" Skeletons: {record['note']}." if record.get("note") else "")


def _pm(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.3f}" + (f" ± {std:.3f}" if seeds > 1 else "")


def _keep_label(r: dict) -> str:
    head = r.get("head_keep", 1.0)
    return f"{r['ffn_keep']:g}" + ("" if head == 1.0 else f", heads {head:g}")


def _speedup_key(ffn_keep: float, head_keep: float) -> str:
    """"0.3", or "0.3/0.67" with the plan's head keep."""
    return format(ffn_keep, "g") + ("" if head_keep == 1.0 else f"/{head_keep:g}")


def speedup_cell(record: dict, r: dict) -> str:
    """A table row's measured speed-up ("1.77x"), or "-" where the benchmark did not run its skeleton."""
    value = record["speedups"].get(_speedup_key(r["ffn_keep"], r.get("head_keep", 1.0)))
    return "-" if value is None else f"{value:.2f}x"


def _floor_columns(record: dict) -> bool:
    return any(r.get("zero_shot_mean") is not None for r in record["table"])


def _floor(r: dict) -> str:
    return "-" if r.get("zero_shot_mean") is None else f"{r['zero_shot_mean']:.3f}"


def readme_table(record: dict) -> str:
    """The results guide's view: one row per task and keep ratio, each variant's dev metric after re-tuning (before
    re-tuning in brackets), the best variant in bold. The markdown file has every number."""
    variants = record.get("variants") or list(ENCODER.variants)
    floor = _floor_columns(record)
    lines = markdown_table(["task (train / dev examples, seeds)", "majority", *(["zero-shot"] if floor else []),
                            "full model", "FFN keep", *variants, "parameters", "speed-up"])
    cells: dict[tuple, dict] = {}
    for r in record["table"]:
        cells.setdefault((r["task"], r["ffn_keep"], r.get("head_keep", 1.0)), {})[r["variant"]] = r
    previous = None
    for (task, _, _), row_variants in cells.items():
        first = next(iter(row_variants.values()))
        best = max(r["after_mean"] for r in row_variants.values())
        row = [_label(record, first), "-" if first["majority"] is None else f"{first['majority']:.3f}",
               *([_floor(first)] if floor else []), _full_cell(first)] if task != previous \
            else [""] * (4 if floor else 3)
        row.append(_keep_label(first))
        for variant in variants:
            r = row_variants.get(variant)
            after = "-" if r is None else _pm(r["after_mean"], r["after_std"], r["seeds"])
            row.append("-" if r is None else (f"**{after}**" if r["after_mean"] == best else after)
                       + f" ({r['before_mean']:.3f})")
        row += [f"{first['parameters_compact'] / 1e6:.1f}M / {first['parameters_full'] / 1e6:.1f}M",
                speedup_cell(record, first)]
        lines.append("| " + " | ".join(row) + " |")
        previous = task
    return "\n".join(lines) + "\n"


def markdown(record: dict) -> str:
    floor = _floor_columns(record)
    lines = [f"Skeleton on real tasks, {record['model']} ({record['date']}, {record['seconds'] / 60:.0f} min of "
             f"pipeline runs): `{record['command']}`", "",
             *markdown_table(["task (train / dev examples, seeds)", "majority", *(["zero-shot"] if floor else []),
                              "full model", "FFN keep", "variant", "before re-tuning", "after re-tuning",
                              "parameters", "speed-up"])]
    for r in record["table"]:
        lines.append(f"| {_label(record, r)} | "
                     f"{'-' if r['majority'] is None else format(r['majority'], '.3f')} | "
                     + (f"{_floor(r)} | " if floor else "")
                     + f"{_full_cell(r)} | {_keep_label(r)} | {r['variant']} | "
                     f"{_pm(r['before_mean'], r['before_std'], r['seeds'])} | "
                     f"{_pm(r['after_mean'], r['after_std'], r['seeds'])} | "
                     f"{r['parameters_compact'] / 1e6:.1f}M / {r['parameters_full'] / 1e6:.1f}M | "
                     f"{speedup_cell(record, r)} |")
    return "\n".join(lines + ["", _plan_note(record)]) + "\n"


def reproduce(cfg: ReproduceConfig) -> dict:
    start = time.perf_counter()
    plan = cfg.model_plan
    cfg.check_architecture()
    # MiniLM's speed-ups come first (a failure shows in minutes); a decoder's need the first task's scores
    measured = {} if cfg.quick or cfg.decoder else speedups(cfg, cfg.output)
    rows = []
    for task in sorted(cfg.tasks, key=list(plan.tasks).index, reverse=True):  # the small tasks first
        for seed in range(cfg.seeds or cfg.plan(task)["seeds"]):
            rows += run_task(task, seed, cfg)
    if not cfg.quick and cfg.decoder:
        measured = speedups(cfg, cfg.output)
    variants = list(cfg.variants)
    record = {"provenance": provenance(cfg.command or None), "command": cfg.command,
              "date": date.today().isoformat(), "model": cfg.model, "kind": cfg.kind,
              "plan": {t: cfg.plan(t) for t in cfg.tasks}, "task_order": list(plan.tasks), "variants": variants,
              "variant_flags": {v: plan.variants[v].flags() for v in variants}, "note": plan.note,
              "quick": cfg.quick, "rows": rows, "table": aggregate(rows, plan.tasks, variants),
              "speedups": measured, "wall_seconds": round(time.perf_counter() - start, 1),
              "seconds": round(sum(r["seconds"] for r in rows), 1)}
    write_json(cfg.output / "reproduce.json", record)
    if cfg.docs is not None:
        cfg.docs.mkdir(parents=True, exist_ok=True)
        write_json(cfg.docs / f"{cfg.docs_stem}.json", record)
        write_text(cfg.docs / f"{cfg.docs_stem}.md", markdown(record))
        plot_results([r for r in record["table"] if r["head_keep"] == 1.0], variants,
                     cfg.docs / f"{cfg.docs_stem}.png",
                     title=f"{cfg.model}: dev accuracy after re-tuning (mean ± std over seeds)")
    return record
