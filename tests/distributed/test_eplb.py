"""EPLB planning (rebalance_experts: DeepSeek's published example exactly, invariants on random loads, the global
fallback, refusals) and the logical -> physical replica choice (logical_to_physical)."""

import pytest
import torch

from moekit.distributed import logical_to_physical, rebalance_experts

# DeepSeek's README example (deepseek-ai/EPLB): 2 layers, 12 experts in 4 groups, 16 slots on 2 nodes x 4 GPUs.
EXAMPLE_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
EXAMPLE_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                   [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
EXAMPLE_LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


def rank_loads(weight, phy2log, logcnt, num_ranks):
    """[L, ranks]: each replica carries an even share of its expert's load."""
    share = (weight.double() / logcnt).gather(1, phy2log)
    return share.view(weight.shape[0], num_ranks, -1).sum(-1)


def balancedness(loads_LR):
    return loads_LR.max(dim=1).values / loads_LR.mean(dim=1)


def linear_rank_loads(weight, num_ranks):
    """Per-rank loads without EPLB: experts split contiguously (E divisible by the ranks here)."""
    return weight.double().view(weight.shape[0], num_ranks, -1).sum(-1)


def check_invariants(weight, num_replicas, num_ranks, phy2log, log2phy, logcnt):
    num_layers, num_experts = weight.shape
    assert phy2log.shape == (num_layers, num_replicas) and phy2log.dtype == torch.int64
    assert logcnt.shape == (num_layers, num_experts) and bool((logcnt >= 1).all())
    assert logcnt.sum(1).tolist() == [num_replicas] * num_layers
    # logcnt counts phy2log's slots per expert.
    assert torch.equal(torch.nn.functional.one_hot(phy2log, num_experts).sum(1), logcnt)
    assert log2phy.shape == (num_layers, num_experts, int(logcnt.max()))
    for layer in range(num_layers):
        for e in range(num_experts):
            slots = log2phy[layer, e]
            n = int(logcnt[layer, e])
            assert slots[:n].tolist() == sorted((phy2log[layer] == e).nonzero().flatten().tolist())
            assert bool((slots[n:] == -1).all())


def test_deepseek_published_example():
    weight = torch.tensor(EXAMPLE_WEIGHT)
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas=16, num_groups=4, num_nodes=2, num_ranks=8)
    assert phy2log.tolist() == EXAMPLE_PHY2LOG
    assert logcnt.tolist() == EXAMPLE_LOGCNT
    assert tuple(log2phy.shape) == (2, 12, 2)
    check_invariants(weight, 16, 8, phy2log, log2phy, logcnt)
    assert [round(b, 3) for b in balancedness(rank_loads(weight, phy2log, logcnt, 8)).tolist()] == [1.208, 1.242]


def test_example_as_float_leaves_weight_alone():
    weight = torch.tensor(EXAMPLE_WEIGHT, dtype=torch.float32)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == EXAMPLE_PHY2LOG and phy2log.device == weight.device
    assert weight.tolist() == [[float(v) for v in r] for r in EXAMPLE_WEIGHT]


def test_equal_weights_one_replica_each():
    # R = E: nothing to replicate, whatever the loads; equal loads give every rank the same load.
    weight = torch.full((3, 16), 10)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    assert bool((logcnt == 1).all()) and log2phy.shape == (3, 16, 1)
    assert sorted(phy2log[0].tolist()) == list(range(16))
    assert balancedness(rank_loads(weight, phy2log, logcnt, 8)).tolist() == [1.0] * 3


def test_hot_expert_is_replicated():
    weight = torch.tensor([[1000] + [1] * 7])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 12, 1, 1, 4)
    # Four redundant slots all go to expert 0 (1000 / 5 is still far above 1).
    assert logcnt[0].tolist() == [5] + [1] * 7
    assert sorted(log2phy[0, 0].tolist()) == sorted((phy2log[0] == 0).nonzero().flatten().tolist())


