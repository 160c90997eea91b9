"""The settings each stage's output depends on, derived from the run's flags (see skeleton_ds.lineage).

Only what changes a stage's result is recorded: the base model (name, revision, config hash), the task
and a sha256 of each data file it reads, and the stage's own flags. Where outputs go (--output),
checkpointing (--save-every, --resume), the ZeRO stage and the world size (at a fixed global batch)
are left out, so moving a run or resuming it on more ranks is not a change.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from skeleton_ds import checkpoint, distributed, lineage
from skeleton_ds.architectures import adapter_for
from skeleton_ds.config import Config
from skeleton_ds.data import ENCODING
from skeleton_ds.distill import outputs_needed
from skeleton_ds.ds_config import param_dtype, resolve_ds_config
from skeleton_ds.errors import UserError
from skeleton_ds.loading import resolve_model_path
from skeleton_ds.model_identity import model_identity
from skeleton_ds.stage_specs import SPEC

class RunSettings:
    """The expected settings record of every stage for one Config, each shared part computed once."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @cached_property
    def _model_config(self) -> tuple[str, object]:
        from transformers import AutoConfig

        cfg = self.cfg
        path = resolve_model_path(cfg.model)
        try:
            return path, AutoConfig.from_pretrained(path, revision=cfg.revision)
        except (OSError, ValueError) as e:
            raise UserError(f"--model {cfg.model}: cannot read its config ({str(e).splitlines()[0]})") from None

    @cached_property
    def base(self) -> dict:
        """The base model's identity: the name given, its revision and its config hash (no weights read)."""
        cfg = self.cfg
        path, config = self._model_config
        identity = model_identity(cfg.model, path, config, cfg.revision)
        weights = {"weights_sha256": identity["weights_sha256"]} if "weights_sha256" in identity else {}
        return {"name": cfg.model, "revision": identity["revision"], "config_sha256": identity["config_sha256"],
                **weights}

    @cached_property
    def task(self) -> dict:
        """The task (with a generic task's template, columns and labels) and a sha256 per data file."""
        from skeleton_ds.tasks import get_task, split_file

        cfg = self.cfg
        spec = cfg.generic_spec()
        task = get_task(cfg.task, spec, decoder=adapter_for(self._model_config[1].model_type).causal)
        data = {}
        for split in ("train", "dev"):
            path = split_file(task, split, cfg.data_dir, spec)
            data[split] = f"hub:{task.hub}/{task.name}" if path is None else checkpoint.sha256(Path(path))
        return {"name": task.name, "template": task.template, "encoding": ENCODING, "fields": list(task.fields),
                "label_names": list(task.label_names), "verbalizer": list(task.verbalizer), "data_sha256": data,
                **({"label_column": cfg.label_column} if spec else {})}

    @cached_property
    def batch(self) -> dict:
        """The global batch and the training precision, as DeepSpeed will run them."""
        cfg = self.cfg
        ds = resolve_ds_config(cfg.ds_config, world_size=distributed.world_size_from_env(),
                               batch_size=cfg.batch_size, lr=cfg.lr, precision=cfg.precision)
        return {"global_batch": ds["train_batch_size"], "precision": str(param_dtype(ds)).replace("torch.", "")}

    @cached_property
    def resolved(self) -> dict:
        """Flags whose default depends on the architecture, as this model resolves them (a run with
        the default and one naming the same value explicitly are the same run), and settings derived
        from flags: the teacher tensors the --distill-* flags need (its weights alone change no teacher)."""
        cfg = self.cfg
        defaults = adapter_for(self._model_config[1].model_type).resolve(vars(cfg))
        if cfg.distill_layers and not defaults["distill_hidden"]:
            raise UserError("--distill-layers matches those layers' hidden states, which this architecture does not "
                            "distill by default: give their weight with --distill-hidden W (> 0)")
        return defaults | {"teacher_outputs": outputs_needed(defaults["distill_kl"], defaults["distill_hidden"],
                                                             cfg.distill_layers)}

    def value(self, stage: str, name: str):
        """A flag as `stage` uses it: resolved for this architecture, or the stage's own override."""
        if name in self.resolved:
            return self.resolved[name]
        override = SPEC[stage].overrides.get(name)
        return (override and getattr(self.cfg, override)) or getattr(self.cfg, name)

    @cached_property
    def previous_step(self) -> dict:
        """{"previous_step": id of its re-tuning record} in a keep schedule's later step; {} otherwise."""
        step = self.cfg.previous_step
        if step is None:
            return {}
        record = lineage.read_record(step, "retune")
        if record is None:
            raise UserError(f"{step} holds no finished re-tuning: run the keep schedule from its start (same --output)")
        return {"previous_step": record["id"]}

    def values(self, stage: str) -> dict:
        """The settings `stage` records: the shared parts it uses, then its own flags (its StageSpec)."""
        spec = SPEC[stage]
        own = {name: checkpoint.json_value(self.value(stage, name)) for name in spec.flags}
        own |= self.previous_step if spec.reads_previous_step else {}
        shared = {"base": self.base} if "base" in spec.uses else {}
        shared |= {"task": self.task} if "task" in spec.uses else {}
        return shared | own | (self.batch if "batch" in spec.uses else {})

    def record(self, stage: str, upstream: dict[str, str | None]) -> dict:
        """The stage's record; an input this configuration does not read is no input of it (re-tuning reads the
        teacher's outputs only when it distills, so a run without distillation never depends on them)."""
        if not self.resolved["teacher_outputs"]:
            upstream = {name: id_ for name, id_ in upstream.items() if name != "teacher"}
        return lineage.make_record(stage, self.values(stage), upstream)

    def on_disk(self, stage: str) -> dict:
        """The record `stage` would write now, reading its inputs' records from the run directory
        (a recipe run on its own, outside the pipeline's plan)."""
        upstream = {u: (lineage.read_record(self.cfg.output, u) or {}).get("id") for u in SPEC[stage].upstream}
        return self.record(stage, upstream)
