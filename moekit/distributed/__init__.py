"""Expert and tensor parallelism on torch.distributed: expert placement, the expert-parallel prepare/finalize and
the tensor-parallel all-reduce around it."""

from moekit.distributed.dispatch import (
    AllGatherReduceScatter,
    AllToAll,
    ExpertParallelPrepareFinalize,
    make_prepare_finalize,
)
from moekit.distributed.placement import determine_expert_map, expert_owners, local_experts
from moekit.distributed.tensor_parallel import TensorParallel, parallel_groups, shard_intermediate

__all__ = [
    "AllGatherReduceScatter",
    "AllToAll",
    "ExpertParallelPrepareFinalize",
    "TensorParallel",
    "determine_expert_map",
    "expert_owners",
    "local_experts",
    "make_prepare_finalize",
    "parallel_groups",
    "shard_intermediate",
]
