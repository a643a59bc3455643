"""fused_decode vs fused_decode_ref, and through topk_reduce vs the whole-layer reference; partials poisoned with
NaN so unwritten slots show. fp16/fp32 only on CPU: the interpreter's bf16 tl.dot is wrong (bf16 in GPU tests)."""

import pytest
import torch

from moekit.ops.activation import ACTIVATIONS, Activation
from moekit.ops.fused_decode import fused_decode, fused_decode_ref, fused_decode_slices
from moekit.ops.heuristics import FusedDecodeConfig
from moekit.ops.reduce import topk_reduce
from moekit.testing import assert_close, reference_experts

SMALL = FusedDecodeConfig(block_i=16, block_k=32, block_h=32, num_stages=2)


def _inputs(num_tokens, top_k, num_experts, hidden, inter, dtype, act, *, bias=False, device="cpu"):
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).to(torch.int32)
    weights = torch.rand(num_tokens, top_k)
    x = torch.randn(num_tokens, hidden).to(dtype)
    w13 = (torch.randn(num_experts, act.w13_rows(inter), hidden) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter) * inter**-0.5).to(dtype)
    b13 = torch.randn(num_experts, act.w13_rows(inter)).to(dtype) if bias else None
    b2 = torch.randn(num_experts, hidden).to(dtype) if bias else None
    return [t.to(device) if t is not None else None for t in (x, w13, w2, weights, ids, b13, b2)]


def _run(x, w13, w2, weights, ids, b13, b2, act, cfg, *, emap=None, y_dtype=torch.float32):
    s = fused_decode_slices(w2.shape[2], cfg)
    y = torch.full((s, ids.numel(), x.shape[1]), float("nan"), dtype=y_dtype, device=x.device)
    return fused_decode(x, w13, w2, weights, ids, y, cfg, activation=act, w13_bias_E2I=b13, w2_bias_EH=b2,
                        expert_map_E=emap)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_partials_match_ref_every_activation(activation):
    # Odd H (ragged K tiles and output chunks), odd I (a ragged last slice), biases, T = 1.
    act = Activation(name=activation)
    args = _inputs(1, 3, 5, 37, 23, torch.float16, act, bias=True)
    y = _run(*args, act, SMALL)
    want = fused_decode_ref(*args[:5], torch.empty(y.shape), SMALL, activation=act, w13_bias_E2I=args[5],
                            w2_bias_EH=args[6])
    assert_close(y, want, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens, top_k, num_experts", [(1, 1, 4), (3, 4, 4), (5, 2, 7)])
def test_layer_matches_reference(dtype, num_tokens, top_k, num_experts):
    # Through the reduction: top_k = 1 and = E, odd T, experts with no tokens, slices of 16 and of 32 (one slice).
    act = Activation(name="silu")
    x, w13, w2, weights, ids, b13, b2 = _inputs(num_tokens, top_k, num_experts, 64, 32, dtype, act)
    for cfg in (SMALL, FusedDecodeConfig(block_i=32, block_k=64, block_h=16, num_stages=2)):
        y = _run(x, w13, w2, weights, ids, b13, b2, act, cfg)
        out = topk_reduce(y, top_k, torch.empty(num_tokens, 64, dtype=dtype))
        want = reference_experts(x, w13, w2, weights, ids, activation=act)
        assert_close(out, want, dtype)


def test_rows_of_other_ranks_not_written():
    act = Activation(name="silu")
    x, w13, w2, weights, ids, _, _ = _inputs(4, 2, 4, 32, 16, torch.float16, act)
    gids = torch.tensor([[0, 3], [1, 2], [3, 3], [2, 0]], dtype=torch.int32)
    emap = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    local_w13, local_w2 = w13[:2], w2[:2]
    y = _run(x, local_w13, local_w2, weights, gids, None, None, act, SMALL, emap=emap)
    remote = (emap[gids.long()] < 0).flatten()
    assert torch.isnan(y[:, remote]).all() and torch.isfinite(y[:, ~remote]).all()
    out = topk_reduce(y, 2, torch.empty(4, 32, dtype=torch.float16), topk_ids_TK=gids, expert_map=emap,
                      num_experts=2)
    want = fused_decode_ref(x, local_w13, local_w2, weights, gids, torch.zeros(y.shape), SMALL, activation=act,
                            expert_map_E=emap).sum(0).view(4, 2, 32).sum(1)
    assert_close(out, want, torch.float16)
    assert torch.equal(out[2], torch.zeros(32, dtype=torch.float16))  # token 2 has no local expert


def test_zero_tokens_and_validation():
    act = Activation(name="silu")
    x, w13, w2, weights, ids, _, _ = _inputs(1, 2, 4, 32, 16, torch.float16, act)
    empty = torch.empty(1, 0, 32)
    assert fused_decode(x[:0], w13, w2, weights[:0], ids[:0], empty, SMALL, activation=act) is empty
    y = torch.empty(1, 2, 32)
    with pytest.raises(ValueError, match=r"y_SNH: expected shape \(1, 2, 32\)"):
        fused_decode(x, w13, w2, weights, ids, torch.empty(2, 2, 32), SMALL, activation=act)
    with pytest.raises(TypeError, match="w2_EHI"):
        fused_decode(x, w13, w2.float(), weights, ids, y, SMALL, activation=act)
    with pytest.raises(ValueError, match="w13_E2IH"):
        fused_decode(x, w13[:, :16], w2, weights, ids, y, SMALL, activation=act)
    with pytest.raises(ValueError, match="topk_weights_TK"):
        fused_decode(x, w13, w2, weights[:, :1], ids, y, SMALL, activation=act)
    with pytest.raises(ValueError, match="block_i"):
        FusedDecodeConfig(block_i=24)
    # Dtypes the kernel would read or write wrongly (an int32 y truncated the partials to zeros).
    with pytest.raises(TypeError, match="y_SNH"):
        fused_decode(x, w13, w2, weights, ids, y.int(), SMALL, activation=act)
    with pytest.raises(TypeError, match="y_SNH"):
        fused_decode(x, w13, w2, weights, ids, y.bfloat16(), SMALL, activation=act)
    with pytest.raises(TypeError, match="topk_ids_TK"):
        fused_decode(x, w13, w2, weights, ids.float(), y, SMALL, activation=act)
    with pytest.raises(TypeError, match="expert_map_E"):
        fused_decode(x, w13, w2, weights, ids, y, SMALL, activation=act, expert_map_E=torch.zeros(4))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_gpu_bf16(activation):
    act = Activation(name=activation, alpha=1.702, limit=7.0) if activation == "swigluoai" else Activation(
        name=activation)
    args = _inputs(1, 8, 64, 2048, 768, torch.bfloat16, act, bias=True, device="cuda")
    cfg = FusedDecodeConfig(block_i=32)
    y = _run(*args, act, cfg)
    want = fused_decode_ref(*[a.cpu() if a is not None else None for a in args[:5]],
                            torch.empty(y.shape), cfg, activation=act,
                            w13_bias_E2I=args[5].cpu(), w2_bias_EH=args[6].cpu())
    assert_close(y.cpu(), want, torch.bfloat16)
