"""Pipeline stage 2: score every FFN neuron and attention KV group of the prompted model.

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR --stages attribute

The default scorer is activation x gradient of the gold label's log-probability (the readout
stage 1 trained): the first-order estimate of how much that log-probability drops if the unit's
activation is set to zero. Per example the contributions h_t * g_t of the real token positions are
summed and the absolute value taken (`abs-sum`); `mean-abs` averages |h_t * g_t| over positions
instead, `signed` keeps the sign. Scores are averaged over examples.

Each rank scores its own shard of the examples, then sums and counts are all-reduced, so every rank
ends with identical scores. One forward and one backward per batch; the backward asks autograd for
activation gradients only (the backbone is frozen), so no weight gradient is ever formed.
Baselines for comparison: `random` (seeded), `weight-magnitude` (L2 norm of a unit's input weights),
`activation-magnitude` (mean |h| over the same positions).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from skeleton_ds import checkpoint, data, engine
from skeleton_ds.adapters import ArchAdapter, Geometry
from skeleton_ds.config import Config
from skeleton_ds.errors import UserError
from skeleton_ds.recipe import TaskModelRun, read_prompt_record, subset

SCORERS = ("attribution", "random", "weight-magnitude", "activation-magnitude")
REDUCTIONS = ("abs-sum", "mean-abs", "signed")


class UnitRecorder:
    """Forward hooks that keep, per layer, the FFN activation and the attention heads' outputs
    (the input of the output projection) of the current batch, still attached to the graph."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter):
        self.model, self.adapter = model, adapter
        self.ffn: list[torch.Tensor] = []
        self.heads: list[torch.Tensor] = []

    @contextmanager
    def recording(self) -> Iterator["UnitRecorder"]:
        handles = []
        for layer in self.adapter.layer_modules(self.model):
            site = layer.get_submodule(self.adapter.ffn_site)
            if self.adapter.ffn_site_reads_input:
                handles.append(site.register_forward_pre_hook(lambda m, args: self.ffn.append(args[0])))
            else:
                handles.append(site.register_forward_hook(lambda m, args, out: self.ffn.append(out)))
            attn_out = layer.get_submodule(self.adapter.attn_out)
            handles.append(attn_out.register_forward_pre_hook(lambda m, args: self.heads.append(args[0])))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def clear(self) -> None:
        self.ffn.clear()
        self.heads.clear()


def group_heads(values: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., heads * head_dim] -> [..., groups]: sum over each KV group's contiguous query-head slices."""
    return values.unflatten(-1, (groups, -1)).sum(-1)


def per_example(contrib: torch.Tensor, positions: torch.Tensor, reduce: str) -> torch.Tensor:
    """Token contributions [B, T, U] over the counted positions [B, T] -> per-example scores [B, U]."""
    mask = positions.unsqueeze(-1).to(contrib.dtype)
    if reduce == "abs-sum":
        return (contrib * mask).sum(1).abs()
    if reduce == "signed":
        return (contrib * mask).sum(1)
    if reduce == "mean-abs":
        return (contrib.abs() * mask).sum(1) / mask.sum(1).clamp(min=1)
    raise ValueError(reduce)


