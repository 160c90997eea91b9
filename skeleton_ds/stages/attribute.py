"""Pipeline stage 2: score every FFN neuron and attention KV group of the prompted model.

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR --stages attribute

Loads the stage-1 prompt (DIR/prompt) onto the frozen model, scores the training examples with
skeleton_ds.attribution (activation x gradient by default; see there for the method and the
baselines) and writes DIR/attribution.safetensors. Each rank scores its own shard of the examples
(padded to equal batch counts, padding weighted zero), then sums and counts are all-reduced, so every
rank ends with identical scores.
"""

from __future__ import annotations

import math
import time

import torch

from skeleton_ds import checkpoint, data, engine
from skeleton_ds.attribution import UnitRecorder, random_scores, score_batch, weight_magnitude, write_scores, zero_sums
from skeleton_ds.config import Config
from skeleton_ds.stages.common import TaskModelRun, read_prompt_record, subset


class AttributionRecipe(TaskModelRun):
    stage = "attribute"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.prompt_dir = cfg.output / "prompt"
        self.out_file = cfg.output / "attribution.safetensors"

    def done(self) -> bool:
        return self.out_file.is_file()

    def setup(self) -> None:
        cfg = self.cfg
        record = read_prompt_record(self.prompt_dir, cfg)
        ds_config = engine.resolve_ds_config(cfg.ds_config, world_size=engine.world_size_from_env(),
                                             batch_size=cfg.batch_size, lr=cfg.lr, precision=cfg.precision)
        # Nothing is trained here: no optimizer, and below ZeRO-3 nothing to partition either
        # (DeepSpeed refuses ZeRO-1/2 without an optimizer).
        ds_config.pop("optimizer", None)
        if engine.zero_stage(ds_config) < 3:
            ds_config["zero_optimization"] = {"stage": 0}
        train, dev = self.load_examples()
        self.prompt_length = record["prompt_length"]
        readout = "head" if record["readout"] == "head" else "verbalizer"
        model = self.build_model(ds_config, train, dev, readout=readout, prompt_length=self.prompt_length,
                                 max_length=record["max_length"])
        engine.check_identity(record["base_model"], self.backbone.identity, f"the prompt in {self.prompt_dir}")
        self.set_trainable(checkpoint.load_tensors(self.prompt_dir / "prompt.safetensors"))
        # The prompt keeps requires_grad so the graph reaches every activation; autograd.grad in
        # score_batch asks only for activation gradients, so the prompt's gradient is never formed either.
        self.geometry = self.backbone.adapter.geometry(self.backbone.model.config)
        self.train_set = subset(self.train_set, cfg.attr_examples, cfg.seed)

        import deepspeed

        self.engine, *_ = deepspeed.initialize(model=model, config=self.ds_config)

    def score(self, scorer: str | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """(scores per unit, examples used), identical on every rank. `scorer` defaults to --scorer."""
        cfg, geometry = self.cfg, self.geometry
        scorer = scorer or cfg.scorer
        if scorer == "weight-magnitude":
            return weight_magnitude(self.model.backbone, self.backbone.adapter, geometry), 0
        if scorer == "random":
            return random_scores(geometry, cfg.seed), 0
        sums = zero_sums(geometry)
        indices, real = data.eval_shard(len(self.train_set), self.dist.rank, self.dist.world_size)
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        recorder = UnitRecorder(self.model.backbone, self.backbone.adapter)
        self.engine.eval()
        start_time = time.perf_counter()
        with recorder.recording(), self.report.progress(math.ceil(len(indices) / micro), 0, scorer) as bar:
            for b, start in enumerate(range(0, len(indices), micro)):
                weights = torch.tensor([1.0 if start + k < real else 0.0 for k in range(len(indices[start:start + micro]))])
                batch = self.collate([self.train_set[j] for j in indices[start:start + micro]])
                score_batch(self.engine.module, batch, weights.to(engine.device()), recorder,
                            prompt_length=self.prompt_length, geometry=geometry, scorer=scorer,
                            reduce=cfg.attr_reduce, include_prompt=cfg.attr_include_prompt, sums=sums)
                bar.update(b + 1, rate=(start + len(weights)) / (time.perf_counter() - start_time))
        examples = torch.tensor(float(real), dtype=torch.float64)
        for value in list(sums.values()) + [examples]:
            torch.distributed.all_reduce(value)
        return {k: (v / examples).float() for k, v in sums.items()}, int(examples.item())

    def save(self, scores: dict[str, torch.Tensor], examples: int) -> None:
        if self.dist.is_main:
            cfg = self.cfg
            write_scores(self.out_file, scores, task=self.task.name, scorer=cfg.scorer, reduce=cfg.attr_reduce,
                         include_prompt=cfg.attr_include_prompt, examples=examples, base_model=self.backbone.identity,
                         geometry=self.geometry)
        torch.distributed.barrier()

    def run(self) -> dict[str, torch.Tensor]:
        self.setup()
        scores, examples = self.score()
        self.save(scores, examples)
        self.report.note(f"attribution ({self.cfg.scorer}, {examples} examples) -> {self.out_file}")
        del self.engine, self.model, self.backbone  # free memory before the next stage in this process
        return scores
