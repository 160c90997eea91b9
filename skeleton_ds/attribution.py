"""Attribution (stage 2's algorithm): score every FFN neuron and attention KV group of the prompted model.

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR --stages attribute
    (the stage itself, which shards the examples and drives these functions: skeleton_ds/stages/attribute.py)

The default scorer is activation x gradient of the gold label's log-probability (the readout
stage 1 trained): the first-order estimate of how much that log-probability drops if the unit's
activation is set to zero. Per example the contributions h_t * g_t of the real token positions are
summed and the absolute value taken (`abs-sum`); `mean-abs` averages |h_t * g_t| over positions
instead, `signed` keeps the sign, and `max` takes the largest signed contribution of any position (the
reduction in the Skeleton authors' own attribution code). Scores are averaged over examples. The
positions counted are the text tokens (the prompt's too with include_prompt) or, with `answer`, only the
one the label is read at. `integrated-gradients` replaces the FFN's first-order estimate by the average of
activation x gradient along a path that scales every FFN activation from zero to its value (a few steps:
each one more forward and backward); with one step it is the first-order score.

Each rank scores its own shard of the examples, then sums and counts are all-reduced, so every rank
ends with identical scores. One forward and one backward per batch; the backward asks autograd for
activation gradients only (the backbone is frozen), so no weight gradient is ever formed.
Baselines for comparison: `random` (seeded), `weight-magnitude` (L2 norm of a unit's input weights),
`activation-magnitude` (mean |h| over the same positions).

The same pass also sums every FFN neuron's activation over the same counted positions (the text
tokens; the prompt's too with include_prompt): the scores file carries the means (`ffn_mean.i`),
which conversion's bias compensation folds into the FFN output bias. Prompt positions are left out
by default: on MiniLM + SST-2, means that included them took compensated skeletons to chance before
re-tuning (0.51-0.52), text-only means to 0.66-0.75 (docs/results/study_compensation.md).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from skeleton_ds import checkpoint, distributed
from skeleton_ds.architectures import ArchAdapter, Geometry
from skeleton_ds.errors import UserError

# The scorers, reductions and positions a run may ask for are Config's (skeleton_ds.config: --scorer,
# --attr-reduce, --attr-positions), validated there once.
GRADIENT_SCORERS = ("attribution", "integrated-gradients")


class UnitRecorder:
    """Forward hooks that keep, per layer, the FFN activation and the attention heads' outputs
    (the input of the output projection) of the current batch, still attached to the graph."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter):
        self.model, self.adapter = model, adapter
        self.ffn: list[torch.Tensor] = []
        self.heads: list[torch.Tensor] = []
        self.ffn_scale = 1.0
        """Integrated gradients' path: every FFN activation is multiplied by this before the layer uses it
        (and recorded so); at 1.0 nothing is changed."""

    def _scaled(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.ffn_scale == 1.0 else value * self.ffn_scale

    def _record_input(self, module, args):
        scaled = self._scaled(args[0])
        self.ffn.append(scaled)
        return None if scaled is args[0] else (scaled, *args[1:])

    def _record_output(self, module, args, out):
        scaled = self._scaled(out)
        self.ffn.append(scaled)
        return None if scaled is out else scaled

    @contextmanager
    def recording(self) -> Iterator[UnitRecorder]:
        handles = []
        for layer in self.adapter.layer_modules(self.model):
            site = layer.get_submodule(self.adapter.ffn_site)
            if self.adapter.ffn_site_reads_input:
                handles.append(site.register_forward_pre_hook(self._record_input))
            else:
                handles.append(site.register_forward_hook(self._record_output))
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
    if reduce == "max":  # the largest signed contribution of any counted token (Yang et al.'s own code)
        top = contrib.masked_fill(~positions.unsqueeze(-1), float("-inf")).amax(1)
        return torch.where(positions.any(1, keepdim=True), top, torch.zeros_like(top))
    raise ValueError(reduce)


def weight_magnitude(model: nn.Module, adapter: ArchAdapter, geometry: Geometry) -> dict[str, torch.Tensor]:
    """L2 norm of each unit's input weights (FFN: rows of the up/gate projections; KV group: its
    query rows plus its key and value rows)."""
    scores = {}
    for i, layer in enumerate(adapter.layer_modules(model)):
        ffn_in = [layer.get_submodule(p).weight for p in adapter.ffn_in]
        q = layer.get_submodule(adapter.q_proj).weight
        kv = [layer.get_submodule(p).weight for p in adapter.kv_proj]
        with distributed.gathered(ffn_in + [q] + kv):
            scores[f"ffn.{i}"] = torch.stack([w.float().pow(2).sum(1) for w in ffn_in]).sum(0).sqrt()
            groups = geometry.kv_heads
            sq = q.float().pow(2).sum(1).view(groups, -1).sum(1)
            sq = sq + sum(w.float().pow(2).sum(1).view(groups, -1).sum(1) for w in kv)
            scores[f"heads.{i}"] = sq.sqrt()
    return scores


def random_scores(geometry: Geometry, seed: int) -> dict[str, torch.Tensor]:
    """The seeded `random` baseline: uniform scores for every unit."""
    g = torch.Generator().manual_seed(seed)
    return ({f"ffn.{i}": torch.rand(geometry.ffn_size, generator=g) for i in range(geometry.layers)}
            | {f"heads.{i}": torch.rand(geometry.kv_heads, generator=g) for i in range(geometry.layers)})


def zero_sums(geometry: Geometry) -> dict[str, torch.Tensor]:
    """Float64 accumulators for score_batch: per layer the unit scores (`ffn.i`, `heads.i`), the FFN
    activation sums (`act.i`) over `tokens` counted positions, which give bias compensation its means,
    and each FFN neuron's largest |activation| at any position (`peak.i`, prompt included: a running
    maximum, merged with `merge_sums`)."""
    layers = range(geometry.layers)
    return ({f"ffn.{i}": torch.zeros(geometry.ffn_size, dtype=torch.float64) for i in layers}
            | {f"heads.{i}": torch.zeros(geometry.kv_heads, dtype=torch.float64) for i in layers}
            | {f"act.{i}": torch.zeros(geometry.ffn_size, dtype=torch.float64) for i in layers}
            | {f"peak.{i}": torch.zeros(geometry.ffn_size, dtype=torch.float64) for i in layers}
            | {"tokens": torch.zeros((), dtype=torch.float64)})


def is_peak(key: str) -> bool:
    """Accumulators that combine by maximum rather than by sum (across batches, ranks and resumes)."""
    return key.startswith("peak.")


def merge_sums(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> None:
    for key, value in part.items():
        if is_peak(key):
            torch.maximum(total[key], value, out=total[key])
        else:
            total[key] += value


def all_reduce_sums(sums: dict[str, torch.Tensor]) -> None:
    """Combine every rank's accumulators in place (a collective)."""
    for key, value in sums.items():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX if is_peak(key) else
                                     torch.distributed.ReduceOp.SUM)


def finish_scores(sums: dict[str, torch.Tensor], examples: float) -> dict[str, torch.Tensor]:
    """All-reduced sums -> the scores file's tensors: unit scores averaged over examples, each FFN
    neuron's mean activation over the counted positions (`ffn_mean.i`) and its peak |activation|
    (`ffn_peak.i`: massive activations, see localization.protect_outliers)."""
    scores = {k: (v / examples).float() for k, v in sums.items() if k.startswith(("ffn.", "heads."))}
    tokens = sums["tokens"].clamp(min=1)
    means = {f"ffn_mean.{k[4:]}": (v / tokens).float() for k, v in sums.items() if k.startswith("act.")}
    return scores | means | {f"ffn_peak.{k[5:]}": v.float() for k, v in sums.items() if is_peak(k)}


def _gold_gradients(model: nn.Module, batch: dict[str, torch.Tensor], weights: torch.Tensor,
                    recorder: UnitRecorder) -> tuple[torch.Tensor, ...]:
    """Gradients of the real examples' summed gold log-probability with respect to every recorded FFN
    activation and head output (one forward and one backward)."""
    recorder.clear()
    with torch.enable_grad():
        # The module itself, not a DeepSpeed engine: the engine's forward arms a hook that wants
        # engine.backward(loss), and here autograd.grad asks for activation gradients only.
        # ZeRO-3's parameter gathering hooks sit on the modules, so they still run.
        logits = model(batch["input_ids"], batch["attention_mask"], batch["answer_index"])
        gold = F.log_softmax(logits.float(), -1).gather(1, batch["labels"][:, None]).squeeze(1)
        return torch.autograd.grad((gold * weights).sum(), recorder.ffn + recorder.heads)


def _integrated_ffn(model: nn.Module, batch: dict[str, torch.Tensor], weights: torch.Tensor, recorder: UnitRecorder,
                    layers: int, steps: int) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Integrated gradients over the FFN activations, all layers together, from zero to their actual values:
    at each of `steps` right endpoints a = k/steps every FFN activation is multiplied by a, and a unit's token
    contribution is its (unscaled) activation times the gradient there, averaged over the steps. This is the
    derivative of the gold log-probability by a gate on the unit, averaged along the path, so over all units it
    adds up to the change from every FFN activation zeroed to none (as steps grow); with one step it is
    activation x gradient. Returns the FFN contributions [B, T, F] per layer, and the last step's gradients
    (a = 1: the heads keep activation x gradient)."""
    total = [torch.zeros(()) for _ in range(layers)]
    try:
        for k in range(1, steps + 1):
            recorder.ffn_scale = k / steps
            grads = _gold_gradients(model, batch, weights, recorder)
            for i in range(layers):
                total[i] = total[i] + recorder.ffn[i].detach().float() / recorder.ffn_scale * grads[i].float()
    finally:
        recorder.ffn_scale = 1.0
    return [t / steps for t in total], grads


def score_batch(model: nn.Module, batch: dict[str, torch.Tensor], weights: torch.Tensor, recorder: UnitRecorder, *,
                prompt_length: int, geometry: Geometry, scorer: str, reduce: str, include_prompt: bool,
                sums: dict[str, torch.Tensor], positions: str = "text", steps: int = 1) -> None:
    """Add one batch's weighted per-example scores to `sums` (float64, on the CPU).

    `model` is the prompted classifier itself (a DeepSpeed engine's `.module`), `recorder` records
    its backbone and must be recording; `weights` [B] is 1 for a real example and 0 for padding.
    `scorer` is "attribution" (activation x gradient, reduced per example by `reduce`),
    "integrated-gradients" (the FFN's over `steps` steps, see _integrated_ffn; heads as attribution) or
    "activation-magnitude" (mean |h| over the counted positions). Contributions count at the text
    positions (prompt positions too with `include_prompt`) or, with `positions="answer"`, at the answer
    position only; the FFN means for bias compensation always count the text positions.
    """
    groups = geometry.kv_heads
    text = torch.cat([batch["attention_mask"].new_full((len(weights), prompt_length), int(include_prompt)),
                      batch["attention_mask"]], dim=1).bool()
    if positions == "answer":
        scored = torch.zeros_like(text)
        scored[torch.arange(len(weights)), prompt_length + batch["answer_index"]] = True
    else:
        scored = text
    layers = geometry.layers
    ffn_contrib = None
    if scorer == "integrated-gradients":
        ffn_contrib, grads = _integrated_ffn(model, batch, weights, recorder, layers, steps)
    elif scorer == "attribution":
        grads = _gold_gradients(model, batch, weights, recorder)
    else:
        recorder.clear()
        with torch.no_grad():
            model(batch["input_ids"], batch["attention_mask"], batch["answer_index"])
    counted = (text.to(weights.dtype) * weights[:, None]).unsqueeze(-1)  # [B, T, 1], real examples only
    sums["tokens"] += counted.sum().double().cpu()
    for i in range(layers):
        ffn, heads = recorder.ffn[i].float(), recorder.heads[i].float()
        sums[f"act.{i}"] += (ffn.detach() * counted).sum((0, 1)).double().cpu()
        real = weights[:, None, None] * torch.cat([text.new_ones(len(weights), prompt_length),
                                                   batch["attention_mask"].bool()], 1).unsqueeze(-1)
        peak = (ffn.detach().abs() * real).amax((0, 1)).double().cpu()
        torch.maximum(sums[f"peak.{i}"], peak, out=sums[f"peak.{i}"])
        if scorer in GRADIENT_SCORERS:
            ffn_c = ffn * grads[i].float() if ffn_contrib is None else ffn_contrib[i]
            head_c = group_heads(heads * grads[layers + i].float(), groups)
            ffn_s, head_s = per_example(ffn_c, scored, reduce), per_example(head_c, scored, reduce)
        else:  # activation magnitude: mean |h| over counted positions (and over a group's dimensions)
            per_dim = geometry.heads_per_group * geometry.head_dim
            ffn_s = per_example(ffn.abs(), text, "mean-abs")
            head_s = per_example(group_heads(heads.abs(), groups) / per_dim, text, "mean-abs")
        sums[f"ffn.{i}"] += (weights[:, None] * ffn_s.detach()).sum(0).double().cpu()
        sums[f"heads.{i}"] += (weights[:, None] * head_s.detach()).sum(0).double().cpu()


def write_scores(path: Path, scores: dict[str, torch.Tensor], *, task: str, scorer: str, reduce: str,
                 include_prompt: bool, examples: int, base_model: dict, geometry: Geometry,
                 settings: dict | None = None, positions: str = "text", steps: int = 1,
                 within: dict | None = None) -> None:
    """The scores file (atomically), with the metadata read_attribution decodes (and the stage's
    settings record, skeleton_ds.lineage, when the pipeline wrote it). `within` ({"ffn": [[...]],
    "heads": [[...]]}, base indices) marks scores a keep schedule measured on a compact model: only
    those units were scored, and localization selects among them."""
    # safetensors metadata is str -> str: the non-string values are stored as JSON
    meta = {"task": task, "scorer": scorer, "reduce": reduce, "positions": positions, "steps": json.dumps(int(steps)),
            "include_prompt": json.dumps(bool(include_prompt)),
            "examples": json.dumps(int(examples)), "base_model": json.dumps(base_model),
            "geometry": json.dumps(asdict(geometry))}
    if settings is not None:
        meta["settings"] = json.dumps(settings)
    if within is not None:
        meta["within"] = json.dumps(within)
    checkpoint.save_tensors_atomic(path, scores, meta)


def to_base_indices(scores: dict[str, torch.Tensor], ffn: list[list[int]], heads: list[list[int]],
                    base: Geometry) -> dict[str, torch.Tensor]:
    """Scores measured on a compact model (padded to uniform widths) -> the base model's numbering: compact unit
    j of layer i is base unit ffn[i][j] (heads[i][j]); padding units are dropped, and units the compact model
    lacks get zero (localization.select keeps them out with `within`)."""
    out = {}
    for key, value in scores.items():
        kind, layer = key.rsplit(".", 1)
        kept = (heads if kind == "heads" else ffn)[int(layer)]
        full = torch.zeros(base.kv_heads if kind == "heads" else base.ffn_size, dtype=value.dtype)
        full[kept] = value[:len(kept)]
        out[key] = full
    return out


def read_attribution(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Scores and their metadata, decoded to JSON types (include_prompt a bool, examples an int)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UserError(f"{path} does not exist: run --stages attribute first (same --output)")
    with checkpoint.unreadable_as_user_error(path), safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        for key in ("base_model", "geometry"):
            meta[key] = json.loads(meta[key])
        meta["include_prompt"] = meta.get("include_prompt") in ("true", "True")  # "True": files before 2026-11-26
        meta["examples"] = int(meta.get("examples", 0))
        meta["positions"] = meta.get("positions", "text")  # files before integrated gradients: text, one step
        meta["steps"] = int(meta.get("steps", 1))
        meta["within"] = json.loads(meta["within"]) if "within" in meta else None
    except (KeyError, ValueError) as e:
        raise UserError(f"{path} has malformed metadata ({e}): redo --stages attribute with --overwrite") from None
    return tensors, meta
