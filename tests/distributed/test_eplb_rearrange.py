"""EPLB weight rearrangement on gloo (127.0.0.1), world 2 and 4, plus its single-process checks.

Spawned once per world size; every case runs inside the workers and reports {case: error or None} through a JSON
file per rank (as tests/distributed/test_ep_layer.py). Each worker builds the full logical weights from one seed,
so the reference of every slot, before and after, is ``full[phy2log[slot]]``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import moekit
from moekit.distributed import (
    check_rearrangeable,
    determine_expert_map,
    logical_to_physical,
    make_prepare_finalize,
    rearrange_expert_weights,
    rebalance_experts,
)
from moekit.quant import Fp8TensorMoEMethod, UnquantizedMoEMethod
from moekit.routed_experts import RoutedExperts
from moekit.testing import assert_close
from tests.distributed.ranks import failures, init_rank, run_cases, spawn

WORLDS = (2, 4)
E, H, I = 6, 16, 8  # logical experts; R = 8 physical slots (2 redundant) at both world sizes
R = 8
NAMES = ("w13", "w2", "w13_bias", "w2_bias")


def _maps(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log2phy [E, M] -1 padded, logcnt [E]) of one layer's phy2log (for hand-made plans)."""
    slots = [[p for p, e in enumerate(phy2log.tolist()) if e == x] for x in range(num_experts)]
    width = max(map(len, slots))
    log2phy = torch.tensor([s + [-1] * (width - len(s)) for s in slots])
    return log2phy, torch.tensor([len(s) for s in slots])


