"""Expert-parallel load balancing (EPLB): where each expert's replicas go, and which replica a token uses.

    loads [L, E] (tokens per logical expert, e.g. ExpertLoadRecorder.load())
      └─ rebalance_experts ─▶ phy2log [L, R], log2phy [L, E, M], logcnt [L, E]
    topk_ids [T, K] (logical) ──logical_to_physical(log2phy[l], logcnt[l])──▶ physical ids [T, K]

Physical slots are laid out rank-major: rank r owns slots ``[r * R/ranks, (r + 1) * R/ranks)`` (R = num_replicas),
so an expert map built from ``phy2log`` gives each rank ``R/ranks`` experts, some of them duplicates.

The rebalancing is DeepSeek's published algorithm (deepseek-ai/EPLB), written here from its description:

1. ``hierarchical`` (when ``num_groups % num_nodes == 0``, e.g. prefill with group-limited routing): pack the
   expert groups onto nodes so that each node gets ``num_groups / num_nodes`` groups and node loads are even;
   inside each node, add replicas one at a time to the expert with the highest load per replica until the node has
   ``R / num_nodes`` slots; pack those replicas (each carrying load / replica count) onto the node's ranks,
   ``R / num_ranks`` each. Every group's experts (and their replicas) stay within one node, so group-limited
   routing keeps its inter-node traffic bound.
2. ``global`` (otherwise, e.g. decode at large EP): the same with one group and one node.

"Balanced packing" is greedy: items in descending load order (ties: lower index first), each to the lightest
pack that still has room (ties: lower pack first). Both tie rules and the replication's "first maximum" are fixed,
so every rank computing the plan from the same loads gets the same plan.

Not here: how the loads are measured (``eplb_load.py``) and moving expert weights between ranks
(``eplb_rearrange.py``).
"""

from __future__ import annotations

import torch

from moekit._checks import check_int_dtype, check_ndim, check_positive, check_signed_int_dtype, check_tensor

__all__ = ["logical_to_physical", "rebalance_experts"]

# Knuth's multiplicative hash constant: floor(2^32 / golden ratio), odd, so i -> i * C mod 2^32 is a bijection
# whose high bits spread consecutive i evenly (a Weyl sequence).
_HASH_MULTIPLIER = 2654435769
_HASH_MASK = 0xFFFFFFFF


def _check_rebalance_args(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                          num_ranks: int) -> None:
    check_ndim("weight", weight, 2, "[L, E] (load per layer and logical expert)")
    if weight.dtype.is_complex or weight.dtype == torch.bool:
        raise TypeError(f"weight: expected a real dtype (loads), got {str(weight.dtype).removeprefix('torch.')}")
    num_layers, num_experts = weight.shape
    if num_layers == 0 or num_experts == 0:
        raise ValueError(f"weight: expected at least one layer and one expert, got shape {tuple(weight.shape)}")
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_ranks", num_ranks)):
        check_positive(name, value)
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas: expected at least the number of logical experts ({num_experts}, "
                         f"weight.shape[1]) so every expert has a slot, got {num_replicas}")
    if num_replicas % num_ranks:
        raise ValueError(f"num_replicas: expected a multiple of num_ranks ({num_ranks}) so every rank holds the "
                         f"same number of slots, got {num_replicas}")
    if num_experts % num_groups:
        raise ValueError(f"num_groups: expected a divisor of the number of experts ({num_experts}, "
                         f"weight.shape[1]), got {num_groups}")
    if num_ranks % num_nodes:
        raise ValueError(f"num_nodes: expected a divisor of num_ranks ({num_ranks}; every node has the same "
                         f"number of ranks), got {num_nodes}")
    bad = ~torch.isfinite(weight) | (weight < 0) if weight.is_floating_point() else weight < 0
    if bool(bad.any()):
        layer, expert = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"weight: expected finite loads >= 0, got {weight[layer, expert].item()} at "
                         f"[{layer}, {expert}]")


