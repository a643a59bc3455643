"""Expert parallelism on torch.distributed: expert placement and the expert-parallel prepare/finalize."""

from moekit.distributed.placement import determine_expert_map, expert_owners, local_experts

__all__ = ["determine_expert_map", "expert_owners", "local_experts"]
