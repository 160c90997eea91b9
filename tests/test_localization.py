"""Selection rules of stage 3 (pure functions): alignment rounding, ties, GQA grouping, global mode."""

from __future__ import annotations

import pytest
import torch

from skeleton_ds.architectures import Geometry
from skeleton_ds.attribution import group_heads, per_example
from skeleton_ds.errors import UserError
from skeleton_ds.localization import keep_count, select, top_units

GEOMETRY = Geometry(layers=2, ffn_size=256, heads=8, kv_heads=4, head_dim=2)


@pytest.mark.parametrize(("size", "ratio", "align", "expected"), [
    (1536, 0.3, 64, 448),   # 460.8 -> 7.2 units of 64 -> 7
    (1536, 0.2, 64, 320),   # 307.2 -> 4.8 -> 5
    (256, 0.01, 64, 64),    # never below one unit of alignment
    (48, 0.5, 64, 48),      # never above the layer
    (11008, 1.0, 64, 11008),
    (4, 0.5, 1, 2),
])
def test_keep_count_rounds_to_alignment(size, ratio, align, expected):
    assert keep_count(size, ratio, align) == expected


def test_top_units_breaks_ties_by_index_and_sorts():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1])
    assert top_units(scores, 3) == [0, 1, 3]
    assert top_units(scores, 3) == top_units(scores.clone(), 3)


def test_group_heads_sums_query_heads_sharing_a_kv_head():
    # 4 query heads of width 2 sharing 2 KV heads: heads (0,1) -> group 0, heads (2,3) -> group 1
    values = torch.arange(8.0).view(1, 1, 8)
    assert group_heads(values, 2).flatten().tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7]


def test_per_example_reductions():
    contrib = torch.tensor([[[1.0], [-3.0], [10.0]]])  # one example, 3 positions, 1 unit
    positions = torch.tensor([[True, True, False]])    # the last position is padding
    assert per_example(contrib, positions, "abs-sum").item() == 2.0
    assert per_example(contrib, positions, "signed").item() == -2.0
    assert per_example(contrib, positions, "mean-abs").item() == 2.0


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ({f"ffn.{i}": torch.rand(256, generator=g) for i in range(2)}
            | {f"heads.{i}": torch.rand(4, generator=g) for i in range(2)})


def test_uniform_selection_is_standard_and_deterministic():
    scores = _scores()
    sk = select(scores, GEOMETRY, ffn_keep=0.3, head_keep=0.5, align=64, mode="uniform")
    assert sk.ffn_sizes() == [64, 64] and [len(h) for h in sk.heads] == [2, 2] and sk.is_uniform()
    for layer, kept in enumerate(sk.ffn):
        assert kept == sorted(kept)
        threshold = min(scores[f"ffn.{layer}"][kept])
        assert (scores[f"ffn.{layer}"] > threshold).sum() == len(kept) - 1  # exactly the top ones
    assert sk == select(scores, GEOMETRY, ffn_keep=0.3, head_keep=0.5, align=64, mode="uniform")


def test_global_selection_uses_one_threshold_so_sizes_differ():
    scores = _scores()
    scores["ffn.0"] = scores["ffn.0"] + 1.0  # layer 0 dominates
    sk = select(scores, GEOMETRY, ffn_keep=0.5, head_keep=1.0, align=8, mode="global")
    assert sk.ffn_sizes() == [256, 8]  # layer 1 keeps the minimum of one alignment unit
    assert not sk.is_uniform()


def test_a_layer_floor_keeps_every_layer_above_it_at_the_same_total():
    scores = _scores()
    scores["ffn.0"] = scores["ffn.0"] + 1.0  # layer 0 dominates: without a floor layer 1 keeps one unit
    sk = select(scores, GEOMETRY, ffn_keep=0.5, head_keep=1.0, align=8, mode="global", ffn_floor=0.25)
    assert sk.ffn_sizes() == [192, 64]  # 64 of 256 guaranteed, the rest of the 256 to the threshold
    assert sk.ffn[1] == top_units(scores["ffn.1"], 64)  # the floor keeps a layer's own best units
    assert select(scores, GEOMETRY, ffn_keep=0.5, head_keep=1.0, align=8, mode="global", ffn_floor=0.0) == select(
        scores, GEOMETRY, ffn_keep=0.5, head_keep=1.0, align=8, mode="global")
    # a floor at the keep ratio is uniform allocation
    assert select(scores, GEOMETRY, ffn_keep=0.5, head_keep=1.0, align=8, mode="global", ffn_floor=0.5).ffn_sizes() == [
        128, 128]


def test_head_keep_that_leaves_no_head_is_refused():
    with pytest.raises(UserError, match="keeps no attention head group"):
        select(_scores(), GEOMETRY, ffn_keep=0.3, head_keep=0.1, align=64, mode="uniform")


def test_protected_outliers_are_kept_at_any_ratio_without_changing_counts():
    scores = _scores()
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        scores[f"ffn_peak.{i}"] = torch.rand(256, generator=g) + 1.0
    scores["ffn_peak.0"][17] = 3000.0  # a massive activation on a neuron that scores lowest
    scores["ffn.0"][17] = -1.0
    plain = select(scores, GEOMETRY, ffn_keep=0.3, head_keep=1.0, align=64, mode="uniform")
    protected = select(scores, GEOMETRY, ffn_keep=0.3, head_keep=1.0, align=64, mode="uniform", protect=100)
    assert 17 not in plain.ffn[0] and 17 in protected.ffn[0]
    assert protected.ffn_sizes() == plain.ffn_sizes()
    assert protected.ffn[1] == plain.ffn[1]  # no outlier there
    assert len(set(protected.ffn[0]) - set(plain.ffn[0])) == 1  # only the lowest-scored of the rest gave way


def test_protection_without_peaks_is_refused():
    with pytest.raises(UserError, match="redo --stages attribute"):
        select(_scores(), GEOMETRY, ffn_keep=0.3, head_keep=1.0, align=64, mode="uniform", protect=100)
