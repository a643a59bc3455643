"""Expert parallelism on torch.distributed: expert placement and the expert-parallel prepare/finalize."""

from moekit.distributed.dispatch import (
    AllGatherReduceScatter,
    AllToAll,
    ExpertParallelPrepareFinalize,
    make_prepare_finalize,
)
from moekit.distributed.placement import determine_expert_map, expert_owners, local_experts

__all__ = [
    "AllGatherReduceScatter",
    "AllToAll",
    "ExpertParallelPrepareFinalize",
    "determine_expert_map",
    "expert_owners",
    "local_experts",
    "make_prepare_finalize",
]
