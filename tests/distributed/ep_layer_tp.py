"""Tensor-parallel experts with biases, run in the ranks that test_ep_layer.py spawns (one spawn per world size
for all): a checkpoint loads exactly this rank's slice of every tensor. Also the layout helpers test_ep_layer.py
cuts its TP layers with."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

import moekit
from moekit.distributed import local_experts
from moekit.testing import assert_close


def parallel_for(world: int, rank: int, tp: int = 1, **kw) -> moekit.ParallelConfig:
    """Rank ``rank`` of ``world`` laid out TP-innermost: ep_size = world / tp."""
    ep_rank, tp_rank = divmod(rank, tp)
    return moekit.ParallelConfig(ep_size=world // tp, ep_rank=ep_rank, tp_size=tp, tp_rank=tp_rank, **kw)


def _cut(v: torch.Tensor, dim: int, parallel: moekit.ParallelConfig, halves: int = 1) -> torch.Tensor:
    """This TP rank's contiguous part of each of ``halves`` equal halves of dimension ``dim`` (written out here,
    not with moekit's helpers)."""
    size = v.shape[dim] // halves
    part = size // parallel.tp_size
    starts = [h * size + parallel.tp_rank * part for h in range(halves)]
    return torch.cat([v.narrow(dim, s, part) for s in starts], dim)


def local_state(full: moekit.MoE, parallel: moekit.ParallelConfig) -> dict[str, torch.Tensor]:
    """``full``'s state with the routed experts cut to this rank's experts and, under TP, its slice of I: gate and
    up rows alike (w13, w13_bias, per-row and block scales of w13), w2's columns and its block scales' columns.
    ``w2_bias`` [E, H] and per-tensor scales stay whole."""
    ids = local_experts(parallel.ep_size, parallel.ep_rank, full.config.num_experts, parallel.placement)
    granularity = getattr(full.routed_experts.quant_method, "granularity", None)
    state = {}
    for k, v in full.state_dict().items():
        name = k.removeprefix("routed_experts.")
        if name != k:
            v = v[ids]
            if name in ("w13", "w13_bias") or (name == "w13_scale" and granularity in ("channel", "block")):
                v = _cut(v, 1, parallel, halves=2)
            elif name == "w2" or (name == "w2_scale" and granularity == "block"):
                v = _cut(v, 2, parallel)
        state[k] = v
    return state


def _bias_checkpoint_case(rank: int, world: int, out_dir: str) -> None:
    """A gpt-oss checkpoint (gate/up columns and bias entries interleaved, transposed) under TP 2: this rank's
    experts, gate and up slices of w13 and w13_bias, w2's columns and the whole w2_bias; the output matches."""
    from safetensors.torch import save_file

    from moekit.loading import load_moe

    path = os.path.join(out_dir, "tp_gpt_oss.safetensors")
    torch.manual_seed(12)
    cfg = moekit.MoEConfig(num_experts=6, top_k=2, hidden_size=32, intermediate_size=16, bias=True,
                           activation=moekit.Activation(name="swigluoai", limit=0.5))
    full = moekit.MoE(cfg)
    if rank == 0:
        r = full.routed_experts
        gate_up = torch.stack([r.w13[:, :16], r.w13[:, 16:]], dim=2).flatten(1, 2)  # rows g0, u0, g1, u1, ...
        bias = torch.stack([r.w13_bias[:, :16], r.w13_bias[:, 16:]], dim=2).flatten(1, 2)
        save_file({"mlp.router.weight": full.gate.weight.detach(),
                   "mlp.experts.gate_up_proj": gate_up.transpose(1, 2).contiguous().detach(),
                   "mlp.experts.gate_up_proj_bias": bias.contiguous().detach(),
                   "mlp.experts.down_proj": r.w2.transpose(1, 2).contiguous().detach(),
                   "mlp.experts.down_proj_bias": r.w2_bias.detach()}, path)
    dist.barrier()
    parallel = parallel_for(world, rank, 2, dispatch="allgather_reducescatter")
    tp = moekit.MoE(cfg, parallel=parallel)
    report = load_moe(tp, path, "mlp", layout="gpt_oss")
    assert not report.missing and not report.unexpected, report
    expected = local_state(full, parallel)
    for name in ("w13", "w2", "w13_bias", "w2_bias"):
        assert torch.equal(getattr(tp.routed_experts, name), expected[f"routed_experts.{name}"]), name
    x_all = torch.randn(3 * parallel.ep_size, 32)
    mine = slice(3 * parallel.ep_rank, 3 * parallel.ep_rank + 3)
    with torch.no_grad():
        assert_close(tp(x_all[mine]), full(x_all)[mine], torch.float32)


def cases(rank: int, world: int, out_dir: str) -> list[tuple[str, Callable[[], None]]]:
    """The TP steps of a rank (names are the pytest case ids)."""
    return [("tp_bias_checkpoint_loads_slices", lambda: _bias_checkpoint_case(rank, world, out_dir))]


NAMES = ("tp_bias_checkpoint_loads_slices",)
