"""Which rank holds which expert: the expert map of expert parallelism.

E experts over ``ep`` ranks, ``base = E // ep``, ``rem = E % ep``: rank r holds ``base + (r < rem)`` experts
(vLLM's split, so layouts and checkpoints shard the same way):

    linear        rank r holds the contiguous ids [r·base + min(r, rem), ... + its count)
    round_robin   rank r holds r, r + ep, r + 2·ep, ...     (arange(r, E, ep))

``expert_map[g]`` is the local index of global expert g on this rank, -1 where it lives on another rank; local
indices follow ascending global ids.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit._checks import check_choice, check_positive
from moekit.config import PLACEMENTS


def _check(ep_size: int, num_experts: int, placement: str) -> None:
    check_positive("ep_size", ep_size)
    check_positive("num_experts", num_experts)
    check_choice("placement", placement, PLACEMENTS)


def local_experts(ep_size: int, ep_rank: int, num_experts: int, placement: str = "linear") -> torch.Tensor:
    """The global ids rank ``ep_rank`` holds, ascending: int64 [num_local]."""
    _check(ep_size, num_experts, placement)
    if isinstance(ep_rank, bool) or not isinstance(ep_rank, int):
        raise TypeError(f"ep_rank: expected an int, got {type(ep_rank).__name__}")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank: expected in [0, ep_size={ep_size}), got {ep_rank}")
    if placement == "round_robin":  # a rank past the last expert (E < ep_size) holds none, as under linear
        return torch.arange(ep_rank, max(ep_rank, num_experts), ep_size)
    base, rem = divmod(num_experts, ep_size)
    start = ep_rank * base + min(ep_rank, rem)
    return torch.arange(start, start + base + (ep_rank < rem))


def determine_expert_map(
    ep_size: int, ep_rank: int, num_experts: int, placement: str = "linear"
) -> tuple[int, torch.Tensor]:
    """``(num_local, expert_map)`` for rank ``ep_rank`` of ``ep_size``: expert_map int32 [num_experts], the local
    index of each global expert held here, -1 elsewhere (see the module docstring for the split)."""
    ids = local_experts(ep_size, ep_rank, num_experts, placement)
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[ids] = torch.arange(ids.numel(), dtype=torch.int32)
    return ids.numel(), expert_map


def expert_owners(ep_size: int, num_experts: int, placement: str = "linear") -> torch.Tensor:
    """The rank holding each global expert: int64 [num_experts] (what an all-to-all dispatch sends by)."""
    _check(ep_size, num_experts, placement)
    owners = torch.empty(num_experts, dtype=torch.int64)
    for rank in range(ep_size):
        owners[local_experts(ep_size, rank, num_experts, placement)] = rank
    return owners


def check_group(ep_size: int, ep_rank: int, group: "dist.ProcessGroup | None", *, building: str) -> None:
    """``ep_size`` and ``ep_rank`` against the (initialized) process ``group`` they claim to describe;
    ``building`` names what needs it, for the error."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"torch.distributed is not initialized: {building} needs "
                           "torch.distributed.init_process_group first (torchrun sets up its environment)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world != ep_size:
        raise ValueError(f"ep_size: expected the process group's size {world}, got {ep_size}")
    if rank != ep_rank:
        raise ValueError(f"ep_rank: expected this process's rank in the group {rank}, got {ep_rank}")
