"""EPLB inside the expert-parallel layer (``ParallelConfig(num_redundant_experts=r)``), run in the ranks that
test_ep_layer.py spawns (one spawn per world size for both): the output with redundant experts equals the
single-process layer before and after a rearrangement to a ``rebalance_experts`` plan, a checkpoint fills every
replica, and a quant method that cannot be rearranged is refused at construction."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import moekit
from moekit.distributed import ExpertLoadRecorder, logical_to_physical, rebalance_experts
from moekit.quant import Fp8TensorMoEMethod
from moekit.quant.unquantized import UnquantizedMoEMethod
from moekit.router import route
from moekit.testing import assert_close

H, I = 32, 16
E, REDUNDANT = 6, 2  # R = 8 physical slots: 4 per rank at world 2, 2 at world 4
DISPATCHES = ("allgather_reducescatter", "all_to_all")


def _parallel(world: int, rank: int, dispatch: str = "allgather_reducescatter") -> moekit.ParallelConfig:
    return moekit.ParallelConfig(ep_size=world, ep_rank=rank, dispatch=dispatch, num_redundant_experts=REDUNDANT)


def _load_from(full: moekit.MoE, ep: moekit.MoE) -> None:
    """``full``'s weights into ``ep`` as a checkpoint loader does: router and shared experts by state, routed
    experts by logical id through ``weight_loader`` (which fills every slot holding the expert)."""
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("routed_experts.")}
    missing = ep.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith("routed_experts.") for k in missing), missing
    src, dst = full.routed_experts, ep.routed_experts
    inter = full.config.intermediate_size
    for e in range(full.config.num_experts):
        dst.weight_loader(dst.w13, src.w13[e, :inter], "w1", e)
        dst.weight_loader(dst.w13, src.w13[e, inter:], "w3", e)
        dst.weight_loader(dst.w2, src.w2[e], "w2", e)
        if src.w13_bias is not None:
            dst.weight_loader(dst.w13_bias, src.w13_bias[e, :inter], "w1", e)
            dst.weight_loader(dst.w13_bias, src.w13_bias[e, inter:], "w3", e)
            dst.weight_loader(dst.w2_bias, src.w2_bias[e], "w2", e)


def _check_slots(full: moekit.MoE, ep: moekit.MoE, rank: int) -> list[str]:
    """Every local slot holds exactly the weights of the logical expert the layer's phy2log names (the errors:
    returned, not raised, so that a rank failing alone still joins the collectives that follow)."""
    num_local = ep.routed_experts.num_experts
    logical = ep.phy2log[rank * num_local:(rank + 1) * num_local]
    return [f"slots {logical.tolist()}: {name} differs" for name in ("w13", "w2", "w13_bias", "w2_bias")
            if getattr(full.routed_experts, name) is not None
            and not torch.equal(getattr(ep.routed_experts, name), getattr(full.routed_experts, name)[logical])]


def _compare(full: moekit.MoE, ep: moekit.MoE, rank: int, world: int, label: str) -> list[str]:
    errors = []  # every pattern runs on every rank, so the ranks' collectives stay paired
    for counts in ([1] * world, [7] * world, [(7, 0, 1, 3)[r % 4] for r in range(world)]):
        x_all = torch.randn(sum(counts), H)
        start, mine = sum(counts[:rank]), counts[rank]
        with torch.no_grad():
            expected, got = full(x_all)[start:start + mine], ep(x_all[start:start + mine])
        try:
            assert_close(got, expected, torch.float32, name=f"{label} tokens {counts}")
        except AssertionError as err:
            errors.append(str(err))
    return errors


def _layer_case(cfg: moekit.MoEConfig, dispatch: str, rank: int, world: int) -> None:
    torch.manual_seed(21)  # the same full layer, inputs and loads on every rank
    full = moekit.MoE(cfg)
    ep = moekit.MoE(cfg, parallel=_parallel(world, rank, dispatch))
    num_slots = E + REDUNDANT
    assert ep.routed_experts.num_experts == num_slots // world
    assert ep.phy2log.tolist() == [p % E for p in range(num_slots)]  # vLLM's initial layout
    _load_from(full, ep)
    errors = _check_slots(full, ep, rank)
    recorder = ExpertLoadRecorder(num_layers=2, num_experts=E)
    ep.record_load(recorder, 1)
    x = torch.randn(5, H)
    seen = []  # the slot ids the experts receive: this rank's entries hashed from rank * T * K on
    forward = ep.routed_experts.forward
    ep.routed_experts.forward = lambda x_TH, w, ids_TK, **kw: seen.append(ids_TK) or forward(x_TH, w, ids_TK, **kw)
    try:
        with torch.no_grad():
            ids = route(ep.router_logits(x), cfg.top_k, cfg.routing)[1]
            ep(x)
    finally:
        del ep.routed_experts.forward
    ep.record_load(None)
    if not torch.equal(seen[0], logical_to_physical(ids, ep.log2phy, ep.logcnt, offset=rank * ids.numel())):
        errors.append(f"slot ids {seen[0].tolist()}: not hashed from entry rank * T * K = {rank * ids.numel()}")
    # Logical ids, this rank's tokens, into the given layer's row.
    counts = torch.bincount(ids.flatten(), minlength=E)
    if recorder.current[1].tolist() != counts.tolist() or recorder.current[0].any():
        errors.append(f"recorded {recorder.current.tolist()}, expected row 1 = {counts.tolist()}")
    errors += _compare(full, ep, rank, world, "initial layout")
    # A skewed load: the hot experts get the replicas; apply the plan and compute the same again.
    load = torch.tensor([[900.0, 10.0, 300.0, 5.0, 40.0, 1.0]])
    phy2log = rebalance_experts(load, num_slots, 1, 1, world)[0][0]
    params = [p.data_ptr() for p in ep.routed_experts.parameters()]
    maps = [t.data_ptr() for t in (ep.phy2log, ep.log2phy, ep.logcnt)]
    ep.rearrange(phy2log)
    # The routing maps are rewritten in place, so a CUDA graph captured through forward follows the new plan.
    assert [t.data_ptr() for t in (ep.phy2log, ep.log2phy, ep.logcnt)] == maps
    assert ep.phy2log.tolist() == phy2log.tolist()
    assert ep.phy2log.data_ptr() != phy2log.data_ptr()  # a copy: the caller may reuse its tensor for a next plan
    assert [p.data_ptr() for p in ep.routed_experts.parameters()] == params  # in place
    assert int(ep.logcnt[0]) > 1, ep.logcnt  # the hot expert has replicas
    errors += _check_slots(full, ep, rank)
    errors += _compare(full, ep, rank, world, "after rearrange")
    # The state dict carries the plan its slots were saved under: a fresh layer (the initial plan) loading it
    # routes as the rearranged one (it routed by its own plan to the moved weights before).
    fresh = moekit.MoE(cfg, parallel=ep.parallel)
    fresh.load_state_dict(ep.state_dict())
    assert fresh.phy2log.tolist() == phy2log.tolist()
    errors += _compare(full, fresh, rank, world, "reloaded after rearrange")
    assert not errors, "\n".join(errors)


def _checkpoint_case(rank: int, world: int, out_dir: str, write: Callable[[moekit.MoE, str, str], None]) -> None:
    """Per-expert and fused checkpoints of E = 10 (12 slots) load every slot of every local expert, strictly;
    ``from_pretrained`` too."""
    from moekit.loading import load_moe

    path, fused = os.path.join(out_dir, "eplb_ckpt"), os.path.join(out_dir, "eplb_fused.safetensors")
    torch.manual_seed(22)
    cfg = moekit.MoEConfig(num_experts=10, top_k=2, hidden_size=H, intermediate_size=I,
                           routing=moekit.RoutingConfig(renormalize=True))
    full = moekit.MoE(cfg)
    if rank == 0:
        write(full, path, fused)
    dist.barrier()
    parallel = _parallel(world, rank, "all_to_all")
    errors = []
    for where, prefix in ((path, "model.layers.0.mlp"), (fused, "mlp")):
        ep = moekit.MoE(cfg, parallel=parallel)
        report = load_moe(ep, where, prefix)
        if report.missing or report.unexpected:
            errors.append(f"{prefix}: missing {report.missing}, unexpected {report.unexpected}")
        errors += _check_slots(full, ep, rank)
        errors += _compare(full, ep, rank, world, f"checkpoint {prefix}")
    errors += _check_slots(full, moekit.MoE.from_pretrained(path, parallel=parallel), rank)
    assert not errors, "\n".join(errors)


class _NotRearrangeable(UnquantizedMoEMethod):
    supports_eplb = False


def _refusals(rank: int, world: int) -> None:
    cfg = moekit.MoEConfig(num_experts=E, top_k=2, hidden_size=H, intermediate_size=I)
    with pytest.raises(TypeError, match="supports_eplb"):
        moekit.MoE(cfg, parallel=_parallel(world, rank), quant_method=_NotRearrangeable())
    with pytest.raises(ValueError, match="num_redundant_experts"):  # E + r = 7 slots over the ranks
        moekit.MoE(replace(cfg, num_experts=5), parallel=_parallel(world, rank))
    ep = moekit.MoE(cfg, parallel=_parallel(world, rank))
    # Refused before any collective (every rank raises alike): a plan leaving an expert without a slot.
    with pytest.raises(ValueError, match="new_phy2log"):
        ep.rearrange(torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))
    with pytest.raises(ValueError, match="new_phy2log"):
        ep.rearrange(torch.arange(E))
    # A plan refused on one rank alone: every rank raises (the others waited in the collective before).
    lone = torch.zeros(E + REDUNDANT, dtype=torch.int64) if rank == 0 else torch.arange(E + REDUNDANT) % E
    with pytest.raises(ValueError if rank == 0 else RuntimeError, match="new_phy2log" if rank == 0 else "refused"):
        ep.rearrange(lone)
    with pytest.raises(ValueError, match="topk_ids"), torch.no_grad():  # logical ids, before the slot mapping
        ep(torch.randn(1, H), topk_weights=torch.ones(1, 2), topk_ids=torch.tensor([[0, E]]))
    with pytest.raises(ValueError, match="recorder"):  # counts per logical expert: E must match
        ep.record_load(ExpertLoadRecorder(num_layers=1, num_experts=E + REDUNDANT))
    plain = moekit.MoE(cfg, parallel=moekit.ParallelConfig(ep_size=world, ep_rank=rank))
    with pytest.raises(RuntimeError, match="num_redundant_experts"):
        plain.rearrange(torch.arange(E))
    # A load recorder indexes its counts by the ids: out-of-range precomputed ids are refused by name first (an
    # IndexError before; a device-side assert on CUDA).
    plain.record_load(ExpertLoadRecorder(num_layers=1, num_experts=E))
    with pytest.raises(ValueError, match="topk_ids"), torch.no_grad():
        plain(torch.randn(1, H), topk_weights=torch.ones(1, 2), topk_ids=torch.tensor([[0, E]]))
    # Static activation scales: each rank would merge only its own experts' scales (rows read with another
    # rank's scale).
    with pytest.raises(ValueError, match="static_input_scales"):
        moekit.MoE(cfg, parallel=moekit.ParallelConfig(ep_size=world, ep_rank=rank),
                   quant_method=Fp8TensorMoEMethod(static_input_scales=True))


def cases(rank: int, world: int, out_dir: str,
          write_checkpoints: Callable[[moekit.MoE, str, str], None]) -> list[tuple[str, Callable[[], None]]]:
    """The EPLB steps of a rank (names are the pytest case ids)."""
    base = moekit.MoEConfig(num_experts=E, top_k=2, hidden_size=H, intermediate_size=I,
                            routing=moekit.RoutingConfig(renormalize=True))
    configs = {f"eplb-bias-{d}": (replace(base, bias=True), d) for d in DISPATCHES}
    configs["eplb-K6-shared-all_to_all"] = (replace(base, top_k=E, shared_intermediate_size=24), "all_to_all")
    steps = [(n, lambda c=c, d=d: _layer_case(c, d, rank, world)) for n, (c, d) in configs.items()]
    steps += [("eplb-checkpoint", lambda: _checkpoint_case(rank, world, out_dir, write_checkpoints)),
              ("eplb-refusals", lambda: _refusals(rank, world))]
    return steps


NAMES = ("eplb-bias-allgather_reducescatter", "eplb-bias-all_to_all", "eplb-K6-shared-all_to_all",
         "eplb-checkpoint", "eplb-refusals")
