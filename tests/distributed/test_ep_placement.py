"""ParallelConfig validation and determine_expert_map against vLLM's split, written out by hand."""

import pytest
import torch

import moekit
from moekit.distributed import determine_expert_map, expert_owners

# vLLM: base = E // ep, rem = E % ep, rank r holds base + (r < rem); linear = contiguous, round_robin = arange(r, E, ep).
# Written as literal ranges, not from a formula, so the test does not share the implementation's arithmetic.
EXPECTED = {
    (4, 10, "linear"): [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]],
    (4, 10, "round_robin"): [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]],
    # 256 = 6·42 + 4: ranks 0-3 hold 43 experts, ranks 4-5 hold 42.
    (6, 256, "linear"): [list(range(0, 43)), list(range(43, 86)), list(range(86, 129)), list(range(129, 172)),
                         list(range(172, 214)), list(range(214, 256))],
    (6, 256, "round_robin"): [list(range(r, 256, 6)) for r in range(6)],
    # More ranks than experts (E < ep): the last ranks hold none (round_robin raised torch's arange error there).
    (6, 3, "linear"): [[0], [1], [2], [], [], []],
    (6, 3, "round_robin"): [[0], [1], [2], [], [], []],
}


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"ep{k[0]}-E{k[1]}-{k[2]}")
def test_determine_expert_map_matches_vllm(key):
    ep, num_experts, placement = key
    owners = expert_owners(ep, num_experts, placement)
    for rank, ids in enumerate(EXPECTED[key]):
        num_local, expert_map = determine_expert_map(ep, rank, num_experts, placement)
        assert num_local == len(ids)
        assert expert_map.dtype == torch.int32 and expert_map.shape == (num_experts,)
        expected = torch.full((num_experts,), -1, dtype=torch.int32)
        expected[ids] = torch.arange(len(ids), dtype=torch.int32)
        assert torch.equal(expert_map, expected)
        assert (owners[ids] == rank).all()


@pytest.mark.parametrize("args, match", [
    ((0, 0, 8), "ep_size"), ((2, 2, 8), "ep_rank"), ((2, 0, 0), "num_experts"), ((2, 0, 8, "random"), "placement"),
])
def test_determine_expert_map_validates(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        determine_expert_map(*args)


def test_parallel_config_defaults_and_rank():
    cfg = moekit.ParallelConfig(ep_size=4, ep_rank=3, dispatch="all_to_all", placement="round_robin")
    assert (cfg.world_size, cfg.rank) == (4, 3)
    assert moekit.ParallelConfig() == moekit.ParallelConfig(ep_size=1, ep_rank=0, tp_size=1, tp_rank=0,
                                                            placement="linear", dispatch="allgather_reducescatter",
                                                            num_redundant_experts=0)
    with pytest.raises(AttributeError):
        cfg.ep_rank = 0  # frozen


@pytest.mark.parametrize("kwargs, err, match", [
    ({"ep_size": 0}, ValueError, "ep_size"),
    ({"ep_size": 2, "ep_rank": 2}, ValueError, "ep_rank"),
    ({"ep_rank": True}, TypeError, "ep_rank"),
    ({"placement": "random"}, ValueError, "placement"),
    ({"dispatch": "deepep"}, ValueError, "dispatch"),
    ({"num_redundant_experts": -1}, ValueError, "num_redundant_experts"),
    ({"tp_size": 2, "tp_rank": 2}, ValueError, "tp_rank"),
    # Redundant experts (EPLB): only over EP ranks, in rank-major (linear) slots, without TP for now.
    ({"num_redundant_experts": 2}, ValueError, "num_redundant_experts"),
    ({"num_redundant_experts": 2, "ep_size": 2, "placement": "round_robin"}, ValueError, "placement"),
    ({"num_redundant_experts": 2, "ep_size": 2, "tp_size": 2}, NotImplementedError, "num_redundant_experts"),
])
def test_parallel_config_validates(kwargs, err, match):
    with pytest.raises(err, match=match):
        moekit.ParallelConfig(**kwargs)


def test_parallel_groups_are_remade_for_a_new_default_group(monkeypatch):
    # EP x TP subgroups are made once per (group, ep, tp) and cached: keyed by None, a process that destroyed its
    # default group and initialized a new one got the dead subgroups back ("Group ... is not registered").
    import torch.distributed as dist

    import moekit.distributed.tensor_parallel as tp_mod

    made = []
    monkeypatch.setattr(tp_mod, "_GROUPS", {})
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    monkeypatch.setattr(dist, "new_group", lambda ranks, **kw: made.append((tuple(ranks), kw)) or object())
    parallel = moekit.ParallelConfig(ep_size=2, ep_rank=1, tp_size=2, tp_rank=1)
    world = object()
    monkeypatch.setattr(tp_mod, "_default_group", lambda: world)
    first = tp_mod.parallel_groups(parallel)
    assert tp_mod.parallel_groups(parallel) == first and len(made) == 4  # cached: no new collective
    # Over the default group every rank makes every subgroup, in the same order (collective over the world).
    assert made == [((0, 2), {}), ((1, 3), {}), ((0, 1), {}), ((2, 3), {})]
    world = object()  # destroy_process_group + init_process_group: a new default group
    second = tp_mod.parallel_groups(parallel)
    assert len(made) == 8 and second[0] is not first[0] and second[1] is not first[1]
    # Over a smaller group (a pipeline stage: ranks 4-7 of 8) the other stage never calls: rank 7 makes only its
    # own groups, EP (5, 7) then TP (6, 7), each synchronized among its members (plain calls made colliding
    # subgroup names across stages and one stage hung).
    made.clear()
    stage = object()
    monkeypatch.setattr(dist, "get_global_rank", lambda group, r: 4 + r)
    tp_mod.parallel_groups(parallel, stage)
    local = {"use_local_synchronization": True}
    assert made == [((5, 7), local), ((6, 7), local)]