def _balanced_packing(load_LN: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign N items to ``num_packs`` packs of N / num_packs items each, per layer, evening the packs' loads.

    Returns (pack_LN, position_LN): each item's pack and its position inside the pack (the order it was placed).
    """
    num_layers, num_items = load_LN.shape
    per_pack = num_items // num_packs
    rows = torch.arange(num_layers)
    if per_pack == 1:  # one item per pack: item i alone in pack i (as DeepSeek's reference; any order is as even)
        return torch.arange(num_items).expand(num_layers, -1).clone(), torch.zeros(num_layers, num_items,
                                                                                   dtype=torch.int64)
    order_LN = load_LN.sort(dim=-1, descending=True, stable=True).indices
    pack_load = torch.zeros(num_layers, num_packs, dtype=load_LN.dtype)
    pack_size = torch.zeros(num_layers, num_packs, dtype=torch.int64)
    pack_LN = torch.empty(num_layers, num_items, dtype=torch.int64)
    position_LN = torch.empty(num_layers, num_items, dtype=torch.int64)
    # One step per item, every layer at once: a full pack is made the heaviest so argmin (first minimum) skips it.
    for step in range(num_items):
        item = order_LN[:, step]
        pack = pack_load.masked_fill(pack_size >= per_pack, float("inf")).argmin(dim=-1)
        pack_LN[rows, item] = pack
        position_LN[rows, item] = pack_size[rows, pack]
        pack_load[rows, pack] += load_LN[rows, item]
        pack_size[rows, pack] += 1
    return pack_LN, position_LN


def _replicate(load_LN: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ``num_slots`` slots to N items: slot i < N is item i; each further slot goes to the item with the
    highest load per replica (first maximum on ties). Returns (slot2item [L, num_slots], count [L, N])."""
    num_layers, num_items = load_LN.shape
    rows = torch.arange(num_layers)
    slot2item = torch.empty(num_layers, num_slots, dtype=torch.int64)
    slot2item[:, :num_items] = torch.arange(num_items)
    count = torch.ones(num_layers, num_items, dtype=torch.int64)
    for slot in range(num_items, num_slots):
        item = (load_LN / count).argmax(dim=-1)
        slot2item[:, slot] = item
        count[rows, item] += 1
    return slot2item, count


def _inverse(perm_LN: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation per row: inverse[l, perm[l, i]] = i."""
    inverse = torch.empty_like(perm_LN)
    inverse.scatter_(1, perm_LN, torch.arange(perm_LN.shape[1]).expand_as(perm_LN))
    return inverse


def _rebalance_hierarchical(load_LE: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                            num_ranks: int) -> torch.Tensor:
    """phy2log [L, R] (see the module docstring; ``num_groups = num_nodes = 1`` is the global policy)."""
    num_layers, num_experts = load_LE.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_replicas // num_nodes
    slots_per_rank = num_replicas // num_ranks

    # 1. groups -> nodes. A node-major order of the logical experts ("node order"): node n holds positions
    # [n * experts_per_node, (n + 1) * experts_per_node), its groups in packing order, each group's experts in
    # their logical order.
    group_load_LG = load_LE.view(num_layers, num_groups, group_size).sum(-1)
    node_LG, position_LG = _balanced_packing(group_load_LG, num_nodes)
    group_start_LG = (node_LG * groups_per_node + position_LG) * group_size
    log2node_order = (group_start_LG.unsqueeze(-1) + torch.arange(group_size)).view(num_layers, num_experts)
    node_order2log = _inverse(log2node_order)

    # 2. replicas inside each node: one row per (layer, node).
    node_load = load_LE.gather(1, node_order2log).view(num_layers * num_nodes, experts_per_node)
    slot2local, count = _replicate(node_load, slots_per_node)

    # 3. a node's replicas -> its ranks, each replica carrying an even share of its expert's load.
    replica_load = (node_load / count).gather(1, slot2local)
    rank_in_node, position = _balanced_packing(replica_load, num_ranks // num_nodes)
    slot2placed = rank_in_node * slots_per_rank + position  # where each replica lands inside its node
    local_by_placed = slot2local.gather(1, _inverse(slot2placed))

    # Back to logical ids: a node-local expert index -> node order -> logical expert.
    node_offset = torch.arange(num_nodes).repeat(num_layers).unsqueeze(-1) * experts_per_node
    node_order_ids = (local_by_placed + node_offset).view(num_layers, num_replicas)
    return node_order2log.gather(1, node_order_ids)


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan the physical expert slots of every layer from measured loads (DeepSeek's EPLB; module docstring).

    Args:
        weight: [L, E] load of each logical expert per layer (token counts or any non-negative real measure).
        num_replicas: R, physical expert slots over all ranks (E + redundant experts); a multiple of num_ranks.
        num_groups: expert groups of group-limited routing (1 without); divides E.
        num_nodes: nodes of the cluster; divides num_ranks. The plan is hierarchical (groups kept within a node)
            when it divides num_groups, else global.
        num_ranks: expert-parallel ranks (GPUs) over all nodes.

    Returns:
        phy2log: int64 [L, R], the logical expert held by each physical slot; rank r owns slots
            ``[r * R / num_ranks, (r + 1) * R / num_ranks)``.
        log2phy: int64 [L, E, M], the physical slots of each logical expert in ascending order, -1 padded
            (M = the largest replica count over all layers).
        logcnt: int64 [L, E], replicas per logical expert (>= 1; each row sums to R).

    Computed on the CPU in float64 (a plan is made once per rebalancing, not per step); the results are on
    ``weight``'s device. Raises ValueError (naming the argument) on a violated constraint.
    """
    check_tensor("weight", weight)
    _check_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_ranks)
    num_layers, num_experts = weight.shape
    load_LE = weight.detach().to("cpu", torch.float64)
    if num_groups % num_nodes == 0:
        phy2log = _rebalance_hierarchical(load_LE, num_replicas, num_groups, num_nodes, num_ranks)
    else:
        phy2log = _rebalance_hierarchical(load_LE, num_replicas, 1, 1, num_ranks)

    logcnt = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    # Group each expert's slots together, in ascending slot order (a stable sort by logical id), and number them
    # 0, 1, ... inside their group: that number is the replica's column in log2phy.
    slots_by_expert = phy2log.sort(dim=-1, stable=True).indices
    experts_sorted = phy2log.gather(1, slots_by_expert)
    first_slot = torch.cumsum(logcnt, dim=-1) - logcnt  # where each expert's run starts in the sorted order
    replica = torch.arange(num_replicas) - first_slot.gather(1, experts_sorted)
    max_replicas = int(logcnt.max())
    log2phy = torch.full((num_layers, num_experts * max_replicas), -1, dtype=torch.int64)
    log2phy.scatter_(1, experts_sorted * max_replicas + replica, slots_by_expert)
    device = weight.device
    return phy2log.to(device), log2phy.view(num_layers, num_experts, max_replicas).to(device), logcnt.to(device)


def logical_to_physical(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, *,
                        offset: int = 0) -> torch.Tensor:
    """Map one layer's routed logical expert ids to physical slots, choosing a replica per (token, k).

    For routed entry i = offset + t * K + k (row-major over ``topk_ids``)::

        h = (i * 2654435769) mod 2^32                      # Knuth's multiplicative hash: a fixed bijection
        replica = (h * logcnt[e]) >> 32                    # the high bits of h scaled to [0, logcnt[e])
        out[t, k] = log2phy[e, replica]                    # e = topk_ids[t, k]

    The choice is a pure function of (i, e, the maps): no RNG, no state, so every rank and every replay of a
    CUDA graph agree. It takes the hash's *high* bits: vLLM's ``h % count`` keeps the low bits, and h mod 2 =
    i mod 2, so with K = 2 an expert routed at k = 0 would always get replica 0 of two. Consecutive entries of
    one expert fill its replicas evenly. ``offset`` shifts i, e.g. by a rank's first global token times K, so
    that ranks with a handful of tokens each (decode) do not all start at replica 0.

    Pure torch, no host sync (nothing is checked on the values: an id >= E fails as an indexing error; a negative
    id, padding a caller left unchecked, maps to -1, which the torch backend drops as it drops it unmapped).

    Args:
        topk_ids: [T, K] logical expert ids, any integer dtype.
        log2phy: int32/int64 [E, M], one layer of ``rebalance_experts``' log2phy, on topk_ids' device.
        logcnt: int32/int64 [E], that layer's replica counts (>= 1), on topk_ids' device.
        offset: added to every entry index i (an int >= 0).

    Returns:
        [T, K] physical slot ids, int64 if topk_ids is int64 else int32.
    """
    check_ndim("topk_ids", topk_ids, 2, "[T, K]")
    check_int_dtype("topk_ids", topk_ids)
    check_ndim("log2phy", log2phy, 2, "[E, M] (one layer)")
    check_signed_int_dtype("log2phy", log2phy)
    check_ndim("logcnt", logcnt, 1, "[E] (one layer)")
    check_signed_int_dtype("logcnt", logcnt)
    if logcnt.shape[0] != log2phy.shape[0]:
        raise ValueError(f"logcnt: expected shape ({log2phy.shape[0]},) (the experts of log2phy), "
                         f"got {tuple(logcnt.shape)}")
    for name, t in (("log2phy", log2phy), ("logcnt", logcnt)):
        if t.device != topk_ids.device:
            raise ValueError(f"{name}: expected device {topk_ids.device} (the device of topk_ids), got {t.device}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset: expected an int >= 0, got {offset!r}")

    # A negative id would index from the end (the last expert's replicas): looked up as expert 0, returned as -1.
    ids = topk_ids.long()
    padding = ids < 0
    ids = ids.clamp(min=0)
    index = torch.arange(ids.numel(), device=ids.device, dtype=torch.int64).view(ids.shape) + offset
    h = (index * _HASH_MULTIPLIER) & _HASH_MASK
    # h < 2^32 and a count < 2^31 keep the product inside int64.
    replica = (h * logcnt[ids].long()) >> 32
    physical = torch.where(padding, -1, log2phy[ids, replica])
    return physical.to(torch.int64 if topk_ids.dtype == torch.int64 else torch.int32)
