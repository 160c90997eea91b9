"""What every stage that runs the prompted model shares: the task's data, the frozen backbone, the
PromptedClassifier, dev evaluation, and reading stage 1's task record.

Stages (skeleton_ds/stages/*) sit on top of the algorithm modules (attribution, localization,
conversion, interop) and the shared helpers; nothing below imports them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from skeleton_ds import checkpoint, data, distributed
from skeleton_ds.config import Config
from skeleton_ds.ds_config import param_dtype, resolve_ds_config, zero_stage
from skeleton_ds.errors import UserError
from skeleton_ds.loading import Backbone, load_backbone, resolve_model_path
from skeleton_ds.model_identity import check_identity
from skeleton_ds.stages.recipe import RecipeBase
from skeleton_ds.prompt import PromptedClassifier, read_task_record, verbalizer_token_ids
from skeleton_ds.tasks import GenericTaskSpec, Task, compute_metrics, describe_subset, get_task, load_split, subset
from skeleton_ds.ui import Reporter


class TaskModelRun(RecipeBase):
    """The recipe base of every stage that runs the prompted model over a task's data: validation of the
    inputs (before any process group or file exists), the process group, the frozen backbone, the
    encoded splits and the PromptedClassifier."""

    def __init__(self, cfg: Config, planned: dict | None = None):
        super().__init__(cfg, planned)
        # What setup() builds (load_examples, build_model, build_prompted_base), declared here: None until then.
        self.generic: GenericTaskSpec | None = None
        self.task: Task | None = None
        self.dev_selection: str | None = None
        self.ds_config: dict | None = None
        self.dist: distributed.Dist | None = None
        self.report: Reporter | None = None
        self.backbone: Backbone | None = None
        self.backbone_local_fraction: float | None = None
        self.readout: str | None = None
        self.label_token_ids: list[int] | None = None
        self.train_set: list[data.Encoded] = []
        self.dev_set: list[data.Encoded] = []
        self.model: PromptedClassifier | None = None
        self.prompt_length: int | None = None
        self.engine = None  # the DeepSpeed engine a recipe's setup() makes around the model

    def load_examples(self) -> tuple[list, list]:
        """The capped training and dev examples (tasks.subset), with `dev_selection` saying which dev examples."""
        cfg = self.cfg
        self.generic = cfg.generic_spec()
        self.task = get_task(cfg.task, self.generic)
        train = subset(load_split(self.task, "train", cfg.data_dir, self.generic), cfg.max_train_examples, cfg.seed)
        dev = load_split(self.task, "dev", cfg.data_dir, self.generic)
        self.dev_selection = describe_subset(cfg.max_eval_examples, len(dev), cfg.seed)
        return train, subset(dev, cfg.max_eval_examples, cfg.seed)

    def build_model(self, ds_config: dict, train: list, dev: list, *, readout: str, prompt_length: int,
                    max_length: int, model_name: str | None = None, layer_widths: bool = True) -> PromptedClassifier:
        """Join the process group, load the backbone, encode the splits, wrap the backbone with a prompt."""
        self.ds_config = ds_config
        self.dist = distributed.init_distributed()
        self.report = Reporter(enabled=self.dist.is_main)
        name = model_name or self.cfg.model
        with checkpoint.unreadable_as_user_error(Path(resolve_model_path(name)),
                                                 fix="re-download or re-save the model"):
            backbone = load_backbone(name, ds_config, readout=readout, revision=self.cfg.revision,
                                     quant=self.cfg.quant, device=str(distributed.device()), layer_widths=layer_widths)
        self.backbone = backbone
        self.task = get_task(self.cfg.task, self.generic, decoder=backbone.adapter.causal)
        self.backbone_local_fraction = distributed.local_fraction(backbone.model.parameters())
        self.readout = "head" if readout == "head" or not (backbone.adapter.causal or backbone.has_mlm_head) \
            else ("lm" if backbone.adapter.causal else "mlm")
        context = getattr(backbone.model.config, "max_position_embeddings", None)
        if context is not None and prompt_length + max_length > context:
            raise UserError(f"--prompt-length {prompt_length} + --max-length {max_length} exceeds the model's "
                            f"context of {context} positions: lower one of them")
        tok = backbone.tokenizer
        self.label_token_ids = None if self.readout == "head" else verbalizer_token_ids(tok, self.task.verbalizer)
        self.train_set = data.encode(self.task, train, tok, max_length=max_length, readout=self.readout)
        self.dev_set = data.encode(self.task, dev, tok, max_length=max_length, readout=self.readout)
        self.model = PromptedClassifier(backbone.model, backbone.adapter, self.readout, prompt_length,
                                        len(self.task.label_names), self.label_token_ids, backbone.label_head)
        return self.model

    def build_prompted_base(self, record: dict, prompt_dir: Path, model_name: str | None = None,
                            layer_widths: bool = True) -> PromptedClassifier:
        """The frozen base model with the stage-1 prompt (`record` is its task.json), for passes that train
        nothing (attribution, the teacher): no optimizer, and below ZeRO-3 nothing to partition either
        (DeepSpeed refuses ZeRO-1/2 without an optimizer). Sets prompt_length. A keep schedule's later steps
        pass a compact model (`model_name`, padded to uniform widths) and its re-tuned prompt instead."""
        cfg = self.cfg
        ds_config = resolve_ds_config(cfg.ds_config, world_size=distributed.world_size_from_env(),
                                      batch_size=cfg.batch_size, lr=cfg.lr, precision=cfg.precision)
        ds_config.pop("optimizer", None)
        if zero_stage(ds_config) < 3:
            ds_config["zero_optimization"] = {"stage": 0}
        train, dev = self.load_examples()
        self.prompt_length = record["prompt_length"]
        model = self.build_model(ds_config, train, dev, readout="head" if record["readout"] == "head" else "verbalizer",
                                 prompt_length=self.prompt_length, max_length=record["max_length"],
                                 model_name=model_name, layer_widths=layer_widths)
        check_identity(record["base_model"], self.backbone.identity, f"the prompt in {prompt_dir}")
        self.set_trainable(checkpoint.load_tensors(prompt_dir / "prompt.safetensors"))
        return model

    def set_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load prompt (and head) values; before deepspeed.initialize, so every rank starts equal."""
        self.model.load_trained(tensors, param_dtype(self.ds_config))

    def _forward(self, items: list[data.Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.collate(items)
        logits = self.engine(batch["input_ids"], batch["attention_mask"], batch["answer_index"])
        return logits, batch["labels"]

    def collate(self, items: list[data.Encoded]) -> dict[str, torch.Tensor]:
        batch = data.collate(items, self.backbone.tokenizer.pad_token_id, left_pad=self.backbone.adapter.causal)
        return {k: v.to(distributed.device()) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Task metrics plus mean cross-entropy on the dev split, computed over all ranks' shards."""
        self.engine.eval()
        indices, real = data.eval_shard(len(self.dev_set), self.dist.rank, self.dist.world_size)
        micro = self.ds_config["train_micro_batch_size_per_gpu"] * 2
        predictions: list[int] = []
        losses: list[float] = []
        for i in range(0, len(indices), micro):
            logits, labels = self._forward([self.dev_set[j] for j in indices[i:i + micro]])
            predictions.extend(logits.argmax(-1).tolist())
            losses.extend(F.cross_entropy(logits, labels, reduction="none").tolist())
        shards = [None] * self.dist.world_size
        torch.distributed.all_gather_object(shards, (predictions[:real], losses[:real]))
        predictions = [p for shard, _ in shards for p in shard]
        losses = [x for _, shard in shards for x in shard]
        metrics = compute_metrics(self.task, predictions, [e.label for e in self.dev_set])
        return metrics | {"loss": sum(losses) / len(losses)}


def previous_step(cfg: Config) -> tuple[Path, Path]:
    """A keep schedule's previous step (cfg.previous_step): its compact model and its re-tuned prompt, which
    the next step scores and re-tunes from."""
    step = Path(cfg.previous_step)
    compact, prompt = step / "compact", step / "retune"
    if not ((compact / "manifest.json").is_file() and (prompt / "prompt.safetensors").is_file()):
        raise UserError(f"{step} holds no finished keep-schedule step (a compact model and its re-tuned prompt): "
                        f"run the schedule from its start (same --output)")
    return compact, prompt


def read_prompt_record(prompt_dir: Path, cfg: Config) -> dict:
    """Stage 1's task.json, checked against this run's task."""
    if not (prompt_dir / "prompt.safetensors").is_file():
        raise UserError(f"{prompt_dir} has no trained prompt: run --stages prompt first (same --output)")
    record = read_task_record(prompt_dir, "stage-1 task record")
    if record["task"] != cfg.task:
        raise UserError(f"{prompt_dir} was trained for task {record['task']!r}, not {cfg.task!r}: "
                        f"pass --task {record['task']}")
    return record
