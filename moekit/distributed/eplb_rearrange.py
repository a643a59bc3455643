"""Apply an EPLB plan: move expert weights between ranks so every physical slot holds its new logical expert.

    old_phy2log [R] ──▶ new_phy2log [R]        (one layer's rows of rebalance_experts' phy2log, before and after)
    rank r holds physical slots [r·R/ep, (r+1)·R/ep) as its local experts 0 .. R/ep - 1 (rank-major, as eplb.py)

For each new slot of this rank, in this order of preference:

1. the slot already held that logical expert: nothing is written;
2. another local slot held it (a move inside the rank, or a second replica of one expert on one rank): a local
   copy, no communication;
3. otherwise it is received, once per (rank, expert) even when the rank gets it into several slots, from one of
   the ranks that held it (chosen as ``holders[dst % len(holders)]``, so replicas share the sending).

What moves: every parameter and buffer of the ``RoutedExperts`` whose first dim is the local expert count
(weights, biases, quantized codes, their scales, zero points), each viewed as bytes ``[local_E, -1]`` and packed
into one uint8 row per expert, so a single ``all_to_all_single`` carries them all (bytes: bit-exact for every dtype,
fp8 included, and supported by gloo and NCCL alike). ``expert_map`` (a map over global slots, unchanged by a
rearrangement) is not a per-expert tensor and stays.

In place: each tensor is written with ``index_copy_`` into its own storage, so captured CUDA graphs, compiled
kernels and anything else holding the parameters keep pointing at valid, updated memory. Temporary memory: a
packed copy of the local experts, the rows sent, the rows received and the new rows of the slots that change (up
to four times the layer's local expert bytes when every slot changes; a rebalancing runs layer by layer).

Refused before anything moves, on every rank (an agreement collective first, so no rank is left waiting in the
transfer): a quant method without ``supports_eplb = True`` (its per-expert state may live elsewhere), a tensor of
the layer that is not ``[local_E, ...]`` (a 0-d per-layer scale made from this rank's experts would be wrong once
they change), plans that differ between ranks, a new plan naming an expert that no slot holds now.

Collectives: one ``all_gather`` of the plans (every call), then one ``all_to_all_single`` when any row travels (an
identity plan, or one where every expert stays on its rank, moves nothing over the network). The plans are read on
the host (one sync: a rearrangement is rare, between steps, not inside a captured graph).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit._checks import check_ndim, check_signed_int_dtype, check_tensor
from moekit.distributed.placement import check_group
from moekit.routed_experts import RoutedExperts

__all__ = ["check_rearrangeable", "rearrange_expert_weights"]

# Buffers of a RoutedExperts that are not per-expert state: the map from global slots to local experts.
_NOT_PER_EXPERT = ("expert_map",)


def check_rearrangeable(experts: RoutedExperts) -> list[tuple[str, torch.Tensor]]:
    """The per-expert tensors ``rearrange_expert_weights`` would move (name, tensor), or an error saying why the
    layer cannot be rearranged: call it when a layer is built with EPLB on, to refuse it there rather than at the
    first rebalancing. Raises TypeError for a quant method that does not opt in (``supports_eplb``) and
    ValueError for a tensor that is not ``[local_E, ...]``."""
    if not isinstance(experts, RoutedExperts):
        raise TypeError(f"experts: expected a moekit.RoutedExperts, got {type(experts).__name__}")
    method = experts.quant_method
    if not getattr(method, "supports_eplb", False):
        raise TypeError(f"experts: quant method {method.name!r} ({type(method).__name__}) does not support EPLB "
                        f"weight rearrangement (supports_eplb is not True): its per-expert state is not all "
                        f"[local_E, ...] tensors of the layer")
    num_local = experts.num_experts
    tensors = []
    named = [*experts.named_parameters(recurse=False), *experts.named_buffers(recurse=False)]
    for name, t in named:
        if name in _NOT_PER_EXPERT or t is None:
            continue
        if t.dim() == 0 or t.shape[0] != num_local:
            raise ValueError(f"experts.{name}: expected a per-expert tensor [local_E={num_local}, ...] to move "
                             f"with its expert, got shape {tuple(t.shape)} (quant method {method.name!r}); a "
                             f"per-layer tensor computed from this rank's experts would be wrong after they move")
        tensors.append((name, t))
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        raise ValueError(f"experts: expected every per-expert tensor on one device, got {sorted(map(str, devices))}")
    return tensors


def check_phy2log(name: str, plan: object, num_slots: int | None) -> torch.Tensor:
    """``plan`` as a CPU int64 [R] phy2log (``num_slots`` = R when given), or an error naming ``name``."""
    check_tensor(name, plan)
    check_ndim(name, plan, 1, "[R] (one layer's phy2log)")
    check_signed_int_dtype(name, plan)
    if num_slots is not None and plan.shape[0] != num_slots:
        raise ValueError(f"{name}: expected shape ({num_slots},) (the shape of old_phy2log), got "
                         f"{tuple(plan.shape)}")
    return plan.detach().to("cpu", torch.int64)


def check_phy2log_covers(name: str, plan: torch.Tensor, num_logical: int) -> None:
    """Ids in [0, E) and every logical expert in at least one slot."""
    if plan.numel() and (int(plan.min()) < 0 or int(plan.max()) >= num_logical):
        raise ValueError(f"{name}: expected logical ids in [0, E={num_logical}), got values in "
                         f"[{int(plan.min())}, {int(plan.max())}]")
    missing = sorted(set(range(num_logical)) - set(plan.tolist()))
    if missing:
        raise ValueError(f"{name}: expected every logical expert in a slot, experts {missing[:8]} have none")


def _check_local(experts: RoutedExperts, old: torch.Tensor, new: torch.Tensor, ep_rank: int, ep_size: int,
                 process_group: dist.ProcessGroup | None) -> list[tuple[str, torch.Tensor]]:
    """Everything checkable on this rank alone; returns the tensors to move."""
    tensors = check_rearrangeable(experts)
    for name, value in (("ep_size", ep_size), ("ep_rank", ep_rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if ep_size < 1:
        raise ValueError(f"ep_size: expected >= 1, got {ep_size}")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank: expected in [0, ep_size={ep_size}), got {ep_rank}")
    if ep_size > 1 or (dist.is_available() and dist.is_initialized()):
        check_group(ep_size, ep_rank, process_group, building="rearranging over ep_size > 1 ranks")
    num_slots = old.shape[0]
    if num_slots % ep_size or num_slots // ep_size != experts.num_experts:
        raise ValueError(f"old_phy2log: expected ep_size * local experts = {ep_size} * {experts.num_experts} = "
                         f"{ep_size * experts.num_experts} slots (rank-major), got {num_slots}")
    for name, plan in (("old_phy2log", old), ("new_phy2log", new)):
        if num_slots and int(plan.min()) < 0:
            raise ValueError(f"{name}: expected logical expert ids >= 0, got {int(plan.min())}")
    missing = sorted(set(new.tolist()) - set(old.tolist()))
    if missing:
        raise ValueError(f"new_phy2log: logical experts {missing[:8]} are in no slot of old_phy2log, so no rank "
                         f"holds their weights")
    return tensors


def _agree(error: Exception | None, old: torch.Tensor, new: torch.Tensor, ep_size: int, ep_rank: int,
           process_group: dist.ProcessGroup | None) -> None:
    """One all_gather of a fixed-size row (failed?, R, hashes of both plans) so that every rank raises, before
    anything moves, when any rank refused or the ranks were given different plans (a rank that failed before
    reading its plans still joins, with R = -1)."""
    if ep_size == 1:
        if error is not None:
            raise error
        return
    # hash() of a tuple of ints is the same in every process (only str/bytes hashing is randomized).
    row = torch.tensor([int(error is not None), old.shape[0] if error is None else -1,
                        hash(tuple(old.tolist())), hash(tuple(new.tolist()))], dtype=torch.int64)
    device = torch.device("cpu")
    backend = str(dist.get_backend(process_group))  # "nccl", "cuda:nccl", "cpu:gloo,cuda:nccl", "gloo", ...
    if "nccl" in backend and "cpu:" not in backend:  # NCCL alone: CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    gathered = [torch.empty_like(row, device=device) for _ in range(ep_size)]
    dist.all_gather(gathered, row.to(device), group=process_group)
    rows = torch.stack(gathered).cpu()
    if error is not None:
        raise error
    failed = rows[:, 0].nonzero().flatten().tolist()
    if failed:
        raise RuntimeError(f"rearrange_expert_weights: ranks {failed} refused the rearrangement (see their "
                           f"errors); nothing was moved")
    differ = [r for r in range(ep_size) if not torch.equal(rows[r], rows[ep_rank])]
    if differ:
        raise ValueError(f"old_phy2log/new_phy2log: expected the same plans on every rank, ranks {differ} differ "
                         f"from rank {ep_rank}; nothing was moved")


def _transfers(old: list[int], new: list[int], ep_size: int) -> tuple[dict, dict]:
    """The whole exchange, the same on every rank: ``sends[(src, dst)]`` = [(logical expert, src local slot)]
    in ascending expert order, and ``local[dst]`` = [(dst local slot, source: ('slot', q) | ('recv', e))]
    for every slot of ``dst`` that changes."""
    per_rank = len(old) // ep_size
    held = [{} for _ in range(ep_size)]  # rank -> {logical expert: its first local slot in the old plan}
    for slot, e in enumerate(old):
        held[slot // per_rank].setdefault(e, slot % per_rank)
    holders: dict[int, list[int]] = {}
    for rank in range(ep_size):
        for e in held[rank]:
            holders.setdefault(e, []).append(rank)
    sends: dict[tuple[int, int], list[tuple[int, int]]] = {}
    local: dict[int, list[tuple[int, tuple[str, int]]]] = {}
    for dst in range(ep_size):
        needed: set[int] = set()
        for q in range(per_rank):
            slot = dst * per_rank + q
            e = new[slot]
            if old[slot] == e:
                continue  # already there
            if e in held[dst]:
                local.setdefault(dst, []).append((q, ("slot", held[dst][e])))
            else:
                local.setdefault(dst, []).append((q, ("recv", e)))
                needed.add(e)
        for e in sorted(needed):
            src = holders[e][dst % len(holders[e])]
            sends.setdefault((src, dst), []).append((e, held[src][e]))
    return sends, local


def _byte_rows(t: torch.Tensor, num_local: int) -> torch.Tensor:
    """``t`` [local_E, ...] as uint8 [local_E, bytes per expert] (a view when contiguous, else a copy)."""
    return t.detach().reshape(num_local, -1).contiguous().view(torch.uint8).reshape(num_local, -1)


@torch.no_grad()
def rearrange_expert_weights(experts: RoutedExperts, old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, *,
                             ep_rank: int, ep_size: int, process_group: dist.ProcessGroup | None = None,
                             num_logical: int | None = None) -> None:
    """Move ``experts``' weights from the plan ``old_phy2log`` to ``new_phy2log`` in place (module docstring).

    Call it on every rank of the group at once, with the same plans (checked: every rank raises if they differ).

    Args:
        experts: this rank's ``RoutedExperts``; its local experts are the physical slots
            ``[ep_rank * R / ep_size, (ep_rank + 1) * R / ep_size)`` (``experts.num_experts == R / ep_size``).
        old_phy2log: int [R], the logical expert each physical slot holds now (one layer of ``rebalance_experts``'
            phy2log); R must be the same on every rank (the caller's contract: a rank given another R would wait
            in a collective of another size).
        new_phy2log: int [R], the plan to apply; every logical expert in it must be somewhere in old_phy2log.
        ep_rank, ep_size: this rank's place in ``process_group`` (checked against it).
        process_group: the expert-parallel group (None: the default group). With ``ep_size == 1`` no group is
            needed (moves inside the rank only).
        num_logical: E, to also check that ``new_phy2log`` holds ids in [0, E) and every one of them (``MoE``
            passes it: a plan refused on one rank alone would leave the others waiting in the collective).

    Returns None: the parameters and buffers keep their storage and now hold the new plan's experts. Raises
    before anything moves (on every rank) on a refused layer or bad inputs; see ``check_rearrangeable``.
    """
    error, tensors = None, []
    old_cpu = new_cpu = torch.zeros(0, dtype=torch.int64)
    try:
        old_cpu = check_phy2log("old_phy2log", old_phy2log, None)
        new_cpu = check_phy2log("new_phy2log", new_phy2log, old_cpu.shape[0])
        if num_logical is not None:
            check_phy2log_covers("new_phy2log", new_cpu, num_logical)
        tensors = _check_local(experts, old_cpu, new_cpu, ep_rank, ep_size, process_group)
    except Exception as err:  # noqa: BLE001 (re-raised by _agree after the other ranks heard of it)
        error = err
        if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1 or not (
                dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) != ep_size:
            raise  # no collective this rank could join consistently
    _agree(error, old_cpu, new_cpu, ep_size, ep_rank, process_group)

    num_local = experts.num_experts
    sends, local = _transfers(old_cpu.tolist(), new_cpu.tolist(), ep_size)
    changes = local.get(ep_rank, [])
    travels = any(sends.values())  # the same on every rank: all join the all_to_all or none does
    if not changes and not travels:
        return
    device = tensors[0][1].device
    widths = [t[0].numel() * t.element_size() for _, t in tensors]
    packed = torch.cat([_byte_rows(t, num_local) for _, t in tensors], dim=1)  # [local_E, bytes per expert]

    recv_rows = packed[:0]
    recv_index: dict[int, int] = {}  # logical expert -> its row in recv_rows
    if travels:
        out_lists = [sends.get((ep_rank, d), []) for d in range(ep_size)]
        in_lists = [sends.get((s, ep_rank), []) for s in range(ep_size)]
        send_slots = torch.tensor([q for lst in out_lists for _, q in lst], dtype=torch.int64, device=device)
        send_rows = packed.index_select(0, send_slots)
        recv_rows = torch.empty(sum(map(len, in_lists)), packed.shape[1], dtype=torch.uint8, device=device)
        dist.all_to_all_single(recv_rows, send_rows, [len(lst) for lst in in_lists],
                               [len(lst) for lst in out_lists], group=process_group)
        for e, _ in (item for lst in in_lists for item in lst):
            recv_index[e] = len(recv_index)
    if not changes:
        return

    dst = torch.tensor([q for q, _ in changes], dtype=torch.int64, device=device)
    new_rows = torch.empty(len(changes), packed.shape[1], dtype=torch.uint8, device=device)
    from_slot = [(i, src) for i, (_, (kind, src)) in enumerate(changes) if kind == "slot"]
    from_recv = [(i, recv_index[e]) for i, (_, (kind, e)) in enumerate(changes) if kind == "recv"]
    for pairs, source in ((from_slot, packed), (from_recv, recv_rows)):
        if pairs:
            rows = torch.tensor([i for i, _ in pairs], dtype=torch.int64, device=device)
            srcs = torch.tensor([s for _, s in pairs], dtype=torch.int64, device=device)
            new_rows[rows] = source.index_select(0, srcs)
    offset = 0
    for (_, t), width in zip(tensors, widths):
        block = new_rows[:, offset:offset + width].contiguous()
        if t.element_size() == 1:
            # One-byte dtypes are written through a uint8 view of the same storage: index_copy_ has no CPU
            # kernel for float8 (and bytes are what moved anyway).
            target, values = t.detach().view(torch.uint8), block
        else:
            target, values = t.detach(), block.view(t.dtype)
        target.index_copy_(0, dst, values.reshape(len(changes), *t.shape[1:]))
        offset += width
