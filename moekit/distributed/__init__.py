"""Expert and tensor parallelism on torch.distributed, and expert-parallel load balancing (EPLB).

``placement.py`` decides which rank holds which experts; ``dispatch.py`` moves tokens to them and back;
``tensor_parallel.py`` is the all-reduce around a slice of every expert's intermediate size; ``eplb.py`` plans
replicas from measured loads and maps routed ids to replicas; ``eplb_load.py`` measures the loads (a device-side
sliding window) and reads/writes load files; ``eplb_rearrange.py`` moves expert weights between ranks to apply a
plan; ``eplb_report.py`` is ``moekit eplb``.
"""

from moekit.distributed.dispatch import (
    AllGatherReduceScatter,
    AllToAll,
    ExpertParallelPrepareFinalize,
    make_prepare_finalize,
)
from moekit.distributed.eplb import logical_to_physical, rebalance_experts
from moekit.distributed.eplb_load import ExpertLoadRecorder, read_expert_load, write_expert_load
from moekit.distributed.eplb_rearrange import (
    check_phy2log,
    check_phy2log_covers,
    check_rearrangeable,
    rearrange_expert_weights,
)
from moekit.distributed.placement import determine_expert_map, expert_owners, local_experts
from moekit.distributed.tensor_parallel import TensorParallel, parallel_groups, shard_intermediate

__all__ = [
    "AllGatherReduceScatter",
    "AllToAll",
    "ExpertLoadRecorder",
    "ExpertParallelPrepareFinalize",
    "TensorParallel",
    "check_phy2log",
    "check_phy2log_covers",
    "check_rearrangeable",
    "determine_expert_map",
    "expert_owners",
    "local_experts",
    "logical_to_physical",
    "make_prepare_finalize",
    "parallel_groups",
    "read_expert_load",
    "rearrange_expert_weights",
    "rebalance_experts",
    "shard_intermediate",
    "write_expert_load",
]
