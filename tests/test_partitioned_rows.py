"""distributed.rows reads rows of a ZeRO-3 partitioned weight from the ranks' shards (the batch's embedding rows, the
label rows of an LM head) without gathering the whole matrix. Two real gloo ranks, each asking for other rows, over
a weight split as ZeRO-3 splits it (one contiguous slice of the flattened tensor per rank, the last one padded).
The pipeline's 1-rank vs 2-rank ZeRO-3 equality tests (test_distributed.py) cover it inside DeepSpeed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB, WIDTH = 37, 6  # 222 elements: 111 per rank


def _partitioned(full: torch.Tensor, rank: int, world: int) -> torch.nn.Parameter:
    flat = full.flatten()
    size = -(-flat.numel() // world)
    shard = torch.zeros(size)
    piece = flat[rank * size:(rank + 1) * size]
    shard[:len(piece)] = piece
    param = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # the full value is not materialised
    param.ds_id, param.ds_shape, param.ds_numel = 0, full.shape, full.numel()
    param.ds_tensor = shard
    param.ds_tensor.ds_numel = size
    return param


def _worker(rank: int, world: int, init: str, results) -> None:
    from skeleton_ds import distributed

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    full = torch.arange(VOCAB * WIDTH, dtype=torch.float32).view(VOCAB, WIDTH)
    weight = _partitioned(full, rank, world)
    ids = torch.tensor([[36, 0, 18], [18, 5, 36]]) if rank == 0 else torch.tensor([[1, 2, 3, 4], [35, 35, 18, 19]])
    got = distributed.rows(weight, ids)
    bias = _partitioned(torch.arange(VOCAB, dtype=torch.float32), rank, world)
    got_bias = distributed.rows(bias, torch.tensor([7, 36]))
    results[rank] = (torch.equal(got, full[ids]), torch.equal(got_bias, torch.tensor([7.0, 36.0])), tuple(got.shape))
    dist.destroy_process_group()


@pytest.mark.multirank
def test_rows_of_a_partitioned_weight_equal_indexing_the_whole(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", results), nprocs=2)
    assert results[0] == (True, True, (2, 3, WIDTH)) and results[1] == (True, True, (2, 4, WIDTH))


def test_an_unpartitioned_weight_is_indexed_directly():
    from skeleton_ds import distributed

    weight = torch.randn(5, 3)
    assert torch.equal(distributed.rows(weight, torch.tensor([4, 0])), weight[[4, 0]])
