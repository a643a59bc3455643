"""Expert-parallel MoE on gloo (127.0.0.1), world 2 and 4: every rank's output equals the single-process layer.

Process start dominates on a small CPU machine (seconds per spawn), so the ranks are spawned once per world size
and run every case inside the workers; each worker writes {case: error or None} to a JSON file and the pytest side
asserts per case. A case runs its layer on four token patterns per rank: all 0, all 1, all 7, and mixed
(7, 0, 1, 3 by rank: uneven counts and a rank with none).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import moekit
from moekit.distributed import local_experts
from moekit.kernel import available_backends
from moekit.testing import QUANT_TOLERANCES, assert_close
from tests.distributed import ep_layer_eplb, ep_layer_tp
from tests.distributed.ep_layer_tp import local_state, parallel_for
from tests.distributed.ranks import failures, init_rank, run_cases, spawn

WORLDS = (2, 4)
DISPATCHES = ("allgather_reducescatter", "all_to_all")
H, I = 32, 16


def _patterns(world: int) -> list[list[int]]:
    return [[0] * world, [1] * world, [7] * world, [(7, 0, 1, 3)[r % 4] for r in range(world)]]


def _float_cases() -> dict[str, dict]:
    cases = {}
    for e in (8, 10):  # 10 over 4 ranks: 3, 3, 2, 2
        for k in (1, 2, e):
            for dispatch in DISPATCHES:
                cfg = moekit.MoEConfig(num_experts=e, top_k=k, hidden_size=H, intermediate_size=I,
                                       routing=moekit.RoutingConfig(renormalize=k > 1))
                cases[f"E{e}-K{k}-{dispatch}"] = dict(cfg=cfg, dispatch=dispatch)
    base = moekit.MoEConfig(num_experts=10, top_k=2, hidden_size=H, intermediate_size=I)
    llama4 = moekit.RoutingConfig(scoring_func="sigmoid", topk_before_score=True, apply_weights_on_input=True)
    for dispatch in DISPATCHES:
        cases[f"bf16-{dispatch}"] = dict(cfg=base, dispatch=dispatch, dtype=torch.bfloat16)
        cases[f"round_robin-{dispatch}"] = dict(cfg=base, dispatch=dispatch, placement="round_robin")
        # Shared experts (replicated) and biases (sliced with their experts).
        cases[f"shared-bias-{dispatch}"] = dict(
            cfg=replace(base, shared_intermediate_size=24, shared_expert_gate=True, bias=True), dispatch=dispatch)
        for k in (1, 2):  # weights on the input: K = 1 folds them into x, K > 1 expands rows
            cases[f"weights-on-input-K{k}-{dispatch}"] = dict(cfg=replace(base, top_k=k, routing=llama4),
                                                              dispatch=dispatch)
        for scheme in ("fp8_channel", "fp8_block", "int8_channel"):  # per-row scales travel with the codes
            cases[f"{scheme}-{dispatch}"] = dict(cfg=replace(base, hidden_size=128, intermediate_size=64),
                                                 dispatch=dispatch, scheme=scheme)
        # Sync-free (what CUDA-graph capture runs): equal token counts on every rank, no count exchanged.
        for label, cfg in (("", base), ("weights-on-input-K2-", replace(base, routing=llama4)),
                           ("E10-K10-", replace(base, top_k=10))):
            cases[f"sync-free-{label}{dispatch}"] = dict(cfg=cfg, dispatch=dispatch, sync_free=True)
        cases[f"sync-free-fp8_block-{dispatch}"] = dict(cfg=replace(base, hidden_size=128, intermediate_size=64),
                                                        dispatch=dispatch, scheme="fp8_block", sync_free=True)
        if "triton" in available_backends("cpu"):
            cases[f"triton-{dispatch}"] = dict(cfg=replace(base, backend="triton"), dispatch=dispatch, patterns=2)
    # Tensor parallelism: world 2 runs TP 2; world 4 runs EP 2 x TP 2 and TP 4 ("all").
    for dispatch in DISPATCHES:
        cases[f"tp2-{dispatch}"] = dict(cfg=base, dispatch=dispatch, tp=2)
        cases[f"tp2-K10-sync-free-{dispatch}"] = dict(cfg=replace(base, top_k=10), dispatch=dispatch, tp=2,
                                                      sync_free=True)
    cases["tp2-shared-bf16"] = dict(cfg=replace(base, shared_intermediate_size=24), dispatch="all_to_all", tp=2,
                                    dtype=torch.bfloat16)
    cases["tp2-weights-on-input-K2"] = dict(cfg=replace(base, routing=llama4), dispatch="all_to_all", tp=2)
    # Biases (gpt-oss): w13_bias sliced with the gate/up rows, w2_bias added once per TP group. swigluoai with a
    # limit the test's values cross, so the clamp is exercised (elementwise over I: it splits into I slices).
    swiglu = moekit.Activation(name="swigluoai", limit=0.5)
    for dispatch in DISPATCHES:
        cases[f"tp2-bias-swigluoai-{dispatch}"] = dict(cfg=replace(base, bias=True, activation=swiglu),
                                                       dispatch=dispatch, tp=2)
    # 8-bit experts: I/tp = 128, one block of each half per rank. A rank's GEMM-2 activation scales cover only its
    # slice of I (per token) or its blocks: within the quantization tolerance of the single-process layer.
    quantized = replace(base, hidden_size=128, intermediate_size=256)
    for scheme, dispatch in (("fp8_block", "all_to_all"), ("fp8_channel", "allgather_reducescatter"),
                             ("int8_channel", "all_to_all"), ("fp8_tensor", "allgather_reducescatter")):
        tol = QUANT_TOLERANCES["int8" if scheme.startswith("int8") else "fp8_e4m3"]
        cases[f"tp2-{scheme}"] = dict(cfg=quantized, dispatch=dispatch, tp=2, scheme=scheme, tol=tol)
    cases["tp2-fp8_block-bias-swigluoai"] = dict(cfg=replace(quantized, bias=True, activation=swiglu),
                                                 dispatch="allgather_reducescatter", tp=2, scheme="fp8_block",
                                                 tol=QUANT_TOLERANCES["fp8_e4m3"])
    cases["tp-all-E8-K1"] = dict(cfg=replace(base, num_experts=8, top_k=1), dispatch="allgather_reducescatter",
                                 tp="all")
    # Dynamic per-tensor scales depend on which rows a rank computes: its GEMM 2 input scale covers only the rows
    # of its own experts, so the result differs from one process within the quantization tolerance only.
    for dispatch in DISPATCHES:
        cases[f"fp8_tensor-{dispatch}"] = dict(cfg=replace(base, hidden_size=128, intermediate_size=64),
                                               dispatch=dispatch, scheme="fp8_tensor", tol=QUANT_TOLERANCES["fp8_e4m3"])
    return cases


CASES = _float_cases()
OTHER = ("collective_counts", "all_to_all_traffic", "checkpoint_loads_local_experts", "from_pretrained_parallel",
         "fused_checkpoint_loads_local_rows", "tp_checkpoint_loads_slices", "refusals", "ranks_disagree",
         *ep_layer_eplb.NAMES,
         *ep_layer_tp.NAMES)


def _shard(full: moekit.MoE, parallel: moekit.ParallelConfig, dtype: torch.dtype) -> moekit.MoE:
    """The parallel layer holding ``full``'s router, shared experts and this rank's experts (and I slice)."""
    ep = moekit.MoE(full.config, dtype=dtype, parallel=parallel)
    ep.load_state_dict(local_state(full, parallel))
    return ep


def _dispatch(moe: moekit.MoE):
    pf = moe.routed_experts.prepare_finalize
    return getattr(pf, "inner", pf)  # inside TensorParallel


def _run_case(name: str, case: dict, rank: int, world: int, device: str = "cpu") -> None:
    dtype = case.get("dtype", torch.float32)
    torch.manual_seed(1234)  # the same full layer and inputs on every rank
    full = moekit.MoE(case["cfg"], dtype=dtype)
    tp = world if case.get("tp") == "all" else case.get("tp", 1)
    parallel = parallel_for(world, rank, tp, dispatch=case["dispatch"], placement=case.get("placement", "linear"))
    ep = _shard(full, parallel, dtype)
    _dispatch(ep).sync_free = case.get("sync_free")
    if "scheme" in case:
        moekit.quantize(full, case["scheme"])
        moekit.quantize(ep, case["scheme"])
    full, ep = full.to(device), ep.to(device)  # built on the CPU: the same weights on every rank's device
    errors = []  # every pattern runs on every rank even after a mismatch, so the ranks' collectives stay paired
    # Token counts per EP rank: the ranks of one TP group hold the same tokens.
    patterns = _patterns(parallel.ep_size)
    patterns = patterns[:3] if case.get("sync_free") else patterns  # sync-free: equal counts
    for counts in patterns[-case.get("patterns", 4):]:
        x_all = torch.randn(sum(counts), full.config.hidden_size, dtype=dtype).to(device)
        start, mine = sum(counts[:parallel.ep_rank]), counts[parallel.ep_rank]
        with torch.no_grad():
            expected = full(x_all)[start:start + mine]
            got = ep(x_all[start:start + mine])
        try:
            assert got.dtype == dtype, got.dtype
            # fp32: within 1e-5 of the single-process layer (the table's fp32 row); bf16: the bf16 row.
            assert_close(got, expected, dtype, name=f"{name} tokens {counts}", tol=case.get("tol"))
        except AssertionError as err:
            errors.append(str(err))
    assert not errors, "\n".join(errors)


def _all_to_all_traffic(rank: int, world: int, device: str = "cpu") -> None:
    """all_to_all sends each token once to each rank that owns one of its experts and to no other (the payload's
    split sizes against counts made here from the routing), and its sync-free variant returns the eager result
    bit for bit, also when the experts quantize what they receive with one dynamic scale (fp8_tensor)."""
    num_experts, top_k, tokens = 10, 3, 6
    owners = torch.empty(num_experts, dtype=torch.int64)
    for r in range(world):
        owners[local_experts(world, r, num_experts)] = r
    cfg = moekit.MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=128, intermediate_size=64)
    parallel = moekit.ParallelConfig(ep_size=world, ep_rank=rank, dispatch="all_to_all")
    original = dist.all_to_all_single
    splits: list[list[int]] = []

    def recording(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        if input_split_sizes is not None:
            splits.append(list(input_split_sizes))
        return original(output, input, output_split_sizes, input_split_sizes, **kwargs)

    for scheme in (None, "fp8_tensor"):
        torch.manual_seed(99)  # the same layer on every rank; the tokens differ per rank
        ep = _shard(moekit.MoE(cfg), parallel, torch.float32)
        if scheme:
            moekit.quantize(ep, scheme)
        routed = ep.routed_experts.to(device)
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(tokens, 128, generator=gen)
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, generator=gen)
        hit = torch.zeros(tokens, world, dtype=torch.bool).scatter_(1, owners[ids], True)
        want = hit.sum(dim=0).tolist()
        x, ids, weights = x.to(device), ids.to(torch.int32).to(device), weights.to(device)
        outs = []
        for sync_free in (False, True):
            _dispatch(ep).sync_free = sync_free
            splits.clear()
            dist.all_to_all_single = recording
            try:
                with torch.no_grad():
                    outs.append(routed(x, weights, ids, check_ids=False))
            finally:
                dist.all_to_all_single = original
            if not sync_free:
                assert splits and splits[0] == want, f"{scheme}: rows sent to each rank {splits[:1]} != {want}"
        assert torch.equal(outs[0], outs[1]), f"{scheme}: sync-free differs from eager by " \
            f"{(outs[0] - outs[1]).abs().max().item()}"


def _collective_counts(rank: int, world: int, device: str = "cpu") -> None:
    """Three collectives per call for both dispatches, as moekit.distributed.dispatch documents (one for
    allgather_reducescatter when no rank has a token), and one all_gather more at a layer's first call: the ranks'
    check that they built the same layer (moekit.distributed.consistency); two with tensor parallelism (its ranks'
    tokens too)."""
    calls: list[str] = []
    names = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
             "all_to_all_single", "all_reduce", "all_gather", "broadcast", "barrier")
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    # Older torch (2.11 on the GPU machine) has only the *_tensor spellings that dispatch.py falls back to.
    same = {"all_gather_into_tensor": "all_gather_single", "reduce_scatter_tensor": "reduce_scatter_single"}

    def counting(n):
        def call(*args, **kwargs):
            calls.append(same.get(n, n))
            return originals[n](*args, **kwargs)
        return call

    cfg = moekit.MoEConfig(num_experts=8, top_k=2, hidden_size=H, intermediate_size=I, shared_intermediate_size=8)
    expected = {"allgather_reducescatter": ["all_gather_single", "all_gather_single", "reduce_scatter_single"],
                "all_to_all": ["all_to_all_single"] * 3}
    for (dispatch, seq), sync_free in itertools.product(expected.items(), (None, True)):
        ep = moekit.MoE(cfg, parallel=moekit.ParallelConfig(ep_size=world, ep_rank=rank, dispatch=dispatch),
                        device=device)
        ep.routed_experts.prepare_finalize.sync_free = sync_free
        runs = ((3 + rank, seq), (0, seq if dispatch == "all_to_all" else seq[:1]))
        if sync_free:  # no count exchange (all_to_all: the dispatch is an all_gather); equal token counts
            free = ["all_gather_single", "all_to_all_single"] if dispatch == "all_to_all" else seq[1:]
            runs = ((3, free), (0, []))
        for i, (tokens, want) in enumerate(runs):
            want = (["all_gather"] if i == 0 else []) + want
            for n in originals:
                setattr(dist, n, counting(n))
            try:
                calls.clear()
                with torch.no_grad():
                    ep(torch.randn(tokens, H, device=device))
            finally:
                for n, fn in originals.items():
                    setattr(dist, n, fn)
            assert calls == want, f"{dispatch}, sync_free={sync_free}, {tokens} tokens: {calls} != {want}"
    # Tensor parallelism adds one all-reduce (TP 2; with world 4 inside EP 2).
    for dispatch, seq in expected.items():
        parallel = parallel_for(world, rank, 2, dispatch=dispatch)
        tp = moekit.MoE(cfg, parallel=parallel, device=device)
        for n in originals:
            setattr(dist, n, counting(n))
        try:
            calls.clear()
            with torch.no_grad():
                # A TP group's ranks share their tokens (the first call checks it).
                tp(torch.randn(3, H, generator=torch.Generator().manual_seed(parallel.ep_rank)).to(device))
        finally:
            for n, fn in originals.items():
                setattr(dist, n, fn)
        # The first call's checks: how the ranks built the layer, and that a TP group's ranks got the same tokens.
        want = ["all_gather"] * 2 + (seq if parallel.ep_size > 1 else []) + ["all_reduce"]
        assert calls == want, f"TP 2 {dispatch}: {calls} != {want}"
    # A copied layer shares the dispatch (bound to the process group) and computes the same.
    x = torch.randn(5, H, device=device)
    with torch.no_grad():
        copied = copy.deepcopy(ep)
        assert copied.routed_experts.prepare_finalize is ep.routed_experts.prepare_finalize
        assert torch.equal(copied(x), ep(x))


def _write_checkpoint(full: moekit.MoE, path: str) -> None:
    """A Qwen3-MoE-style checkpoint of ``full`` (per-expert tensors) with its config.json, written by rank 0."""
    from safetensors.torch import save_file

    cfg = full.config
    prefix = "model.layers.0.mlp."
    tensors = {prefix + "gate.weight": full.gate.weight}
    w13, w2 = full.routed_experts.w13, full.routed_experts.w2
    for e in range(cfg.num_experts):
        tensors[f"{prefix}experts.{e}.gate_proj.weight"] = w13[e, :I]
        tensors[f"{prefix}experts.{e}.up_proj.weight"] = w13[e, I:]
        tensors[f"{prefix}experts.{e}.down_proj.weight"] = w2[e]
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    config = {"model_type": "qwen3_moe", "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
              "hidden_size": H, "moe_intermediate_size": I, "norm_topk_prob": True, "num_hidden_layers": 1,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu", "torch_dtype": "float32"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _write_checkpoints(full: moekit.MoE, per_expert: str, fused: str) -> None:
    """``full`` as a per-expert checkpoint directory (``_write_checkpoint``) and as a fused file (prefix ``mlp``)."""
    from safetensors.torch import save_file

    os.makedirs(per_expert, exist_ok=True)
    _write_checkpoint(full, per_expert)
    r = full.routed_experts
    save_file({"mlp.gate.weight": full.gate.weight.detach(), "mlp.experts.gate_up_proj": r.w13.detach(),
               "mlp.experts.down_proj": r.w2.detach()}, fused)


def _fused_checkpoint_case(rank: int, world: int, out_dir: str) -> None:
    """Fused [E, 2I, H] / [E, H, I] tensors (with biases): each rank keeps its experts' rows."""
    path = os.path.join(out_dir, "fused.safetensors")
    torch.manual_seed(8)
    cfg = moekit.MoEConfig(num_experts=10, top_k=2, hidden_size=H, intermediate_size=I, bias=True)
    full = moekit.MoE(cfg)
    if rank == 0:
        from safetensors.torch import save_file

        r = full.routed_experts
        save_file({"mlp.gate.weight": full.gate.weight.detach(), "mlp.experts.gate_up_proj": r.w13.detach(),
                   "mlp.experts.down_proj": r.w2.detach(), "mlp.experts.gate_up_proj_bias": r.w13_bias.detach(),
                   "mlp.experts.down_proj_bias": r.w2_bias.detach()}, path)
    dist.barrier()
    from moekit.loading import load_moe

    ep = moekit.MoE(cfg, parallel=moekit.ParallelConfig(ep_size=world, ep_rank=rank))
    report = load_moe(ep, path, "mlp")
    assert report.layout == "fused" and not report.missing and not report.unexpected, report
    ids = local_experts(world, rank, 10)
    for name in ("w13", "w2", "w13_bias", "w2_bias"):
        assert torch.equal(getattr(ep.routed_experts, name), getattr(full.routed_experts, name)[ids]), name


