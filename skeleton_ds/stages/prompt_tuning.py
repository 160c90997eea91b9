"""Pipeline stage 1: prompt-tune a frozen model under DeepSpeed ZeRO-0/2/3 (and stage 5, re-tuning).

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR --stages prompt
    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR --stages retune

One recipe class, torchtune style: `setup()` builds everything (and resumes), `train()` runs the
optimizer steps with resumable checkpoints, `evaluate()` scores the dev split, `save()` publishes
DIR/prompt/{prompt.safetensors, task.json, metrics.json} atomically, `cleanup()` releases the
process group. Every rank runs the same code; only rank 0 writes files and prints.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time

import torch
import torch.nn.functional as F

from skeleton_ds import checkpoint, data, distributed, lineage, model_card, preemption
from skeleton_ds.config import Config
from skeleton_ds.distill import hidden_layers, outputs_needed, read_teacher
from skeleton_ds.distill import loss as distill_loss
from skeleton_ds.ds_config import resolve_ds_config, zero_stage
from skeleton_ds.errors import UserError
from skeleton_ds.model_identity import check_identity
from skeleton_ds.prompt import PromptedClassifier, initial_prompt_ids, task_record
from skeleton_ds.provenance import provenance
from skeleton_ds.stages.common import TaskModelRun, previous_step, read_prompt_record

KILL_AFTER_STEP_ENV = "SKELETON_DS_KILL_AFTER_STEP"
"""Test hook, "STAGE:STEP" (e.g. "retune:2"): SIGKILL this process right after that optimizer step of
that stage, to exercise a real crash and resume."""


class PromptTuningRecipe(TaskModelRun):
    """Stage 1 (and, through RetuneRecipe, stage 5)."""

    stage = "prompt"

    def __init__(self, cfg: Config, planned: dict | None = None):
        super().__init__(cfg, planned)
        self.out_dir = cfg.output / self.stage
        self.ckpt_dir = cfg.output / "checkpoints" / self.stage

    def model_spec(self) -> dict:
        """Which model to load and how its prompt is shaped (stage 1: from the flags)."""
        cfg = self.cfg
        return {"model_name": cfg.model, "readout": cfg.readout, "prompt_length": cfg.prompt_length,
                "max_length": cfg.max_length}

    def initial_values(self, model: PromptedClassifier) -> dict[str, torch.Tensor]:
        """Stage 1 starts from vocabulary (or text) embeddings and a seeded head."""
        cfg = self.cfg
        embeddings = distributed.stored(self.backbone.model.get_input_embeddings(), "weight")
        ids = initial_prompt_ids(distributed.full_shape(embeddings)[0], cfg.prompt_length, cfg.prompt_init,
                                 self.backbone.tokenizer, cfg.seed)
        ids = torch.tensor(ids, device=distributed.device())
        if distributed.is_partitioned(embeddings) and not distributed.readable_shard(embeddings):
            with distributed.gathered([embeddings]):  # swapped out to NVMe: only DeepSpeed's gather reads it
                init = {"prompt": embeddings[ids].detach().float().cpu().clone()}
        else:
            init = {"prompt": distributed.rows(embeddings, ids).detach().float().cpu().clone()}
        if model.head is not None:
            torch.manual_seed(cfg.seed)  # identical head init on every rank
            model.head.reset_parameters()
            init |= {"head.weight": model.head.weight.data, "head.bias": model.head.bias.data}
        return init

    def budget(self) -> tuple[float, float]:
        """(epochs, learning rate) of this stage, as its settings record has them (re-tuning's own, if set)."""
        values = self.settings_record()["values"]
        return values["epochs"], values["lr"]

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        # Everything a user can get wrong is checked before the process group or any file exists.
        epochs, lr = self.budget()
        ds_config = resolve_ds_config(cfg.ds_config, world_size=distributed.world_size_from_env(),
                                      batch_size=cfg.batch_size, lr=lr, precision=cfg.precision,
                                      weight_decay=cfg.weight_decay)
        spec = self.model_spec()
        train, dev = self.load_examples()
        self._check_output_dir()
        model = self.build_model(ds_config, train, dev, **spec)
        self.prompt_length, self.max_length = spec["prompt_length"], spec["max_length"]
        self.set_trainable(self.initial_values(model))

        self.global_batch = self.ds_config["train_batch_size"]
        self.accumulation = self.ds_config["gradient_accumulation_steps"]
        self.steps_per_epoch = len(self.train_set) // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"the training split has {len(self.train_set)} examples, fewer than one global batch of "
                            f"{self.global_batch}: lower --batch-size or use more examples")
        self.total_steps = cfg.max_steps or math.ceil(epochs * self.steps_per_epoch)
        groups = [{"params": [model.prompt.embedding], "lr": lr}]
        if model.head is not None:
            groups.append({"params": list(model.head.parameters()), "lr": cfg.head_lr})

        import deepspeed

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.ds_config, lr_scheduler=self._schedule)
        self.step = 0
        if self._latest_checkpoint() is not None and cfg.resume:
            self._load_checkpoint()
        elif cfg.resume:
            self.report.note("--resume: no checkpoint yet, starting from the beginning")

    def _schedule(self, optimizer):
        warmup, total = self.cfg.warmup_steps, self.total_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _check_output_dir(self) -> None:
        cfg = self.cfg
        if self._latest_checkpoint() is not None and not (cfg.resume or cfg.overwrite):
            raise UserError(f"{self.ckpt_dir} holds checkpoints of an unfinished run: pass --resume to continue it "
                            f"or --overwrite to start over")

    # ------------------------------------------------------------ checkpoints
    def _signature(self) -> str:
        """What must match for a checkpoint to be resumable into this run: the stage's settings record."""
        return self.settings_record()["id"]

    def _latest_checkpoint(self) -> str | None:
        latest = self.ckpt_dir / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def _load_checkpoint(self) -> None:
        tag = self._latest_checkpoint()
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag, load_module_strict=False)
        if client is None:
            raise UserError(f"checkpoint {self.ckpt_dir / tag} could not be loaded: remove it or pass --overwrite")
        if client.get("signature") != self._signature():
            raise UserError(f"checkpoint {self.ckpt_dir / tag} comes from a run with other settings: use the same "
                            f"flags to resume, or pass --overwrite to start over")
        self.step = int(client["step"])
        self.report.note(f"resumed from {self.ckpt_dir / tag} at step {self.step}/{self.total_steps}")

    def save_checkpoint(self) -> None:
        """A resumable DeepSpeed checkpoint of the trainable state only (the frozen backbone is on disk already)."""
        tag = f"step{self.step:08d}"
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, exclude_frozen_parameters=True,
                                    client_state={"step": self.step, "signature": self._signature()})
        # DeepSpeed writes without fsync; a job killed right after (preemption) must not resume from a
        # `latest` whose files never reached the disk. Each rank flushes what it wrote (shared file systems).
        torch.distributed.barrier()
        checkpoint.fsync_tree(self.ckpt_dir / tag)
        if (self.ckpt_dir / "latest").is_file():
            checkpoint.fsync_path(self.ckpt_dir / "latest")
        checkpoint.fsync_path(self.ckpt_dir)
        if self.dist.is_main:
            tags = sorted(p for p in self.ckpt_dir.glob("step*") if p.is_dir())
            for old in tags[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    # ------------------------------------------------------------------ train
    def train_loss(self, micro: list[int]) -> torch.Tensor:
        """The loss of one micro batch (indices into the training set): cross-entropy on the labels."""
        logits, labels = self._forward([self.train_set[i] for i in micro])
        return F.cross_entropy(logits, labels)

    def train(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.engine.train()
        self.model.backbone.eval()  # frozen: keep dropout off (see loading.load_backbone)
        kill_stage, _, kill_step = os.environ.get(KILL_AFTER_STEP_ENV, "").partition(":")
        kill_after = int(kill_step) if kill_stage == self.stage else -1
        start, t0 = self.step, time.perf_counter()
        self.last_loss = float("nan")
        with self.report.progress(self.total_steps, self.step, "prompt tuning",
                                  "loss {loss:.4f}  lr {lr:.2e}  {rate:.1f} ex/s") as bar:
            while self.step < self.total_steps:
                epoch, offset = divmod(self.step, self.steps_per_epoch)
                global_batch = data.epoch_batches(len(self.train_set), self.global_batch, cfg.seed, epoch)[offset]
                loss_sum = torch.zeros((), device=distributed.device())
                for micro in data.rank_micro_batches(global_batch, dist.rank, dist.world_size, self.accumulation):
                    loss = self.train_loss(micro)
                    self.engine.backward(loss)
                    self.engine.step()
                    loss_sum += loss.detach().float()
                preemption.step_delay()
                # One all-reduce per step carries the loss and the stop flag: a SIGUSR1/SIGTERM on any
                # rank stops every rank after this same step.
                reduced = torch.stack([loss_sum, preemption.flag_tensor(loss_sum.device)])
                torch.distributed.all_reduce(reduced)
                self.last_loss = reduced[0].item() / (self.accumulation * dist.world_size)
                stop = reduced[1].item() > 0
                self.step += 1
                if self.step % cfg.save_every == 0 or self.step == self.total_steps or stop:
                    self.save_checkpoint()
                rate = (self.step - start) * self.global_batch / (time.perf_counter() - t0)
                bar.update(self.step, loss=self.last_loss, lr=self.scheduler.get_last_lr()[0], rate=rate)
                if self.step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop and self.step < self.total_steps:
                    raise preemption.Preempted(
                        f"{self.stage} stopped on {preemption.signal_name()} after step "
                        f"{self.step}/{self.total_steps}; "
                        f"checkpoint {self.ckpt_dir / self._latest_checkpoint()}: run the same command with --resume")
        self.train_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------- save
    def save(self, metrics: dict[str, float], extra: dict | None = None) -> None:
        model = self.model
        trainable = {"prompt": model.prompt.embedding}
        if model.head is not None:
            trainable |= {"head.weight": model.head.weight, "head.bias": model.head.bias}
        with distributed.gathered(trainable.values()):
            tensors = {k: v.detach().float().cpu().clone() for k, v in trainable.items()}
        if self.dist.is_main:
            cfg = self.cfg
            record = task_record(self.task, readout=self.readout, label_token_ids=self.label_token_ids,
                                 model=cfg.model, model_path=self.backbone.path, revision=cfg.revision,
                                 prompt_length=self.prompt_length, base_model=self.backbone.identity,
                                 max_length=self.max_length, padding_side=self.backbone.adapter.padding_side)
            labels = [e.label for e in self.dev_set]
            summary = {"task": self.task.name, "split": "dev", "metrics": metrics, "dev_examples": len(self.dev_set),
                       "dev_selection": self.dev_selection,
                       "dev_majority": max(labels.count(c) for c in set(labels)) / len(labels),  # did it learn?
                       "train_examples": len(self.train_set), "steps": self.total_steps,
                       "global_batch": self.global_batch, "world_size": self.dist.world_size,
                       "zero_stage": zero_stage(self.ds_config), "final_train_loss": self.last_loss,
                       "backbone_fraction_on_rank0": self.backbone_local_fraction,
                       "train_seconds": self.train_seconds, **(extra or {}),
                       "config": checkpoint.json_record(cfg), "settings": self.settings_record(),
                       "provenance": provenance()}
            with checkpoint.atomic_dir(self.out_dir, overwrite=True) as staging:
                checkpoint.save_tensors(staging / "prompt.safetensors", tensors,
                                        {"task": self.task.name, "model": self.backbone.path, "readout": self.readout})
                checkpoint.write_json(staging / "task.json", record)
                checkpoint.write_json(staging / "metrics.json", summary)
        torch.distributed.barrier()

    def cleanup(self) -> None:
        """Drop the engine and model so the next stage in this process starts from free memory."""
        del self.engine, self.model, self.backbone

    def run(self) -> dict[str, float]:
        self.setup()
        if self.cfg.overwrite and self.step == 0 and self.dist.is_main:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        torch.distributed.barrier()
        self.train()
        metrics = self.evaluate()
        self.save(metrics)
        self.report.metrics_table(f"{self.task.name} dev", metrics, caption=f"{self.dev_selection} examples")
        self.cleanup()
        return metrics


class RetuneRecipe(PromptTuningRecipe):
    """Stage 5: prompt tuning continues on the compact model (DIR/compact), from the stage-1 prompt.

    Writes DIR/retune/{prompt.safetensors, task.json, metrics.json} (metrics before and after) and
    then replaces the prompt in DIR/compact, file by file with renames, refreshing its manifest.
    """

    stage = "retune"

    def __init__(self, cfg: Config, planned: dict | None = None):
        super().__init__(cfg, planned)
        self.compact_dir = cfg.output / "compact"
        self.prompt_dir = cfg.output / "prompt"

    def model_spec(self) -> dict:
        if not (self.compact_dir / "manifest.json").is_file():
            raise UserError(f"{self.compact_dir} holds no finished compact model: run --stages convert first")
        checkpoint.verify_manifest(self.compact_dir)
        record = read_prompt_record(self.prompt_dir, self.cfg)
        compact = checkpoint.read_json(self.compact_dir / "config.json", "compact model config")
        origin = compact.get("skeleton_ds", {}).get("base_model", {})
        check_identity(origin, record["base_model"], str(self.compact_dir))
        return {"model_name": str(self.compact_dir), "readout": "head" if record["readout"] == "head" else "verbalizer",
                "prompt_length": record["prompt_length"], "max_length": record["max_length"]}

    def initial_values(self, model: PromptedClassifier) -> dict[str, torch.Tensor]:
        """The stage-1 prompt; in a keep schedule's later step, the prompt the step before re-tuned."""
        start = self.prompt_dir if self.cfg.previous_step is None else previous_step(self.cfg)[1]
        return checkpoint.load_tensors(start / "prompt.safetensors")

    def setup(self) -> None:
        super().setup()
        cfg = self.cfg
        values = self.settings_record()["values"]  # the --distill-* weights as this architecture resolves them
        self.distill = {"kl": values["distill_kl"], "temperature": values["distill_temperature"],
                        "hidden": values["distill_hidden"]}
        needed = outputs_needed(self.distill["kl"], self.distill["hidden"], cfg.distill_layers)
        self.teacher: dict[str, torch.Tensor] = {}
        if needed:
            made_from = (lineage.read_record(cfg.output, "teacher") or {}).get("id")
            if made_from is None or made_from != self.settings_record()["upstream"].get("teacher"):
                raise UserError(f"{cfg.output / 'teacher.safetensors'} was not made with these settings (or is "
                                f"missing): run --stages teacher,retune with these flags")
            self.teacher = read_teacher(cfg.output / "teacher.safetensors", needed, len(self.train_set))
            self.distill_layers = hidden_layers(needed) if self.distill["hidden"] else None

    def train_loss(self, micro: list[int]) -> torch.Tensor:
        """Cross-entropy, plus the distillation terms against the teacher's rows of these examples."""
        if not self.teacher:
            return super().train_loss(micro)
        batch = self.collate([self.train_set[i] for i in micro])
        rows = torch.tensor(micro)
        teacher = {name: values[rows].to(distributed.device()) for name, values in self.teacher.items()}
        if self.distill_layers is None:
            logits, states = self.engine(batch["input_ids"], batch["attention_mask"], batch["answer_index"]), {}
        else:
            logits, states = self.engine(batch["input_ids"], batch["attention_mask"], batch["answer_index"],
                                         hidden_layers=self.distill_layers)
        return F.cross_entropy(logits, batch["labels"]) + distill_loss(logits, states, teacher, **self.distill)

    def _record_in_compact(self, before: dict, after: dict) -> None:
        """The compact checkpoint's own metrics.json and model card now say what re-tuning measured."""
        path = self.compact_dir / model_card.METRICS
        found = checkpoint.read_json(path, "compact metrics") if path.is_file() else {}
        summary = checkpoint.read_json(self.out_dir / "metrics.json", "retune metrics")
        checkpoint.write_json(path, model_card.compact_metrics(
            full=found.get("full_model"), before=before, after=after, task=model_card.task_data(summary),
            made_by=model_card.made_by()))
        model_card.write_compact_card(self.compact_dir)

    def run(self) -> dict[str, float]:
        self.setup()
        if self.cfg.overwrite and self.step == 0 and self.dist.is_main:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        before = self.evaluate()  # the skeleton with the stage-1 prompt, before any re-tuning
        self.train()
        metrics = self.evaluate()
        self.save(metrics, {"before_retune": before})
        if self.dist.is_main:
            for name in ("prompt.safetensors", "task.json"):
                with checkpoint.atomic_file(self.compact_dir / name) as tmp:
                    shutil.copyfile(self.out_dir / name, tmp)
            self._record_in_compact(before, metrics)
            checkpoint.write_manifest(self.compact_dir)
        torch.distributed.barrier()
        self.report.metrics_table(f"{self.task.name} dev, skeleton", {f"{k} before": v for k, v in before.items()}
                                  | {f"{k} after": v for k, v in metrics.items()},
                                  caption=f"{self.dev_selection} examples")
        self.cleanup()
        return metrics
