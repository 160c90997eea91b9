"""Pipeline stage 2: score every FFN neuron and attention KV group of the prompted model.

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR --stages attribute

Loads the stage-1 prompt (DIR/prompt) onto the frozen model, scores the training examples with
skeleton_ds.attribution (activation x gradient by default; see there for the method and the
baselines) and writes DIR/attribution.safetensors. Each rank scores its own shard of the examples
(padded to equal batch counts, padding weighted zero), then sums and counts are all-reduced, so every
rank ends with identical scores.

Resumable like training: every --save-every batches, and when a SIGUSR1/SIGTERM asks the job to
stop, the ranks' partial sums are added up and rank 0 writes them to DIR/checkpoints/attribute/
(with the batch count and the run's settings); `--resume` starts from there and ends with the
scores an uninterrupted run gives.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import torch

from skeleton_ds import checkpoint, data, distributed, preemption
from skeleton_ds.architectures import Geometry
from skeleton_ds.attribution import (UnitRecorder, all_reduce_sums, finish_scores, merge_sums, random_scores,
                                     score_batch, to_base_indices, weight_magnitude, write_scores, zero_sums)
from skeleton_ds.config import Config
from skeleton_ds.errors import UserError
from skeleton_ds.localization import load_skeleton
from skeleton_ds.stages.common import TaskModelRun, previous_step, read_prompt_record
from skeleton_ds.tasks import subset

PARTIAL_FORMAT = "skeleton_ds.attribution-partial/1"


class AttributionRecipe(TaskModelRun):
    stage = "attribute"

    def __init__(self, cfg: Config, planned: dict | None = None):
        super().__init__(cfg, planned)
        self.prompt_dir = cfg.output / "prompt"
        self.out_file = cfg.output / "attribution.safetensors"
        self.partial_file = cfg.output / "checkpoints" / "attribute" / "partial.safetensors"

    def setup(self) -> None:
        cfg = self.cfg
        record = read_prompt_record(self.prompt_dir, cfg)
        if self.partial_file.is_file() and not (cfg.resume or cfg.overwrite):
            raise UserError(f"{self.partial_file} holds the partial scores of an unfinished attribution: pass --resume "
                            f"to continue it or --overwrite to start over")
        if cfg.previous_step is None:
            self.build_prompted_base(record, self.prompt_dir)
            self.within, self.base_identity = None, self.backbone.identity
        else:  # a keep schedule's later step: the compact model the step before made, with its re-tuned prompt
            compact, prompt = previous_step(cfg)
            skeleton, meta = load_skeleton(compact / "skeleton.json")
            self.within, self.base_geometry = ({"ffn": skeleton.ffn, "heads": skeleton.heads},
                                               Geometry(**meta["geometry"]))
            self.base_identity = record["base_model"]
            self.build_prompted_base(read_prompt_record(prompt, cfg), prompt, model_name=str(compact),
                                     layer_widths=False)  # padded: every layer as wide as the widest
        # The prompt keeps requires_grad so the graph reaches every activation; autograd.grad in
        # score_batch asks only for activation gradients, so the prompt's gradient is never formed either.
        self.geometry = self.backbone.adapter.geometry(self.backbone.model.config)
        self.train_set = subset(self.train_set, cfg.attr_examples, cfg.seed)

        import deepspeed

        self.engine, *_ = deepspeed.initialize(model=self.model, config=self.ds_config)

    def score(self, scorer: str | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """(scores per unit, examples used), identical on every rank. `scorer` defaults to --scorer."""
        cfg, geometry = self.cfg, self.geometry
        scorer = scorer or cfg.scorer
        if scorer in ("weight-magnitude", "random"):
            # No data needed for the scores, but the forward pass gives bias compensation its means.
            measured, examples = self.score("activation-magnitude")
            baseline = weight_magnitude(self.model.backbone, self.backbone.adapter, geometry) \
                if scorer == "weight-magnitude" else random_scores(geometry, cfg.seed)
            return measured | baseline, examples
        sums = zero_sums(geometry)
        indices, real = data.eval_shard(len(self.train_set), self.dist.rank, self.dist.world_size)
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        starts = list(range(0, len(indices), micro))
        signature = self._signature(scorer, len(starts))
        done = self._resume(sums, signature) if cfg.resume else 0
        recorder = UnitRecorder(self.model.backbone, self.backbone.adapter)
        self.engine.eval()
        start_time = time.perf_counter()
        with recorder.recording(), self.report.progress(len(starts), done, scorer) as bar:
            for b in range(done, len(starts)):
                start = starts[b]
                weights = torch.tensor([1.0 if start + k < real else 0.0
                                        for k in range(len(indices[start:start + micro]))])
                batch = self.collate([self.train_set[j] for j in indices[start:start + micro]])
                score_batch(self.engine.module, batch, weights.to(distributed.device()), recorder,
                            prompt_length=self.prompt_length, geometry=geometry, scorer=scorer,
                            reduce=cfg.attr_reduce, include_prompt=cfg.attr_include_prompt, sums=sums,
                            positions=cfg.attr_positions, steps=cfg.ig_steps)
                bar.update(b + 1, rate=(start + len(weights) - done * micro) / (time.perf_counter() - start_time))
                preemption.step_delay()
                stop = preemption.agreed_stop()
                if b + 1 < len(starts) and (stop or (b + 1) % cfg.save_every == 0):
                    self._save_partial(sums, b + 1, signature)
                if stop and b + 1 < len(starts):
                    raise preemption.Preempted(
                        f"attribute stopped on {preemption.signal_name()} after batch {b + 1}/{len(starts)}; partial "
                        f"scores in {self.partial_file}: run the same command with --resume")
        examples = torch.tensor(float(real), dtype=torch.float64)
        all_reduce_sums(sums)
        torch.distributed.all_reduce(examples)
        return finish_scores(sums, examples), int(examples.item())

    # ------------------------------------------------------- partial sums
    def _signature(self, scorer: str, batches: int) -> str:
        """What must match for partial sums to be resumable: the stage's settings record, the scorer
        actually run, the prompt scored, and the sharding (world size, micro batch)."""
        blob = json.dumps({"settings": self.settings_record()["id"], "scorer": scorer, "batches": batches,
                           "world_size": self.dist.world_size,
                           "micro": self.ds_config["train_micro_batch_size_per_gpu"],
                           "prompt": checkpoint.sha256(self.prompt_dir / "prompt.safetensors")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _save_partial(self, sums: dict[str, torch.Tensor], batches: int, signature: str) -> None:
        """All ranks' sums so far, added up, written by rank 0 (a collective)."""
        total = {k: v.clone() for k, v in sums.items()}
        all_reduce_sums(total)
        if self.dist.is_main:
            self.partial_file.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.save_tensors_atomic(self.partial_file, total, {
                "format": PARTIAL_FORMAT, "batches": str(batches), "signature": signature})
        torch.distributed.barrier()

    def _resume(self, sums: dict[str, torch.Tensor], signature: str) -> int:
        """Batches already scored; rank 0 starts from the saved totals, the other ranks from zero."""
        if not self.partial_file.is_file():
            self.report.note("--resume: no partial attribution yet, starting from the beginning")
            return 0
        from safetensors import safe_open

        with checkpoint.unreadable_as_user_error(self.partial_file), safe_open(str(self.partial_file), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != PARTIAL_FORMAT or meta.get("signature") != signature:
                raise UserError(f"{self.partial_file} comes from an attribution with other settings (or another world "
                                f"size): use the same flags and ranks to resume, or pass --overwrite to start over")
            if self.dist.is_main:
                merge_sums(sums, {key: f.get_tensor(key) for key in sums if key in f.keys()})
        batches = int(meta["batches"])
        self.report.note(f"resumed attribution from {self.partial_file} at batch {batches}")
        return batches

    def save(self, scores: dict[str, torch.Tensor], examples: int) -> None:
        """The scores in the base model's numbering (a keep schedule's compact-model scores mapped back)."""
        geometry = self.geometry
        if self.within is not None:
            scores = to_base_indices(scores, self.within["ffn"], self.within["heads"], self.base_geometry)
            geometry = self.base_geometry
        if self.dist.is_main:
            cfg = self.cfg
            write_scores(self.out_file, scores, task=self.task.name, scorer=cfg.scorer, reduce=cfg.attr_reduce,
                         include_prompt=cfg.attr_include_prompt, examples=examples, base_model=self.base_identity,
                         geometry=geometry, settings=self.settings_record(), positions=cfg.attr_positions,
                         steps=cfg.ig_steps if cfg.scorer == "integrated-gradients" else 1, within=self.within)
        torch.distributed.barrier()

    def run(self) -> dict[str, torch.Tensor]:
        self.setup()
        if self.cfg.overwrite and not self.cfg.resume and self.dist.is_main:
            shutil.rmtree(self.partial_file.parent, ignore_errors=True)
        torch.distributed.barrier()
        scores, examples = self.score()
        self.save(scores, examples)
        if self.dist.is_main:
            shutil.rmtree(self.partial_file.parent, ignore_errors=True)
        self.report.note(f"attribution ({self.cfg.scorer}, {examples} examples) -> {self.out_file}")
        del self.engine, self.model, self.backbone  # free memory before the next stage in this process
        return scores
