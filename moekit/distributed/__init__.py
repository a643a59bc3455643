"""Expert parallelism across ranks: expert-parallel load balancing (EPLB) today.

``eplb.py`` plans replicas from measured loads and maps routed ids to replicas; ``eplb_load.py`` measures the
loads (a device-side sliding window) and reads/writes load files; ``eplb_report.py`` is ``moekit eplb``.
"""

from moekit.distributed.eplb import logical_to_physical, rebalance_experts
from moekit.distributed.eplb_load import ExpertLoadRecorder, read_expert_load, write_expert_load

__all__ = ["ExpertLoadRecorder", "logical_to_physical", "read_expert_load", "rebalance_experts",
           "write_expert_load"]