def _checkpoint_case(rank: int, world: int, out_dir: str, via_from_pretrained: bool) -> None:
    path = os.path.join(out_dir, "ckpt")
    torch.manual_seed(7)
    cfg = moekit.MoEConfig(num_experts=10, top_k=2, hidden_size=H, intermediate_size=I,
                           routing=moekit.RoutingConfig(renormalize=True))
    full = moekit.MoE(cfg)
    if rank == 0 and not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(path, exist_ok=True)
        _write_checkpoint(full, path)
    dist.barrier()
    parallel = moekit.ParallelConfig(ep_size=world, ep_rank=rank, placement="round_robin", dispatch="all_to_all")
    ids = local_experts(world, rank, 10, "round_robin")
    if via_from_pretrained:
        ep = moekit.MoE.from_pretrained(path, parallel=parallel)
    else:
        from moekit.loading import load_moe

        ep = moekit.MoE(cfg, parallel=parallel)
        report = load_moe(ep, path, "model.layers.0.mlp")  # strict: no missing, no unexpected keys
        assert not report.missing and not report.unexpected, report
        held = {int(k.split(".experts.")[1].split(".")[0]) for k in report.loaded if ".experts." in k}
        skipped = {int(k.split(".experts.")[1].split(".")[0]) for k in report.skipped}
        assert held == set(ids.tolist()) and skipped == set(range(10)) - held, (held, skipped)
    assert torch.equal(ep.routed_experts.w13, full.routed_experts.w13[ids])
    assert torch.equal(ep.routed_experts.w2, full.routed_experts.w2[ids])
    x_all = torch.randn(4 * world, H)
    with torch.no_grad():
        assert_close(ep(x_all[4 * rank:4 * rank + 4]), full(x_all)[4 * rank:4 * rank + 4], torch.float32)


