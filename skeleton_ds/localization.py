"""Localization (stage 3's algorithm): keep the top-scoring units of every layer (the task's skeleton).

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR --stages localize
    (the stage itself: skeleton_ds/stages/localize.py)

`uniform` mode keeps the same count in every layer, so the compact model is a standard
architecture; counts are rounded to a multiple of `--align` (kernels like aligned sizes), never
below one alignment unit and never above the layer. `global` mode uses one threshold across
layers, so per-layer sizes differ (still rounded to the alignment). Ties break by index, so the
selection is deterministic, and kept indices are stored sorted. `masked(...)` zeroes the unkept
units in a live model: the reference that physical conversion must match.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Iterator

import torch
from torch import nn

from skeleton_ds import checkpoint
from skeleton_ds.architectures import ArchAdapter, Geometry
from skeleton_ds.errors import UserError


def keep_count(size: int, ratio: float, align: int = 1) -> int:
    """round(ratio * size) to a multiple of align, within [min(align, size), size]."""
    count = round(ratio * size / align) * align
    return max(min(align, size), min(size, count))


def top_units(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` highest scores, ties to the lower index, returned sorted."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:count])


def _global_counts(layer_scores: list[torch.Tensor], ratio: float, floor: float = 0.0) -> list[int]:
    """Per-layer counts under one threshold across all layers (the top ratio of all units). With `floor`,
    each layer first keeps its top round(floor x size) units, and the threshold shares out the rest of
    the same total: global allocation that never starves a layer."""
    counts = [min(round(floor * len(t)), len(t)) for t in layer_scores]
    total = round(ratio * sum(len(t) for t in layer_scores))
    rest = sorted((-float(s), layer, i) for layer, t in enumerate(layer_scores)
                  for i, s in enumerate(sorted(t.tolist(), reverse=True)[counts[layer]:]))
    for _, layer, _ in rest[:max(0, total - sum(counts))]:
        counts[layer] += 1
    return counts


@dataclass(frozen=True)
class Skeleton:
    ffn: list[list[int]]  # per layer, sorted kept neuron indices
    heads: list[list[int]]  # per layer, sorted kept KV-group indices

    def ffn_sizes(self) -> list[int]:
        return [len(k) for k in self.ffn]

    def is_uniform(self) -> bool:
        return len(set(self.ffn_sizes())) == 1 and len({len(h) for h in self.heads}) == 1


def outliers(peaks: torch.Tensor, factor: float) -> torch.Tensor:
    """Neurons whose peak |activation| is at least `factor` times the layer's median peak: the massive
    activations of trained LLMs (Sun et al. 2024; Yu et al. 2024's super weights). A handful per model
    carry values thousands of times the median; they score low on activation x gradient, yet removing
    them breaks the model."""
    return (peaks >= factor * peaks.median()).nonzero().flatten()


def protect_outliers(scores: dict[str, torch.Tensor], geometry: Geometry, factor: float,
                     within: Skeleton | None = None) -> dict[str, torch.Tensor]:
    """Scores with every outlier neuron ranked above all others (by its peak), so any keep ratio keeps it
    and the per-layer counts do not change. With `within`, outliers are found among its neurons only (the
    others' peaks were not measured)."""
    if not factor:
        return scores
    if "ffn_peak.0" not in scores:
        raise UserError("--protect-outliers needs the FFN activation peaks, which attribution files from before "
                        "2026-12-02 lack: redo --stages attribute with --overwrite")
    out = dict(scores)
    for i in range(geometry.layers):
        ffn, peak = scores[f"ffn.{i}"].float(), scores[f"ffn_peak.{i}"].float()
        candidates = torch.arange(len(peak)) if within is None else torch.tensor(within.ffn[i], dtype=torch.long)
        protected = candidates[outliers(peak[candidates], factor)]
        boosted = ffn.clone()
        boosted[protected] = ffn.max() + 1 + peak[protected] / peak.max().clamp(min=1e-30)
        out[f"ffn.{i}"] = boosted
    return out


def restricted(scores: dict[str, torch.Tensor], geometry: Geometry, within: Skeleton) -> dict[str, torch.Tensor]:
    """Unit scores with every unit outside `within` at -inf: a later step of a keep schedule selects among the
    units the step before kept, whatever the scores of the others say."""
    out = dict(scores)
    for i in range(geometry.layers):
        for key, kept in ((f"ffn.{i}", within.ffn[i]), (f"heads.{i}", within.heads[i])):
            masked_scores = torch.full_like(scores[key].float(), float("-inf"))
            masked_scores[kept] = scores[key].float()[kept]
            out[key] = masked_scores
    return out


def select(scores: dict[str, torch.Tensor], geometry: Geometry, *, ffn_keep: float, head_keep: float, align: int,
           mode: str, protect: float = 0.0, ffn_floor: float = 0.0, within: Skeleton | None = None) -> Skeleton:
    """The skeleton: per layer, the top units; `ffn_floor` (global mode) is the share of each layer's FFN
    kept whatever the threshold; `within` (a keep schedule's previous skeleton) holds every unit that may be
    kept, and must keep more than the keeps asked for."""
    layers = range(geometry.layers)
    scores = protect_outliers(scores, geometry, protect, within)
    if within is not None:
        scores = restricted(scores, geometry, within)
    ffn_scores = [scores[f"ffn.{i}"] for i in layers]
    head_scores = [scores[f"heads.{i}"] for i in layers]
    if round(head_keep * geometry.kv_heads) == 0:
        raise UserError(f"--head-keep {head_keep} keeps no attention head group of {geometry.kv_heads} per layer: "
                        f"use at least {1 / geometry.kv_heads:.3g}")
    if mode == "uniform":
        ffn_counts = [keep_count(geometry.ffn_size, ffn_keep, align)] * geometry.layers
        head_counts = [geometry.loadable_groups(keep_count(geometry.kv_heads, head_keep))] * geometry.layers
    else:
        ffn_counts = [keep_count(geometry.ffn_size, c / geometry.ffn_size, align)
                      for c in _global_counts(ffn_scores, ffn_keep, min(ffn_floor, ffn_keep))]
        head_counts = [keep_count(geometry.kv_heads, c / geometry.kv_heads)
                       for c in _global_counts(head_scores, head_keep)]
    skeleton = Skeleton(ffn=[top_units(s, c) for s, c in zip(ffn_scores, ffn_counts)],
                        heads=[top_units(s, c) for s, c in zip(head_scores, head_counts)])
    if within is not None and any(not set(new) <= set(old) for new, old in zip(skeleton.ffn + skeleton.heads,
                                                                              within.ffn + within.heads)):
        raise UserError(f"--ffn-keep {ffn_keep} / --head-keep {head_keep} keep more units than the keep schedule's "
                        f"previous step did: each step must keep fewer than the one before")
    return skeleton


def check_scores(scores: dict[str, torch.Tensor], geometry: Geometry, source: str) -> None:
    for i in range(geometry.layers):
        for key, size in ((f"ffn.{i}", geometry.ffn_size), (f"heads.{i}", geometry.kv_heads)):
            if key not in scores or scores[key].shape != (size,):
                found = tuple(scores[key].shape) if key in scores else "nothing"
                raise UserError(f"{source} does not fit this model: {key} should have shape ({size},), found {found}; "
                                f"redo --stages attribute for this --model")


@contextmanager
def masked(model: nn.Module, adapter: ArchAdapter, geometry: Geometry, skeleton: Skeleton,
           fill: list[torch.Tensor] | None = None) -> Iterator[None]:
    """Zero the unkept FFN neurons and KV groups of `model` (a Hugging Face backbone) in forward passes;
    with `fill` (per layer [ffn_size]), unkept FFN neurons output those values instead of zero: the
    reference for bias compensation."""
    handles = []
    group_width = geometry.heads_per_group * geometry.head_dim
    for i, (layer, ffn_keep, head_keep) in enumerate(zip(adapter.layer_modules(model), skeleton.ffn, skeleton.heads)):
        ffn_mask = torch.zeros(geometry.ffn_size)
        ffn_mask[ffn_keep] = 1
        ffn_fill = torch.zeros(geometry.ffn_size) if fill is None else fill[i].float() * (1 - ffn_mask)
        head_mask = torch.zeros(geometry.kv_heads)
        head_mask[head_keep] = 1
        head_mask = head_mask.repeat_interleave(group_width)
        site = layer.get_submodule(adapter.ffn_site)

        def keep(h: torch.Tensor, k=ffn_mask, f=ffn_fill) -> torch.Tensor:
            return h * k.to(h) + f.to(h)

        if adapter.ffn_site_reads_input:
            handles.append(site.register_forward_pre_hook(lambda m, args, keep=keep: (keep(args[0]),) + args[1:]))
        else:
            handles.append(site.register_forward_hook(lambda m, args, out, keep=keep: keep(out)))
        attn_out = layer.get_submodule(adapter.attn_out)
        handles.append(attn_out.register_forward_pre_hook(
            lambda m, args, k=head_mask: (args[0] * k.to(args[0]),) + args[1:]))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def skeleton_record(skeleton: Skeleton, meta: dict, *, keep_mode: str, ffn_keep: float, head_keep: float,
                    align: int, protect_outliers: float = 0.0) -> dict:
    """The skeleton.json record: the kept units, how they were selected, and the scores' metadata
    (task, base-model identity, geometry, attribution settings; as read_attribution returns it)."""
    return {
        "format": "skeleton_ds.skeleton/1", "task": meta["task"], "base_model": meta["base_model"],
        "geometry": meta["geometry"], "keep_mode": keep_mode, "ffn_keep": ffn_keep,
        "head_keep": head_keep, "align": align, "protect_outliers": protect_outliers,
        "attribution": {k: meta[k] for k in ("scorer", "reduce", "include_prompt", "examples")}
        | {"positions": meta.get("positions", "text"), "steps": meta.get("steps", 1)},
        "ffn_sizes": skeleton.ffn_sizes(), "head_counts": [len(h) for h in skeleton.heads],
        "layers": [{"ffn": f, "heads": h} for f, h in zip(skeleton.ffn, skeleton.heads)],
    }


def unit_problems(layers: list[list[int]], size: int, unit: str) -> list[str]:
    """What is wrong with per-layer kept indices of units numbered [0, size): a skeleton must keep at
    least one unit per layer, as sorted unique integers in range."""
    problems = []
    for i, kept in enumerate(layers):
        if not isinstance(kept, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in kept):
            problems.append(f"layer {i}: {unit} indices must be a list of integers")
        elif any(not 0 <= k < size for k in kept):
            problems.append(f"layer {i}: {unit} index out of range [0, {size}): "
                            f"{[k for k in kept if not 0 <= k < size][:5]}")
        elif len(set(kept)) != len(kept):
            problems.append(f"layer {i}: duplicate {unit} indices")
        elif kept != sorted(kept):
            problems.append(f"layer {i}: {unit} indices are not sorted")
        elif not kept:
            problems.append(f"layer {i}: no {unit} kept")
    return problems


def load_skeleton(path, geometry: Geometry | None = None) -> tuple[Skeleton, dict]:
    """skeleton.json, checked against `geometry` (the model it is about to be applied to)."""
    record = checkpoint.read_json(path, "skeleton")
    if record.get("format") != "skeleton_ds.skeleton/1":
        raise UserError(f"{path} is not a skeleton_ds skeleton.json")
    try:
        skeleton = Skeleton(ffn=[layer["ffn"] for layer in record["layers"]],
                            heads=[layer["heads"] for layer in record["layers"]])
    except (KeyError, TypeError) as e:
        raise UserError(f"{path} is malformed (layers[].ffn / layers[].heads: {e}): redo --stages localize") from None
    if geometry is not None:
        if len(skeleton.ffn) != geometry.layers:
            raise UserError(f"{path} has {len(skeleton.ffn)} layers, this model {geometry.layers}: it was made for "
                            f"{record.get('base_model', {}).get('name_or_path')}")
        problems = unit_problems(skeleton.ffn, geometry.ffn_size, "FFN") + \
            unit_problems(skeleton.heads, geometry.kv_heads, "KV-group")
        if problems:
            raise UserError(f"{path} does not fit this model ({geometry.layers} layers, "
                            f"{geometry.ffn_size} FFN neurons, "
                            f"{geometry.kv_heads} KV groups): {problems[0]}; redo --stages localize")
    return skeleton, record
