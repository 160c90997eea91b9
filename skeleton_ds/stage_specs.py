"""Every pipeline stage declared once: what it reads, what it writes, which settings it records, and which
recipe runs it. The pipeline's plan, the settings records (skeleton_ds.stages.settings), the lineage check
(skeleton_ds.lineage, `skeleton-ds verify`) and `--stages` all read this table, so a new stage is one entry
here and one recipe (skeleton_ds.stages.recipe.Recipe).

The recipe is named, not imported: this table sits in the bottom layer, which never imports a stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageSpec:
    name: str
    recipe: str
    """"module:Class" of the recipe that runs it (imported by the pipeline only)."""
    upstream: tuple[str, ...]
    """The stage outputs it reads, whose record ids its own record carries."""
    outputs: tuple[str, ...]
    """Its outputs in a run directory (removed when a stage it was made from is redone)."""
    finished: str
    """The file whose presence says it finished: written last, atomically."""
    record: str
    """Where its settings record lives: "FILE#key.path" in a JSON file, or a safetensors FILE (metadata)."""
    flags: tuple[str, ...]
    """Its own flags that change its output: Config field names, or a value RunSettings.resolved derives from
    them (the architecture's keep mode, the teacher outputs distillation needs)."""
    uses: tuple[str, ...]
    """The shared parts it depends on: the base model, the task and its data, the global batch and precision."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Flags it takes from another Config field when that is set (non-zero): re-tuning's own budget."""
    reads_previous_step: bool = False
    """In a keep schedule's later step, it starts from the step before (its compact model and re-tuned prompt),
    so its record carries that step's re-tuning record id."""


SPECS: tuple[StageSpec, ...] = (
    StageSpec("prompt", "skeleton_ds.stages.prompt_tuning:PromptTuningRecipe", upstream=(), outputs=("prompt",),
              finished="prompt/prompt.safetensors", record="prompt/metrics.json#settings",
              flags=("prompt_length", "prompt_init", "readout", "epochs", "max_steps", "lr", "head_lr",
                     "warmup_steps", "weight_decay", "max_length", "seed", "max_train_examples", "max_eval_examples",
                     "quant"),
              uses=("base", "task", "batch")),
    StageSpec("attribute", "skeleton_ds.stages.attribute:AttributionRecipe", upstream=("prompt",),
              outputs=("attribution.safetensors",), finished="attribution.safetensors",
              record="attribution.safetensors",
              flags=("scorer", "attr_reduce", "attr_positions", "ig_steps", "attr_examples", "attr_include_prompt",
                     "seed", "max_train_examples", "quant"),
              uses=("base", "task", "batch"), reads_previous_step=True),
    StageSpec("localize", "skeleton_ds.stages.localize:LocalizeRecipe", upstream=("attribute",),
              outputs=("skeleton.json", "skeleton_ffn.png", "skeleton_heads.png"), finished="skeleton.json",
              record="skeleton.json#settings",
              flags=("ffn_keep", "head_keep", "align", "keep_mode", "protect_outliers"), uses=()),
    StageSpec("convert", "skeleton_ds.stages.convert:ConvertRecipe", upstream=("localize", "prompt"),
              outputs=("compact", "conversion.json"), finished="compact/manifest.json",
              record="compact/config.json#skeleton_ds.settings", flags=("compensate", "slice_lm_head"),
              uses=("base",)),
    StageSpec("teacher", "skeleton_ds.stages.teacher:TeacherRecipe", upstream=("prompt",),
              outputs=("teacher.safetensors",), finished="teacher.safetensors", record="teacher.safetensors",
              flags=("teacher_outputs", "seed", "max_train_examples"), uses=("base", "task", "batch")),
    StageSpec("retune", "skeleton_ds.stages.prompt_tuning:RetuneRecipe", upstream=("convert", "teacher"),
              outputs=("retune",), finished="retune/prompt.safetensors", record="retune/metrics.json#settings",
              flags=("epochs", "max_steps", "lr", "head_lr", "warmup_steps", "weight_decay", "seed",
                     "max_train_examples", "max_eval_examples", "quant", "distill_kl", "distill_temperature",
                     "distill_hidden", "distill_layers"),
              uses=("task", "batch"), overrides={"epochs": "retune_epochs", "lr": "retune_lr"},
              reads_previous_step=True),
)
"""In pipeline order. convert ships the stage-1 prompt with the compact model; the teacher is the full model with
that prompt, whose outputs re-tuning distills from."""

SPEC: dict[str, StageSpec] = {spec.name: spec for spec in SPECS}
STAGE_ORDER: tuple[str, ...] = tuple(SPEC)