@pytest.mark.parametrize("num_experts,num_replicas,num_groups,num_nodes,num_ranks", [
    (12, 16, 4, 2, 8),    # the example's shape
    (64, 80, 8, 2, 16),   # several replicas per expert possible, 5 slots per rank
    (10, 10, 5, 1, 5),    # no redundant experts: only placement; one node
    (256, 288, 8, 4, 32),  # DeepSeek-V3-like: 8 groups on 4 nodes, 32 redundant
    (6, 12, 3, 3, 6),     # one group per node, two slots per rank
])
def test_invariants_on_random_loads(num_experts, num_replicas, num_groups, num_nodes, num_ranks):
    g = torch.Generator().manual_seed(num_experts)
    weight = torch.randint(0, 1000, (4, num_experts), generator=g)
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_ranks)
    check_invariants(weight, num_replicas, num_ranks, phy2log, log2phy, logcnt)
    # Hierarchical: every physical slot of a node holds experts of groups assigned to that node, and each group
    # lives on exactly one node.
    group_size = num_experts // num_groups
    node_groups = (phy2log // group_size).view(4, num_nodes, -1)
    for layer in range(4):
        owner = {}
        for node in range(num_nodes):
            for group in node_groups[layer, node].tolist():
                assert owner.setdefault(group, node) == node
        assert sorted(owner) == list(range(num_groups))


def test_balancedness_improves_on_skewed_loads():
    g = torch.Generator().manual_seed(1)
    # Zipf-like: load ~ 1 / rank^1.2 over a random expert order per layer.
    zipf = 1e5 / torch.arange(1, 65, dtype=torch.float64) ** 1.2
    weight = torch.stack([zipf[torch.randperm(64, generator=g)] for _ in range(6)])
    before = balancedness(linear_rank_loads(weight, 8))
    for redundant in (0, 8, 16):
        phy2log, _, logcnt = rebalance_experts(weight, 64 + redundant, 1, 1, 8)
        after = balancedness(rank_loads(weight, phy2log, logcnt, 8))
        assert bool((after < before).all()), (redundant, before, after)
    assert float(after.max()) < 1.1  # 16 redundant slots for 64 experts: close to even


def test_global_fallback_when_groups_do_not_divide_nodes():
    weight = torch.tensor(EXAMPLE_WEIGHT)
    # 3 groups on 2 nodes: the grouping is ignored, the plan is the global one (groups = nodes = 1).
    fallback = rebalance_experts(weight, 16, 3, 2, 8)
    global_plan = rebalance_experts(weight, 16, 1, 1, 8)
    for got, expected in zip(fallback, global_plan):
        assert torch.equal(got, expected)
    hierarchical = rebalance_experts(weight, 16, 4, 2, 8)
    assert not torch.equal(fallback[0], hierarchical[0])
    check_invariants(weight, 16, 8, *fallback)
    # The global plan balances at least as well as the hierarchical one, which is bound by node packing.
    g_bal = balancedness(rank_loads(weight, fallback[0], fallback[2], 8))
    h_bal = balancedness(rank_loads(weight, hierarchical[0], hierarchical[2], 8))
    assert bool((g_bal <= h_bal + 1e-12).all())


def test_zero_loads_are_valid():
    phy2log, log2phy, logcnt = rebalance_experts(torch.zeros(1, 8), 16, 2, 2, 4)
    check_invariants(torch.zeros(1, 8), 16, 4, phy2log, log2phy, logcnt)


@pytest.mark.parametrize("args,match", [
    ((torch.ones(2, 12), 12, 4, 2, 8), "num_replicas: expected a multiple of num_ranks"),
    ((torch.ones(2, 12), 8, 1, 1, 4), "num_replicas: expected at least the number of logical experts"),
    ((torch.ones(2, 12), 16, 5, 1, 8), "num_groups: expected a divisor"),
    ((torch.ones(2, 12), 16, 4, 3, 8), "num_nodes: expected a divisor of num_ranks"),
    ((torch.ones(2, 12), 16, 4, 2, 0), "num_ranks: expected a positive int"),
    ((torch.ones(12), 16, 4, 2, 8), "weight: expected a 2-d tensor"),
    ((torch.ones(0, 12), 16, 4, 2, 8), "weight: expected at least one layer"),
    ((torch.tensor([[1.0, -1.0]]), 2, 1, 1, 1), r"weight: expected finite loads >= 0, got -1.0 at \[0, 1\]"),
    ((torch.tensor([[1.0, float("nan")]]), 2, 1, 1, 1), "weight: expected finite loads"),
])
def test_bad_arguments_raise_naming_them(args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(*args)


def test_bad_argument_types():
    with pytest.raises(TypeError, match="num_replicas: expected an int, got float"):
        rebalance_experts(torch.ones(1, 4), 8.0, 1, 1, 4)
    with pytest.raises(TypeError, match="weight: expected a torch.Tensor"):
        rebalance_experts([[1, 2]], 2, 1, 1, 1)
    with pytest.raises(TypeError, match="weight: expected a real dtype"):
        rebalance_experts(torch.ones(1, 2, dtype=torch.bool), 2, 1, 1, 1)


# ---- logical -> physical ----

def example_maps(layer=0):
    phy2log, log2phy, logcnt = rebalance_experts(torch.tensor(EXAMPLE_WEIGHT), 16, 4, 2, 8)
    return phy2log[layer], log2phy[layer], logcnt[layer]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_physical_slots_map_back_to_their_expert(dtype):
    phy2log, log2phy, logcnt = example_maps(1)
    topk_ids = torch.randint(0, 12, (257, 4)).to(dtype)  # odd T
    physical = logical_to_physical(topk_ids, log2phy, logcnt)
    assert physical.shape == topk_ids.shape
    assert physical.dtype == (torch.int64 if dtype == torch.int64 else torch.int32)
    assert bool((physical >= 0).all())
    assert torch.equal(phy2log[physical.long()], topk_ids.long())


def test_replicas_share_tokens_evenly():
    phy2log, log2phy, logcnt = example_maps(0)
    # Every token picks expert 10 (2 replicas) at k = 0 and expert 1 (2 replicas) at k = 1: with K = 2 the
    # entry index of k = 0 is always even, which a low-bit choice (i mod 2) would send to one replica only.
    t = 4000
    topk_ids = torch.tensor([[10, 1]]).repeat(t, 1)
    physical = logical_to_physical(topk_ids, log2phy, logcnt)
    for k, expert in enumerate((10, 1)):
        shares = torch.bincount(physical[:, k].long(), minlength=16)[log2phy[expert]]
        assert shares.sum() == t and shares.min() >= 0.45 * t, (expert, shares)
    # A 3-way and 5-way replicated expert over many random tokens.
    log2phy3 = torch.tensor([[0, 1, 2, -1, -1], [3, 4, 5, 6, 7]])
    logcnt3 = torch.tensor([3, 5])
    ids = torch.randint(0, 2, (3000, 3))
    physical = logical_to_physical(ids, log2phy3, logcnt3)
    counts = torch.bincount(physical.flatten().long(), minlength=8).double()
    per_expert = torch.bincount(ids.flatten(), minlength=2).double()
    expected = torch.cat([per_expert[0].repeat(3) / 3, per_expert[1].repeat(5) / 5])
    assert bool(((counts - expected).abs() <= 0.05 * expected).all()), (counts, expected)


def test_mapping_is_deterministic_and_offset_shifts_it():
    _, log2phy, logcnt = example_maps(0)
    topk_ids = torch.randint(0, 12, (64, 8))
    a = logical_to_physical(topk_ids, log2phy, logcnt)
    assert torch.equal(a, logical_to_physical(topk_ids.clone(), log2phy, logcnt))
    # Entry i with offset o is entry i + o without: rows 1.. of a equal the mapping of rows 1.. shifted by K.
    shifted = logical_to_physical(topk_ids[1:], log2phy, logcnt, offset=8)
    assert torch.equal(shifted, a[1:])


def test_mapping_zero_tokens_and_unreplicated():
    _, log2phy, logcnt = example_maps(0)
    assert logical_to_physical(torch.empty(0, 2, dtype=torch.int32), log2phy, logcnt).shape == (0, 2)
    # One replica each: the mapping is the identity whatever the hash says.
    one_each = torch.ones(8, dtype=torch.int64)
    identity = logical_to_physical(torch.arange(8).view(4, 2), torch.arange(8).view(8, 1), one_each)
    assert identity.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_mapping_bad_arguments():
    _, log2phy, logcnt = example_maps(0)
    ids = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="topk_ids: expected a 2-d tensor"):
        logical_to_physical(ids.flatten(), log2phy, logcnt)
    with pytest.raises(TypeError, match="topk_ids: expected an integer dtype"):
        logical_to_physical(ids.float(), log2phy, logcnt)
    with pytest.raises(ValueError, match=r"logcnt: expected shape \(12,\)"):
        logical_to_physical(ids, log2phy, logcnt[:5])
    with pytest.raises(TypeError, match="log2phy: expected int32 or int64"):
        logical_to_physical(ids, log2phy.float(), logcnt)
    with pytest.raises(ValueError, match="offset: expected an int >= 0"):
        logical_to_physical(ids, log2phy, logcnt, offset=-1)
    with pytest.raises(IndexError):  # an id >= E is not silently mapped
        logical_to_physical(torch.full((1, 1), 12), log2phy, logcnt)
    # A negative id (unchecked padding) indexed from the end, the last expert's replicas: it maps to -1, which the
    # torch backend drops as it drops it unmapped.
    assert logical_to_physical(torch.tensor([[-1, 0]]), log2phy, logcnt)[0, 0] == -1


@pytest.mark.gpu
def test_mapping_on_cuda_matches_cpu():
    _, log2phy, logcnt = example_maps(1)
    topk_ids = torch.randint(0, 12, (1000, 8), dtype=torch.int32)
    expected = logical_to_physical(topk_ids, log2phy, logcnt)
    got = logical_to_physical(topk_ids.cuda(), log2phy.cuda(), logcnt.cuda())
    assert torch.equal(got.cpu(), expected)
    plan = rebalance_experts(torch.tensor(EXAMPLE_WEIGHT, device="cuda"), 16, 4, 2, 8)
    assert plan[0].device.type == "cuda" and plan[0].tolist() == EXAMPLE_PHY2LOG
