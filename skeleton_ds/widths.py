"""Per-layer widths: run each layer of a compact model at the size its skeleton kept.

A skeleton may keep a different number of FFN neurons (and KV groups) in every layer (`--keep-mode
global`). A standard checkpoint has one `intermediate_size` for all layers, so conversion pads every
layer to the widest with zero neurons: plain `from_pretrained`, vLLM and the rest load it as is, and
compute as much as the widest layer. Skeleton's own loaders (infer, serve, bench, retune) cut the
padding off after loading, so compute follows the neurons kept. The cut is exact: conversion puts
the kept units first and the padding after them, and a zero neuron or head adds nothing (LLaMA:
act(0) * 0 = 0 into zero output columns; a zero-padded KV group's heads meet zero output columns).

Attention runs with any head count per layer as long as every layer keeps whole KV groups: the
query heads per KV group stay those of the config.
"""

from __future__ import annotations

import torch
from torch import nn

from skeleton_ds.architectures import ArchAdapter


def _cut(layer: nn.Module, path: str, rows: int | None = None, cols: int | None = None) -> None:
    """Replace the linear layer at `path` by one holding only its first `rows` outputs / `cols` inputs
    (copies, so the padded tensors are freed)."""
    old = layer.get_submodule(path)
    weight = old.weight[:rows] if rows is not None else old.weight
    weight = weight[:, :cols] if cols is not None else weight
    bias = old.bias[:rows] if (old.bias is not None and rows is not None) else old.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=old.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=old.bias.requires_grad)
    owner, _, name = path.rpartition(".")
    setattr(layer.get_submodule(owner) if owner else layer, name, new)


def fit_layer_widths(model: nn.Module, adapter: ArchAdapter, ffn_sizes: list[int], head_counts: list[int]) -> bool:
    """Cut each layer of `model` (a padded compact model) to its own FFN width and KV-group count.
    Returns whether anything was cut."""
    config = model.config
    geometry = adapter.geometry(config)
    layers = adapter.layer_modules(model)
    if len(layers) != len(ffn_sizes) or len(layers) != len(head_counts):
        raise ValueError(f"{len(layers)} layers, but widths for {len(ffn_sizes)} / {len(head_counts)}")
    cut = False
    with torch.no_grad():
        for layer, width, groups in zip(layers, ffn_sizes, head_counts):
            if width < geometry.ffn_size:
                for path in adapter.ffn_in:
                    _cut(layer, path, rows=width)
                _cut(layer, adapter.ffn_out, cols=width)
                cut = True
            if adapter.causal and groups < geometry.kv_heads:
                q_rows = groups * geometry.heads_per_group * geometry.head_dim
                _cut(layer, adapter.q_proj, rows=q_rows)
                for path in adapter.kv_proj:
                    _cut(layer, path, rows=groups * geometry.head_dim)
                _cut(layer, adapter.attn_out, cols=q_rows)
                cut = True
    return cut
