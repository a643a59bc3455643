"""Tensor-parallel experts: each of a TP group's ranks holds a slice of every (local) expert's intermediate
dimension I, and an all-reduce over the group sums their partial outputs.

    y = Σ_k w_k · W2[:, I] · act(W13[I] x)  =  Σ_ranks  Σ_k w_k · W2[:, I_r] · act(W13[I_r] x)

(the activation is elementwise over I, gate and up rows sliced alike; swigluoai's clamp and ``up + 1`` too). Ranks
are laid out TP-innermost, as in vLLM: rank ``ep_rank * tp_size + tp_rank`` of the layer's process group; the ranks
of one TP group hold the same tokens, the ranks of one EP group (same ``tp_rank``) split the experts.

What each rank holds of an expert (I_r = I / tp_size; loading.py cuts these from a full checkpoint):

    w13 [2I_r, H], w13_bias [2I_r]   rows of the gate half and of the up half alike
    w2 [H, I_r]                      columns
    w2_bias [H]                      whole, on every rank; only tp_rank 0 adds it (``adds_w2_bias``)
    8-bit scales                     per row (w13) and per block (w13 rows, w2 columns) sliced with what they scale;
                                     w2's per-row and every per-tensor scale whole. Blocks must not straddle two
                                     ranks: I_r a multiple of the block (``W8A8MoEMethod.check_tp_split``; every
                                     method says which splits its tensors allow)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit.config import ParallelConfig
from moekit.kernel.prepare_finalize import PrepareFinalize, PrepareResult
from moekit.quant.params import QuantParams

# (process group, ep_size, tp_size) -> (this rank's EP group, TP group), made once per process. Over the default
# group every rank makes every subgroup, in the same order (new_group is collective over the whole world). Over
# a smaller group (a pipeline stage) the other ranks never call: each rank makes only its own two subgroups with
# a barrier among their members alone (use_local_synchronization; torch names such a group from its ranks and
# the count of groups this process made, so every member must have made as many groups before, as SPMD code
# does). Plain new_group calls there made colliding names across stages and one stage hung.
_GROUPS: dict[tuple[object, int, int], tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]] = {}


def parallel_groups(parallel: ParallelConfig, group: dist.ProcessGroup | None = None
                    ) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """This rank's (EP group, TP group) inside ``group`` (None: the default group); a size-1 side is None, and
    with one side of size 1 the other is ``group`` itself."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "(torchrun sets up its environment) before building a parallel layer")
    world = dist.get_world_size(group)
    if world != parallel.world_size:
        raise ValueError(f"parallel: ep_size * tp_size = {parallel.world_size} must be the process group's size "
                         f"{world}")
    if dist.get_rank(group) != parallel.rank:
        raise ValueError(f"parallel: ep_rank * tp_size + tp_rank = {parallel.rank} must be this process's rank in "
                         f"the group, {dist.get_rank(group)}")
    ep, tp = parallel.ep_size, parallel.tp_size
    if ep == 1 or tp == 1:
        return (group if ep > 1 else None), (group if tp > 1 else None)
    # Keyed by the group object itself, the default one resolved: after destroy_process_group and a new
    # init_process_group, None names a new group and the cached subgroups of the old one are dead.
    key = (group if group is not None else _default_group(), ep, tp)
    if key not in _GROUPS:
        ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(world)]
        if group is None or group is _default_group():
            mine = ranks[parallel.rank]
            ep_group = tp_group = None
            for t in range(tp):  # every rank creates every subgroup, in the same order
                members = [ranks[e * tp + t] for e in range(ep)]
                made = dist.new_group(members)
                ep_group = made if mine in members else ep_group
            for e in range(ep):
                members = [ranks[e * tp + t] for t in range(tp)]
                made = dist.new_group(members)
                tp_group = made if mine in members else tp_group
            _GROUPS[key] = (ep_group, tp_group)
        else:
            # Every member makes its EP group first, then its TP group: each local barrier meets all its members.
            ep_members = [ranks[e * tp + parallel.tp_rank] for e in range(ep)]
            tp_members = [ranks[parallel.ep_rank * tp + t] for t in range(tp)]
            _GROUPS[key] = (dist.new_group(ep_members, use_local_synchronization=True),
                            dist.new_group(tp_members, use_local_synchronization=True))
    return _GROUPS[key]


def _default_group() -> dist.ProcessGroup | None:
    return dist.group.WORLD


def shard_intermediate(t: torch.Tensor, dim: int, tp_size: int, tp_rank: int, *, halves: int = 1) -> torch.Tensor:
    """Rank ``tp_rank``'s contiguous share of dimension ``dim`` of ``t`` (an expert's I); ``halves=2`` for fused
    gate-then-up rows, whose two halves are sliced alike."""
    parts = t.chunk(halves, dim)
    if any(p.shape[dim] % tp_size for p in parts) or len(parts) != halves:
        raise ValueError(f"t: dimension {dim} of shape {tuple(t.shape)} does not split into {halves} x {tp_size} "
                         "equal parts")
    return torch.cat([p.narrow(dim, tp_rank * (p.shape[dim] // tp_size), p.shape[dim] // tp_size) for p in parts],
                     dim)


class TensorParallel(PrepareFinalize):
    """Wraps the layer's dispatch (local, or expert-parallel over the EP group): after its finalize the partial
    outputs of the TP group's ranks are summed with one all-reduce (in the layer's dtype).

    The GEMM-2 bias (``w2_bias`` [E, H]) has no I to slice: every rank holds all of it, and only tp_rank 0 adds
    it, so that the all-reduce counts it once. Holding it whole everywhere (rather than zeros off rank 0, as
    vLLM's gpt-oss loader writes) keeps ``weight_loader`` and ``load_state_dict`` plain copies of the checkpoint:
    an engine that loads the bias into every rank, as it must without an I to cut, gets the right sum.
    """

    collective = True

    def __init__(self, inner: PrepareFinalize, *, tp_size: int, tp_rank: int,
                 group: dist.ProcessGroup | None) -> None:
        if not isinstance(inner, PrepareFinalize):
            raise TypeError(f"inner: expected a moekit.PrepareFinalize, got {type(inner).__name__}")
        if dist.get_world_size(group) != tp_size or dist.get_rank(group) != tp_rank:
            raise ValueError(f"group: expected a TP group of {tp_size} ranks with this one at {tp_rank}, got "
                             f"{dist.get_world_size(group)} ranks with this one at {dist.get_rank(group)}")
        self.inner, self.tp_size, self.tp_rank, self.group = inner, tp_size, tp_rank, group
        self.adds_w2_bias = tp_rank == 0

    def __repr__(self) -> str:
        return f"TensorParallel({self.inner!r}, tp_size={self.tp_size}, tp_rank={self.tp_rank})"

    def __deepcopy__(self, memo: dict) -> TensorParallel:
        return self  # bound to a process group: a copied layer shares it

    def prepare(self, hidden_states_TH: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, *,
                apply_router_weight_on_input: bool, quant: QuantParams) -> PrepareResult:
        return self.inner.prepare(hidden_states_TH, topk_weights_TK, topk_ids_TK,
                                  apply_router_weight_on_input=apply_router_weight_on_input, quant=quant)

    def finalize(self, output_TH: torch.Tensor, prep: PrepareResult) -> torch.Tensor:
        out = self.inner.finalize(output_TH, prep).contiguous()
        dist.all_reduce(out, group=self.group)  # every TP rank holds the same tokens: sum the I slices
        return out
