"""Where this process stands among the ranks, and where the model's parameters live across them.

A run is the same code for one CPU process and for many GPUs across nodes: this module joins (or
makes) the process group and names the device a rank computes on, and its two ZeRO-3 helpers let
the recipe code read partitioned parameters (`gathered`) and say how much of them a rank holds
(`local_fraction`) without asking which ZeRO stage is on. Children that must form a world of their
own are started `without_rendezvous`.
"""

from __future__ import annotations

import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass
from collections.abc import Iterable, Mapping

import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous, or a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS_ENV = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"})
"""The variables that place a process in a process group (a launcher's, or the world of one set below). A
child that must form its own world is started without them, or it tries to rejoin this (bound) address."""


def without_rendezvous(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in RENDEZVOUS_ENV}


def init_distributed() -> Dist:
    """Join the process group; a plain `python launch/train.py` becomes a world of one."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist = Dist(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                # DeepSpeed's launcher sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE: ranks on this node
                local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE",
                                                                                    os.environ["WORLD_SIZE"]))))
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        # CPU ranks on one host share its cores; oversubscribing threads makes every rank slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world_size))
    else:
        accel.set_device(dist.local_rank)
    _skip_shared_memory_comm_build()
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False)
    return dist


_SHARED_MEMORY_COMM_OP = "deepspeed_shm_comm"


def _skip_shared_memory_comm_build() -> None:
    """DeepSpeed's CPU backend builds a C++ shared-memory all-reduce with ninja when it starts (silently, on a
    fresh machine's first run). Only its `inference_all_reduce` uses that op, which
    nothing here calls: gradients and ZeRO collectives go through torch.distributed (gloo on CPU). So the
    op is marked unbuildable for this process, and DeepSpeed falls back as it does where no compiler is."""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    if _SHARED_MEMORY_COMM_OP in compatible:
        compatible[_SHARED_MEMORY_COMM_OP] = False


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def gathered(params: Iterable[torch.nn.Parameter]):
    """Full values of ZeRO-3 partitioned parameters inside the block (read only); a no-op otherwise.

    A collective under ZeRO-3: every rank must enter it.
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def local_fraction(params: Iterable[torch.nn.Parameter]) -> float:
    """Share of these parameters' elements this rank stores: 1.0 unless ZeRO-3 partitioned them."""
    params = list(params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    return local / max(total, 1)


def stored(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """`module.<name>` as stored, without side effects: a parameter (under ZeRO-3 perhaps a shard), or a buffer (a
    vocabulary matrix mapped from the checkpoint: loading._map_vocabulary). Under ZeRO-3, reading a parameter as
    an attribute inside a forward pass gathers its full value on every rank (DeepSpeed's
    ZeROOrderedDict.__getitem__), which is what reading a few of its rows (`rows`) avoids."""
    found = dict.get(module._parameters, name)
    return found if found is not None else module._buffers.get(name)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape, also while ZeRO-3 holds only a shard of it."""
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 partitions `param` (each rank holds a shard in ds_tensor, whether or not the full value is
    materialised at the moment: that varies by rank, so it never decides which collective runs)."""
    return hasattr(param, "ds_id") and getattr(param, "ds_tensor", None) is not None


def readable_shard(param: torch.Tensor) -> bool:
    """Whether `rows` can read `param` from its shard: ZeRO-3 partitions it and the shard is in memory (not swapped
    out to NVMe, where only DeepSpeed's own gather brings it back). The same on every rank (a config setting)."""
    if not is_partitioned(param):
        return False
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    return getattr(param.ds_tensor, "final_location", None) != OffloadDeviceEnum.nvme


@torch.no_grad()
def rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """weight[ids] for a frozen 2-D (or 1-D) weight, without gathering all of it under ZeRO-3 (`readable_shard`).

    A rank holds one contiguous slice of the flattened weight (ds_tensor, from rank x its size). The ranks first
    agree on the union of the ids they need (their batches differ), then each copies the parts of those rows that
    fall in its slice into a zero buffer of [union, row width], and one all-reduce adds the buffers up. Reading a
    few label rows of a 151,936-row LM head, or the embedding rows of a batch's tokens, so moves kilobytes instead
    of the whole matrix on every rank. The collectives run on the rank's device (a shard offloaded to CPU memory
    is copied from there). No gradient reaches the weight. A collective under ZeRO-3: every rank calls it (every
    rank runs the same forward)."""
    if not is_partitioned(weight):  # whole on this rank (a map of the checkpoint too: CPU ranks only)
        return weight[ids]
    shape = tuple(weight.ds_shape)
    width = shape[1] if len(shape) == 2 else 1
    group = getattr(weight, "ds_process_group", None)
    shard = weight.ds_tensor.view(-1)
    start = weight.ds_tensor.ds_numel * torch.distributed.get_rank(group=group)
    here = ids.device  # the rank's device: where its collectives run
    wanted = _union(torch.unique(ids.flatten()), group)
    index = torch.int32 if (int(wanted.max()) + 1) * width < 2**31 else torch.long  # half the index memory
    positions = (wanted.to(index).unsqueeze(1) * width + torch.arange(width, dtype=index, device=here)).flatten()
    local = (positions >= start) & (positions < start + shard.numel())
    out = torch.zeros(positions.numel(), dtype=shard.dtype, device=here)
    out[local] = shard[(positions[local] - start).to(shard.device)].to(here)
    torch.distributed.all_reduce(out, group=group)
    picked = out.view(len(wanted), width)[torch.searchsorted(wanted, ids.flatten())]
    return picked.view(*ids.shape, width) if len(shape) == 2 else picked.view(ids.shape)


def _union(ids: torch.Tensor, group) -> torch.Tensor:
    """The sorted union of every rank's `ids` (1-D, unique), the same on every rank (two small collectives)."""
    size = torch.distributed.get_world_size(group=group)
    counts = [torch.zeros(1, dtype=torch.long, device=ids.device) for _ in range(size)]
    torch.distributed.all_gather(counts, torch.tensor([len(ids)], device=ids.device), group=group)
    longest = int(max(c.item() for c in counts))
    padded = torch.full((longest,), -1, dtype=torch.long, device=ids.device)
    padded[:len(ids)] = ids
    found = [torch.empty_like(padded) for _ in range(size)]
    torch.distributed.all_gather(found, padded, group=group)
    every = torch.cat(found)
    return torch.unique(every[every >= 0])