def _plans(world: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(old, new) phy2log pairs, the same on every rank."""
    g = torch.Generator().manual_seed(3)
    plans = {}
    for i in range(3):  # skewed random loads: redundant replicas, often two of one expert on one rank
        old = rebalance_experts(torch.rand(1, E, generator=g) ** 4 * 100, R, 1, 1, world)[0][0]
        new = rebalance_experts(torch.rand(1, E, generator=g) ** 4 * 100, R, 1, 1, world)[0][0]
        plans[f"random{i}"] = (old, new)
    base = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    plans["identity"] = (base, base.clone())
    per_rank = R // world
    plans["swap_all"] = (base, base.roll(per_rank))  # every slot's expert comes from the previous rank
    # Duplicates on one rank: rank 0 holds expert 0 twice before, expert 5 twice after (and a local move).
    plans["duplicates"] = (torch.tensor([0, 0, 1, 2, 3, 4, 5, 1]), torch.tensor([5, 5, 0, 1, 2, 3, 4, 0]))
    return plans


def _full(seed: int = 0) -> RoutedExperts:
    torch.manual_seed(seed)
    return RoutedExperts(E, H, I, bias=True)


def _local(full: RoutedExperts, phy2log: torch.Tensor, rank: int, world: int, device: str = "cpu",
           **kwargs) -> RoutedExperts:
    """This rank's layer over the physical slots of ``phy2log``, holding full[phy2log[slot]], on ``device``."""
    layer = RoutedExperts(R // world, full.hidden_size, full.intermediate_size, bias=full.has_bias, **kwargs)
    mine = phy2log[rank * R // world:(rank + 1) * R // world]
    with torch.no_grad():
        for name, t in full.named_parameters():
            getattr(layer, name).copy_(t[mine])
    return layer.to(device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _assert_holds(layer: RoutedExperts, full: RoutedExperts, phy2log: torch.Tensor, rank: int, world: int,
                  label: str) -> None:
    mine = phy2log[rank * R // world:(rank + 1) * R // world].cpu()  # the plan may live on the layer's GPU
    for name, t in full.named_parameters():
        got, want = _bits(getattr(layer, name)), _bits(t[mine])
        assert torch.equal(got, want), f"{label}: {name} differs from the logical experts {mine.tolist()}"


def _moves_exactly(rank: int, world: int, device: str) -> None:
    full = _full()
    errors = []  # every plan runs on every rank even after a mismatch, so the ranks' collectives stay paired
    for label, (old, new) in _plans(world).items():
        layer = _local(full, old, rank, world, device)
        old, new = old.to(device), new.to(device)  # plans may live on the layer's device
        storage = {n: getattr(layer, n).data_ptr() for n in NAMES}
        rearrange_expert_weights(layer, old, new, ep_rank=rank, ep_size=world)
        try:
            _assert_holds(layer, full, new, rank, world, label)
            assert storage == {n: getattr(layer, n).data_ptr() for n in NAMES}, f"{label}: storage replaced"
        except AssertionError as err:
            errors.append(str(err))
        rearrange_expert_weights(layer, new, old, ep_rank=rank, ep_size=world)  # and back
        try:
            _assert_holds(layer, full, old, rank, world, f"{label} back")
        except AssertionError as err:
            errors.append(str(err))
    assert not errors, "\n".join(errors)


def _fp8_block(rank: int, world: int, device: str) -> None:
    torch.manual_seed(1)
    full = moekit.quantize(RoutedExperts(E, 128, 192, bias=True), "fp8_block")  # 2 x 2 blocks per w2
    old, new = _plans(world)["random0"]
    mine = old[rank * R // world:(rank + 1) * R // world]
    layer = RoutedExperts(R // world, 128, 192, bias=True)
    moekit.quantize(layer, "fp8_block")
    with torch.no_grad():
        for name, t in full.named_parameters():
            getattr(layer, name).copy_(t[mine])
    assert layer.w13.dtype == torch.float8_e4m3fn and layer.w13_scale.dim() == 3
    layer = layer.to(device)
    rearrange_expert_weights(layer, old, new, ep_rank=rank, ep_size=world)
    _assert_holds(layer, full, new, rank, world, "fp8_block")


def _pinned(phy2log: torch.Tensor, replica: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log2phy [E, 1], logcnt = 1): every token of an expert goes to its first (or last) replica.

    The replica choice is pinned because GEMMs are not batch-invariant (here, fewer than 4 rows take another CPU
    path with other roundings): with the hash spreading tokens over replicas, two plans give an expert's replicas
    different row counts and the output would differ by an ulp for that reason alone. Pinned, each expert computes
    the same rows before and after, wherever it lives, so any difference is the rearrangement's."""
    log2phy, logcnt = _maps(phy2log, E)
    column = torch.zeros_like(logcnt) if replica == "first" else logcnt - 1
    return log2phy.gather(1, column[:, None]), torch.ones_like(logcnt)


def _output_unchanged(rank: int, world: int, dispatch: str, device: str) -> None:
    """The layer's output, fp32, is bit-identical before and after (on the CPU; within the fp32 tolerance on GPUs):
    the same logical ids go through the old plan before and the new plan after, and the slots they reach hold the
    same weights."""
    full = _full(2)
    _, expert_map = determine_expert_map(world, rank, R)  # linear over physical slots = rank-major
    g = torch.Generator().manual_seed(10 + rank)
    tokens = (5, 0, 3, 7)[rank % 4]
    x = torch.randn(tokens, H, generator=g)
    ids = torch.rand(tokens, E, generator=g).argsort(dim=1)[:, :2]  # two distinct logical experts per token
    weights = torch.rand(tokens, 2, generator=g)
    x, ids, weights = x.to(device), ids.to(device), weights.to(device)
    errors = []
    for (label, (old, new)), replica in itertools.product(_plans(world).items(), ("first", "last")):
        pf = make_prepare_finalize(dispatch, num_experts=R, ep_size=world, ep_rank=rank)
        layer = _local(full, old, rank, world, device, expert_map=expert_map, prepare_finalize=pf)
        with torch.no_grad():
            before = layer(x, weights, logical_to_physical(ids, *(t.to(device) for t in _pinned(old, replica))))
            rearrange_expert_weights(layer, old, new, ep_rank=rank, ep_size=world)
            after = layer(x, weights, logical_to_physical(ids, *(t.to(device) for t in _pinned(new, replica))))
        if device == "cpu" and not torch.equal(before, after):
            errors.append(f"{label}, {replica} replica ({dispatch}): max diff {(before - after).abs().max()}")
        elif device != "cpu":  # GPU kernels may sum in another order from call to call (atomics): the fp32 row
            try:
                assert_close(after, before, torch.float32, name=f"{label}, {replica} replica ({dispatch})")
            except AssertionError as err:
                errors.append(str(err))
    assert not errors, "\n".join(errors)


class _NoEplb(UnquantizedMoEMethod):
    name = "no_eplb_method"
    supports_eplb = False


def _refusals(rank: int, world: int, device: str) -> None:
    """Every refusal raises on every rank before any rank moved anything."""
    full = _full()
    old, new = _plans(world)["swap_all"]

    def refused(layer: RoutedExperts, error: type, match: str, plans=(old, new)) -> None:
        before = {n: t.detach().clone() for n, t in layer.named_parameters()}
        with pytest.raises(error, match=match):
            rearrange_expert_weights(layer, *plans, ep_rank=rank, ep_size=world)
        for n, t in layer.named_parameters():
            assert torch.equal(_bits(t), _bits(before[n])), f"{match}: {n} moved"

    refused(_local(full, old, rank, world, device, quant_method=_NoEplb()), TypeError, "no_eplb_method")
    odd = _local(full, old, rank, world, device)
    odd.register_buffer("odd_scale", torch.tensor(1.0, device=device))  # per layer (0-d): cannot follow experts
    refused(odd, ValueError, r"odd_scale.*shape \(\)")
    # Only rank 0's layer is refused: rank 0 says why, the others that rank 0 refused.
    one = _local(full, old, rank, world, device)
    if rank == 0:
        one.register_buffer("odd_scale", torch.ones(3, device=device))
        refused(one, ValueError, "odd_scale")
    else:
        refused(one, RuntimeError, r"ranks \[0\] refused")
    # Merged static input scales are one per layer (each rank's maximum over its own experts).
    static = RoutedExperts(R // world, H, I, quant_method=Fp8TensorMoEMethod(static_input_scales=True),
                           device=device)
    for name in ("w13_scale", "w13_input_scale", "w2_input_scale"):  # as loaded
        getattr(static, name).data.fill_(1.0)
    static.process_weights_after_loading()
    refused(static, ValueError, "w13_input_scale")
    # Different plans on different ranks.
    plan = new.roll(1) if rank == world - 1 else new
    refused(_local(full, old, rank, world, device), ValueError, "same plans on every rank", (old, plan))
    missing = torch.tensor([0, 1, 2, 3, 4, 4, 4, 4])  # expert 5 is nowhere in it
    refused(_local(full, missing, rank, world, device), ValueError, r"logical experts \[5\]", (missing, old))


def _cuda_graph(rank: int, world: int, device: str) -> None:
    """NCCL only: a layer captured in a CUDA graph before a rearrangement that moves every expert replays, after it
    (new physical ids copied into the captured input), what the eager layer computes: the graph read the moved
    weights through the parameters' unchanged storage."""
    full = _full(2)
    old, new = _plans(world)["swap_all"]
    _, expert_map = determine_expert_map(world, rank, R)
    pf = make_prepare_finalize("all_to_all", num_experts=R, ep_size=world, ep_rank=rank)
    layer = _local(full, old, rank, world, device, expert_map=expert_map, prepare_finalize=pf)
    g = torch.Generator().manual_seed(20 + rank)
    x = torch.randn(4, H, generator=g).to(device)  # equal counts on every rank: the sync-free dispatch is captured
    ids = torch.rand(4, E, generator=g).argsort(dim=1)[:, :2].to(device)
    weights = torch.rand(4, 2, generator=g).to(device)
    static_ids = logical_to_physical(ids, *(t.to(device) for t in _pinned(old, "first")))
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles, allocator settles) outside the capture
            layer(x, weights, static_ids)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(x, weights, static_ids)
        graph.replay()
        before = static_y.clone()
        rearrange_expert_weights(layer, old, new, ep_rank=rank, ep_size=world)
        static_ids.copy_(logical_to_physical(ids, *(t.to(device) for t in _pinned(new, "first"))))
        graph.replay()
        eager = layer(x, weights, static_ids)
    assert_close(static_y, eager, torch.float32, name="graph replay after the rearrangement")
    assert_close(static_y, before, torch.float32, name="graph replay, before vs after")


def _worker(rank: int, world: int, port: int, out_dir: str, backend: str = "gloo") -> None:
    """One rank: gloo on the CPU, or NCCL on GPU ``rank`` (every case, and the CUDA-graph one)."""
    device = init_rank(rank, world, port, backend, timeout_s=60)
    steps = {"moves_exactly": lambda: _moves_exactly(rank, world, device),
             "fp8_block": lambda: _fp8_block(rank, world, device),
             "output_allgather_reducescatter": lambda: _output_unchanged(rank, world, "allgather_reducescatter",
                                                                         device),
             "output_all_to_all": lambda: _output_unchanged(rank, world, "all_to_all", device),
             "refusals": lambda: _refusals(rank, world, device)}
    if backend == "nccl":
        steps["cuda_graph"] = lambda: _cuda_graph(rank, world, device)
    run_cases(steps.items(), rank, out_dir)


CASES = ("moves_exactly", "fp8_block", "output_allgather_reducescatter", "output_all_to_all", "refusals")


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def results(request, tmp_path_factory):
    world = request.param
    return spawn(_worker, world, tmp_path_factory.mktemp(f"rearrange_world{world}"))


@pytest.mark.parametrize("case", CASES)
def test_rearrange(results, case):
    failed = failures(results, case)
    assert not failed, failed


@pytest.fixture(scope="module")
def nccl_results(tmp_path_factory):
    world = min(torch.cuda.device_count(), 4)
    if world < 2:
        pytest.skip(f"needs 2 GPUs, found {world}")
    return spawn(_worker, world, tmp_path_factory.mktemp("rearrange_nccl"), "nccl")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [*CASES, "cuda_graph"])
def test_rearrange_nccl(nccl_results, case):
    failed = failures(nccl_results, case)
    assert not failed, failed


# Single process (ep_size = 1): moves inside the rank, and the argument checks.

def test_single_rank_moves_and_duplicates():
    """Moves inside one rank, and buffers move too: an int32 zero point and a bool mask, per expert."""
    full = _full()
    old, new = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]), torch.tensor([5, 5, 0, 1, 1, 1, 4, 2])
    layer = _local(full, old, 0, 1)
    zero_point = torch.arange(E * 3, dtype=torch.int32).view(E, 3)
    mask = torch.rand(E, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    layer.register_buffer("w13_zero_point", zero_point[old].clone())
    layer.register_buffer("w2_mask", mask[old].t().contiguous().t())  # non-contiguous: written in place too
    buffers = {n: b for n, b in layer.named_buffers() if b is not None}
    rearrange_expert_weights(layer, old.int(), new.int(), ep_rank=0, ep_size=1)
    _assert_holds(layer, full, new, 0, 1, "single rank")
    assert torch.equal(layer.w13_zero_point, zero_point[new]) and torch.equal(layer.w2_mask, mask[new])
    assert all(getattr(layer, n) is b for n, b in buffers.items())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(old=torch.zeros(8)), TypeError, "old_phy2log"),
    (dict(new=torch.zeros(7, dtype=torch.int64)), ValueError, r"new_phy2log: expected shape \(8,\)"),
    (dict(old=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "old_phy2log"),
    (dict(old=torch.arange(6), new=torch.arange(6)), ValueError, "old_phy2log: expected ep_size"),
    (dict(new=torch.tensor([0, 1, 2, 3, 4, 5, 0, -1])), ValueError, "new_phy2log: expected logical expert ids"),
    (dict(ep_rank=1), ValueError, "ep_rank"),
    (dict(ep_size=2), RuntimeError, "not initialized"),
    (dict(experts="w13"), TypeError, "experts: expected a moekit.RoutedExperts"),
])
def test_refused_arguments(kwargs, error, match):
    plan = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    layer = _local(_full(), plan, 0, 1)
    args = dict(experts=layer, old=plan, new=plan.roll(1), ep_rank=0, ep_size=1) | kwargs
    w13 = layer.w13.detach().clone()
    with pytest.raises(error, match=match):
        rearrange_expert_weights(args["experts"], args["old"], args["new"], ep_rank=args["ep_rank"],
                                 ep_size=args["ep_size"])
    assert torch.equal(layer.w13, w13)


def test_check_rearrangeable_lists_every_per_expert_tensor():
    layer = moekit.quantize(RoutedExperts(4, 128, 128, bias=True), "fp8_block")
    assert [n for n, _ in check_rearrangeable(layer)] == ["w13", "w2", "w13_scale", "w2_scale", "w13_bias",
                                                          "w2_bias"]