def _tp_checkpoint_case(rank: int, world: int, out_dir: str) -> None:
    """TP 2 (world 4: EP 2 x TP 2): per-expert and fused checkpoints load this rank's experts and I slice."""
    from moekit.loading import load_moe

    torch.manual_seed(9)
    cfg = moekit.MoEConfig(num_experts=10, top_k=2, hidden_size=H, intermediate_size=I,
                           routing=moekit.RoutingConfig(renormalize=True))
    full = moekit.MoE(cfg)
    per_expert, fused = os.path.join(out_dir, "tp_ckpt"), os.path.join(out_dir, "tp_fused.safetensors")
    if rank == 0:
        _write_checkpoints(full, per_expert, fused)
    dist.barrier()
    parallel = parallel_for(world, rank, 2, dispatch="all_to_all")
    expected = local_state(full, parallel)
    x_all = torch.randn(3 * parallel.ep_size, H)
    mine = x_all[3 * parallel.ep_rank:3 * parallel.ep_rank + 3]
    for path, prefix in ((per_expert, "model.layers.0.mlp"), (fused, "mlp")):
        tp = moekit.MoE(cfg, parallel=parallel)
        report = load_moe(tp, path, prefix)
        assert not report.missing and not report.unexpected, report
        for name in ("w13", "w2"):
            assert torch.equal(getattr(tp.routed_experts, name), expected[f"routed_experts.{name}"]), (path, name)
        with torch.no_grad():
            assert_close(tp(mine), full(x_all)[3 * parallel.ep_rank:3 * parallel.ep_rank + 3], torch.float32)
    tp = moekit.MoE.from_pretrained(per_expert, parallel=parallel)
    assert torch.equal(tp.routed_experts.w2, expected["routed_experts.w2"])