def weight_magnitude(model: nn.Module, adapter: ArchAdapter, geometry: Geometry) -> dict[str, torch.Tensor]:
    """L2 norm of each unit's input weights (FFN: rows of the up/gate projections; KV group: its
    query rows plus its key and value rows)."""
    scores = {}
    for i, layer in enumerate(adapter.layer_modules(model)):
        ffn_in = [layer.get_submodule(p).weight for p in adapter.ffn_in]
        q = layer.get_submodule(adapter.q_proj).weight
        kv = [layer.get_submodule(p).weight for p in adapter.kv_proj]
        with engine.gathered(ffn_in + [q] + kv):
            scores[f"ffn.{i}"] = torch.stack([w.float().pow(2).sum(1) for w in ffn_in]).sum(0).sqrt()
            groups = geometry.kv_heads
            sq = q.float().pow(2).sum(1).view(groups, -1).sum(1)
            sq = sq + sum(w.float().pow(2).sum(1).view(groups, -1).sum(1) for w in kv)
            scores[f"heads.{i}"] = sq.sqrt()
    return scores


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
        # The prompt keeps requires_grad so the graph reaches every activation; autograd.grad below
        # asks only for activation gradients, so the prompt's gradient is never formed either.
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
            g = torch.Generator().manual_seed(cfg.seed)
            return ({f"ffn.{i}": torch.rand(geometry.ffn_size, generator=g) for i in range(geometry.layers)}
                    | {f"heads.{i}": torch.rand(geometry.kv_heads, generator=g) for i in range(geometry.layers)}), 0
        sums = {f"ffn.{i}": torch.zeros(geometry.ffn_size, dtype=torch.float64) for i in range(geometry.layers)}
        sums |= {f"heads.{i}": torch.zeros(geometry.kv_heads, dtype=torch.float64) for i in range(geometry.layers)}
        indices, real = data.eval_shard(len(self.train_set), self.dist.rank, self.dist.world_size)
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        recorder = UnitRecorder(self.model.backbone, self.backbone.adapter)
        self.engine.eval()
        start_time = time.perf_counter()
        with recorder.recording(), self.report.progress(math.ceil(len(indices) / micro), 0, scorer) as bar:
            for b, start in enumerate(range(0, len(indices), micro)):
                weights = torch.tensor([1.0 if start + k < real else 0.0 for k in range(len(indices[start:start + micro]))])
                batch = self.collate([self.train_set[j] for j in indices[start:start + micro]])
                recorder.clear()
                self._accumulate(batch, weights.to(engine.device()), recorder, sums, scorer)
                bar.update(b + 1, rate=(start + len(weights)) / (time.perf_counter() - start_time))
        examples = torch.tensor(float(real), dtype=torch.float64)
        for value in list(sums.values()) + [examples]:
            torch.distributed.all_reduce(value)
        return {k: (v / examples).float() for k, v in sums.items()}, int(examples.item())

    def _accumulate(self, batch: dict, weights: torch.Tensor, recorder: UnitRecorder, sums: dict, scorer: str) -> None:
        cfg, groups = self.cfg, self.geometry.kv_heads
        positions = torch.cat([batch["attention_mask"].new_full((len(weights), self.prompt_length),
                                                                int(cfg.attr_include_prompt)),
                               batch["attention_mask"]], dim=1).bool()
        with torch.set_grad_enabled(scorer == "attribution"):
            # The module itself, not the engine: the engine's forward arms a hook that wants
            # engine.backward(loss), and here autograd.grad asks for activation gradients only.
            # ZeRO-3's parameter gathering hooks sit on the modules, so they still run.
            logits = self.engine.module(batch["input_ids"], batch["attention_mask"], batch["answer_index"])
            if scorer == "attribution":
                gold = F.log_softmax(logits.float(), -1).gather(1, batch["labels"][:, None]).squeeze(1)
                grads = torch.autograd.grad((gold * weights).sum(), recorder.ffn + recorder.heads)
        layers = self.geometry.layers
        for i in range(layers):
            ffn, heads = recorder.ffn[i].float(), recorder.heads[i].float()
            if scorer == "attribution":
                ffn_c, head_c = ffn * grads[i].float(), group_heads(heads * grads[layers + i].float(), groups)
                ffn_s, head_s = per_example(ffn_c, positions, cfg.attr_reduce), per_example(head_c, positions, cfg.attr_reduce)
            else:  # activation magnitude: mean |h| over counted positions (and over a group's dimensions)
                per_dim = self.geometry.heads_per_group * self.geometry.head_dim
                ffn_s = per_example(ffn.abs(), positions, "mean-abs")
                head_s = per_example(group_heads(heads.abs(), groups) / per_dim, positions, "mean-abs")
            sums[f"ffn.{i}"] += (weights[:, None] * ffn_s.detach()).sum(0).double().cpu()
            sums[f"heads.{i}"] += (weights[:, None] * head_s.detach()).sum(0).double().cpu()

    def save(self, scores: dict[str, torch.Tensor], examples: int) -> None:
        if self.dist.is_main:
            meta = {"task": self.task.name, "scorer": self.cfg.scorer, "reduce": self.cfg.attr_reduce,
                    "include_prompt": str(self.cfg.attr_include_prompt), "examples": str(examples),
                    "base_model": json.dumps(self.backbone.identity), "geometry": json.dumps(asdict(self.geometry))}
            checkpoint.save_tensors_atomic(self.out_file, scores, meta)
        torch.distributed.barrier()

    def run(self) -> dict[str, torch.Tensor]:
        self.setup()
        scores, examples = self.score()
        self.save(scores, examples)
        self.report.note(f"attribution ({self.cfg.scorer}, {examples} examples) -> {self.out_file}")
        del self.engine, self.model, self.backbone  # free memory before the next stage in this process
        return scores


def read_attribution(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Scores and their metadata (JSON fields decoded)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UserError(f"{path} does not exist: run --stages attribute first (same --output)")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("base_model", "geometry"):
        meta[key] = json.loads(meta[key])
    return tensors, meta