def _refusals(rank: int, world: int) -> None:
    cfg = moekit.MoEConfig(num_experts=8, top_k=2, hidden_size=H, intermediate_size=I)
    with pytest.raises(ValueError, match="ep_rank"):
        moekit.MoE(cfg, parallel=moekit.ParallelConfig(ep_size=world, ep_rank=(rank + 1) % world))
    with pytest.raises(ValueError, match="ep_size"):
        moekit.MoE(cfg, parallel=moekit.ParallelConfig(ep_size=world + 1, ep_rank=rank))
    with pytest.raises(ValueError, match="tp_size"):
        moekit.MoE(replace(cfg, intermediate_size=15), parallel=parallel_for(world, rank, 2))
    ep = moekit.MoE(cfg, parallel=moekit.ParallelConfig(ep_size=world, ep_rank=rank))
    with pytest.raises(ValueError, match="no backward"):  # refused before the dispatch's collectives
        ep(torch.randn(2, H))


def _route_top2(hidden_states, router_logits, top_k, renormalize):
    """A routing callback (module level: the same on every rank, at a different address in each process)."""
    weights, ids = torch.topk(router_logits.softmax(-1), top_k)
    return weights, ids


def _ranks_disagree(rank: int, world: int) -> None:
    """Ranks that built the layer differently (what would exchange tensors of the right shapes and compute wrong
    outputs) are refused at the first call on every rank, the differing fields named; ranks that agree pass, and
    are checked once."""
    cfg = moekit.MoEConfig(num_experts=8, top_k=2, hidden_size=H, intermediate_size=I)
    builds = {
        "parallel.placement": dict(parallel=moekit.ParallelConfig(
            ep_size=world, ep_rank=rank, placement="round_robin" if rank == 1 else "linear")),
        "config.top_k": dict(cfg=replace(cfg, top_k=3 if rank == 1 else 2)),
        "config.activation.name": dict(cfg=replace(cfg, activation=moekit.Activation(
            name="gelu" if rank == 1 else "silu"))),
        "config.routing.scoring_func": dict(cfg=replace(cfg, routing=moekit.RoutingConfig(
            scoring_func="sigmoid" if rank == 1 else "softmax"))),
        "dtype": dict(dtype=torch.bfloat16 if rank == 1 else torch.float32),
        "quantization": dict(scheme="fp8_channel" if rank == 1 else None),
    }
    builds["config.hidden_size"] = dict(cfg=replace(cfg, hidden_size=48 if rank == 1 else H))
    for field, b in builds.items():
        c = b.get("cfg", replace(cfg, hidden_size=128, intermediate_size=64) if "scheme" in b else cfg)
        moe = moekit.MoE(c, dtype=b.get("dtype", torch.float32),
                         parallel=b.get("parallel", moekit.ParallelConfig(ep_size=world, ep_rank=rank)))
        if b.get("scheme"):
            moekit.quantize(moe, b["scheme"])
        # Every rank gets rank 0's input: the rank built differently is refused with the others, before its own
        # input check (which would leave them in the collective).
        x = torch.randn(3, 128 if "scheme" in b else H)
        with torch.no_grad(), pytest.raises(ValueError, match=f"built differently: {field} ") as err:
            moe(x)
        assert "ranks with equal values: [0" in str(err.value) and "/ [1])" in str(err.value), str(err.value)
    # Tensor parallelism: the ranks of a TP group must also get the same tokens (they sum their outputs).
    for label, tokens in (("count", torch.randn(3 + rank % 2, H)),
                          ("values", torch.randn(3, H, generator=torch.Generator().manual_seed(rank)))):
        tp = moekit.MoE(cfg, parallel=parallel_for(world, rank, 2))
        with torch.no_grad(), pytest.raises(ValueError, match="hidden_states: the ranks got different tokens"):
            tp(tokens)
    tp = moekit.MoE(cfg, parallel=parallel_for(world, rank, 2))
    with torch.no_grad():  # the same tokens within each TP group (EP ranks differ): passes
        tp(torch.randn(3, H, generator=torch.Generator().manual_seed(rank // 2)))
    # The same routing callback on every rank (its repr holds a per-process address) agrees.
    routed = moekit.MoE(replace(cfg, routing=moekit.RoutingConfig(custom_routing_function=_route_top2)),
                        parallel=moekit.ParallelConfig(ep_size=world, ep_rank=rank))
    with torch.no_grad():
        routed(torch.randn(3, H))
    moe = moekit.MoE(cfg, parallel=moekit.ParallelConfig(ep_size=world, ep_rank=rank))
    with torch.no_grad():
        moe(torch.randn(3, H))
        assert moe._rank_check.done
        copied = copy.deepcopy(moe)  # shares the finding (and the group, which cannot be copied)
        assert copied._rank_check.done and copied._rank_check.group is moe._rank_check.group


def _cuda_graph_case(rank: int, world: int, device: str) -> None:
    """NCCL only: a whole EP layer captured in a CUDA graph (the sync-free dispatch, chosen while capturing)
    replays to what the eager layer computes on new inputs."""
    cfg = moekit.MoEConfig(num_experts=10, top_k=2, hidden_size=H, intermediate_size=I)
    torch.manual_seed(5)
    full = moekit.MoE(cfg, dtype=torch.bfloat16)
    errors = []
    for dispatch in DISPATCHES:
        parallel = moekit.ParallelConfig(ep_size=world, ep_rank=rank, dispatch=dispatch)
        ep = _shard(full, parallel, torch.bfloat16).to(device)
        static_x = torch.randn(4, H, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (Triton compiles, allocator settles) outside the capture
                ep(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = ep(static_x)
            for _ in range(2):
                x = torch.randn(4, H, dtype=torch.bfloat16, device=device)
                static_x.copy_(x)
                graph.replay()
                try:
                    assert_close(static_y, ep(x), torch.bfloat16, name=f"{dispatch} graph replay")
                except AssertionError as err:
                    errors.append(str(err))
    assert not errors, "\n".join(errors)


def _worker(rank: int, world: int, port: int, out_dir: str, backend: str = "gloo") -> None:
    """One rank: gloo on the CPU, or NCCL on GPU ``rank`` (the layer cases and the collective count only)."""
    device = init_rank(rank, world, port, backend, timeout_s=120)
    steps = [(n, lambda n=n, c=c: _run_case(n, c, rank, world, device)) for n, c in CASES.items()]
    steps += [("collective_counts", lambda: _collective_counts(rank, world, device)),
              ("all_to_all_traffic", lambda: _all_to_all_traffic(rank, world, device))]
    if backend == "nccl":
        steps += [("cuda_graph", lambda: _cuda_graph_case(rank, world, device))]
    if backend == "gloo":
        steps += [("checkpoint_loads_local_experts", lambda: _checkpoint_case(rank, world, out_dir, False)),
                  ("from_pretrained_parallel", lambda: _checkpoint_case(rank, world, out_dir, True)),
                  ("fused_checkpoint_loads_local_rows", lambda: _fused_checkpoint_case(rank, world, out_dir)),
                  ("tp_checkpoint_loads_slices", lambda: _tp_checkpoint_case(rank, world, out_dir)),
                  ("refusals", lambda: _refusals(rank, world)),
                  ("ranks_disagree", lambda: _ranks_disagree(rank, world))]
        steps += ep_layer_eplb.cases(rank, world, out_dir, _write_checkpoints)
        steps += ep_layer_tp.cases(rank, world, out_dir)
    run_cases(steps, rank, out_dir)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def results(request, tmp_path_factory):
    world = request.param
    return spawn(_worker, world, tmp_path_factory.mktemp(f"ep_world{world}"))


@pytest.mark.parametrize("case", [*CASES, *OTHER])
def test_expert_parallel(results, case):
    failed = failures(results, case)
    assert not failed, failed
