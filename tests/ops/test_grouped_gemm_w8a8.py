"""grouped_gemm_w8a8 vs grouped_gemm_w8a8_ref (grouped_gemm_ref on the dequantized codes), in the interpreter, where
e4m3 and int8 dots are exact-product numpy matmuls: every granularity, fp8 and int8, gated (gate and up blocked
apart) and plain, split-K, ragged shapes. Outputs are poisoned with NaN so unwritten rows show."""

from dataclasses import replace

import pytest
import torch

from moekit.ops.act_quant import act_quant
from moekit.ops.activation import Activation
from moekit.ops.align import align_ref, row_per_block
from moekit.ops.grouped_gemm_w8a8 import grouped_gemm_w8a8, grouped_gemm_w8a8_ref
from moekit.ops.heuristics import GemmConfig
from moekit.ops.quantize import quantize_weight
from moekit.testing import assert_close

SMALL = GemmConfig(block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2)
ACT = {"tensor": ("tensor", None), "channel": ("token", None), "block": ("group", 64)}
BLOCK = (32, 64)  # (bn, bk): small blocks so a test shape spans several of each, BLOCK_K = 32 divides bk


def _weights(num_experts, n_b, k_dim, qdtype, granularity, gate_rows=None):
    w = torch.randn(num_experts, n_b, k_dim) * k_dim**-0.5
    shape = BLOCK if granularity == "block" else None
    per_expert = [quantize_weight(w[e], qdtype, granularity, shape, gate_rows=gate_rows) for e in range(num_experts)]
    return torch.stack([q for q, _ in per_expert]), torch.stack([s for _, s in per_expert])


def _acts(a, qdtype, granularity):
    gran, group = ACT[granularity]
    if granularity == "block":
        group = BLOCK[1]
    return act_quant(a, qdtype, gran, group)


@pytest.mark.parametrize("qdtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("activation", ["silu", "relu2"])
@pytest.mark.parametrize("block_n", [32, 64, 128])
def test_gemm1_gathers_and_activates(qdtype, granularity, activation, block_n):
    # Block scales, gated: block_n 64 = 32 outputs, one scale row a half-tile (gate and up as two dots); 32 (16
    # outputs, kept as one dot) and 128 (wider than bn = 32): a scale row per column.
    # Gated: I = 40 is not a multiple of bn = 32, so gate and up rows have their own scale rows; K = 200 ragged
    # (last K tile and last scale group short); bias in the epilogue; rows gathered by a_row_div = K.
    act = Activation(name=activation)
    num_tokens, top_k, num_experts, inter, k_dim = 9, 2, 4, 40, 200
    n_b = act.w13_rows(inter)
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    layout = align_ref(ids, num_experts, 16)
    b_q, b_s = _weights(num_experts, n_b, k_dim, qdtype, granularity, inter if act.is_gated else None)
    a_q, a_s = _acts(torch.randn(num_tokens, k_dim), qdtype, granularity)
    bias = torch.randn(num_experts, n_b)
    num_rows = ids.numel()
    kw = dict(granularity=granularity, block_shape=BLOCK if granularity == "block" else None, num_rows=num_rows,
              a_row_div=top_k, bias_EN=bias, activation=act)
    out = torch.full((num_rows, inter), float("nan"))
    grouped_gemm_w8a8(a_q, a_s, b_q, b_s, layout, out, replace(SMALL, block_n=block_n), **kw)
    want = grouped_gemm_w8a8_ref(a_q, a_s, b_q, b_s, layout, torch.empty(num_rows, inter), **kw)
    assert_close(out, want, torch.float32)


@pytest.mark.parametrize("qdtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize(("block_n", "block_k"), [(32, 32), (64, 32), (32, 256)])
def test_gemm2_weights_and_split_k(qdtype, granularity, split_k, block_n, block_k):
    # Rows read one to one with routing weights; split-K partials cross scale groups (k_per_split = 96 with
    # bk = 64): each K tile still lies in one group. K steps of 256: block scales as sub-tiles of one group each,
    # fp8 channel/tensor as two 128-wide sub-tiles (each product added in fp32), int8 as one exact dot; the last
    # step ragged (K = 264).
    num_tokens, top_k, num_experts, hidden, k_dim = 11, 3, 5, 48, 264
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    layout = align_ref(ids, num_experts, 16)
    num_rows = ids.numel()
    b_q, b_s = _weights(num_experts, hidden, k_dim, qdtype, granularity)
    a_q, a_s = _acts(torch.randn(num_rows, k_dim), qdtype, granularity)
    weights = torch.rand(num_rows)
    bias = torch.randn(num_experts, hidden)
    cfg = GemmConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_stages=2)
    kw = dict(granularity=granularity, block_shape=BLOCK if granularity == "block" else None, num_rows=num_rows,
              bias_EN=bias, weights_N=weights)
    out = torch.full((split_k, num_rows, hidden), float("nan"))
    grouped_gemm_w8a8(a_q, a_s, b_q, b_s, layout, out if split_k > 1 else out[0], cfg, **kw)
    want = grouped_gemm_w8a8_ref(a_q, a_s, b_q, b_s, layout, torch.empty(num_rows, hidden), **kw)
    assert_close(out.sum(0), want, torch.float32)


def test_row_per_block_and_a_k_tile_of_two_scale_groups():
    # Decode layout (one routed row per block, no align) and a config whose BLOCK_K = 128 spans two groups of
    # bk = 64: the kernel scales each group's half of the tile on its own.
    num_experts, inter, k_dim, top_k = 6, 64, 256, 3
    ids = torch.randperm(num_experts)[:top_k][None]
    layout = row_per_block(ids.int(), 16)
    b_q, b_s = _weights(num_experts, 2 * inter, k_dim, "fp8_e4m3", "block", inter)
    a_q, a_s = _acts(torch.randn(1, k_dim), "fp8_e4m3", "block")
    kw = dict(granularity="block", block_shape=BLOCK, num_rows=top_k, a_row_div=top_k,
              activation=Activation(name="silu"))
    out = torch.full((top_k, inter), float("nan"))
    grouped_gemm_w8a8(a_q, a_s, b_q, b_s, layout, out, GemmConfig(block_n=64, block_k=128), **kw)
    want = grouped_gemm_w8a8_ref(a_q, a_s, b_q, b_s, layout, torch.empty(top_k, inter), **kw)
    assert_close(out, want, torch.float32)


def test_bad_inputs_name_the_argument():
    ids = torch.tensor([[0], [1]])
    layout = align_ref(ids, 2, 16)
    b_q, b_s = _weights(2, 32, 64, "fp8_e4m3", "channel")
    a_q, a_s = _acts(torch.randn(2, 64), "fp8_e4m3", "channel")
    out = torch.empty(2, 32)
    kw = dict(granularity="channel", num_rows=2)
    with pytest.raises(ValueError, match="a_q, b_ENK"):
        grouped_gemm_w8a8(a_q.view(torch.int8), a_s, b_q, b_s, layout, out, SMALL, **kw)
    with pytest.raises(ValueError, match="a_scale"):
        grouped_gemm_w8a8(a_q, a_s[:, :0], b_q, b_s, layout, out, SMALL, **kw)
    with pytest.raises(ValueError, match="b_scale"):
        grouped_gemm_w8a8(a_q, a_s, b_q, b_s.double(), layout, out, SMALL, **kw)
    with pytest.raises(ValueError, match="block_shape"):
        grouped_gemm_w8a8(a_q, a_s, b_q, b_s, layout, out, SMALL, granularity="block", num_rows=2)
    with pytest.raises(ValueError, match="granularity"):
        grouped_gemm_w8a8(a_q, a_s, b_q, b_s, layout, out, SMALL, granularity="group", num_rows=2)


@pytest.mark.parametrize("bk", [8, 16])
def test_scale_groups_narrower_than_an_8bit_dot_are_refused(bk):
    # Triton's 8-bit dot needs K >= 32 on the GPU: a K tile (or sub-tile) inside a 16-wide group cannot run.
    ids = torch.tensor([[0]])
    layout = align_ref(ids, 1, 16)
    b_q, b_s = (t[None] for t in quantize_weight(torch.randn(32, 64), "fp8_e4m3", "block", (32, bk)))
    a_q, a_s = act_quant(torch.randn(1, 64), "fp8_e4m3", "group", bk)
    with pytest.raises(ValueError, match=f"block_shape: bk = {bk} needs a K tile"):
        grouped_gemm_w8a8(a_q, a_s, b_q, b_s, layout, torch.empty(1, 32), GemmConfig(block_n=32, block_k=256),
                          granularity="block", block_shape=(32, bk), num_rows=1)


@pytest.mark.parametrize("qdtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("block_k", [128, 256])
def test_k_tiles_spanning_scale_groups(qdtype, block_k):
    # BLOCK_K = 2 or 4 groups of bk = 64. GEMM 1 gated (one dot and two-dot tiles) with a ragged K = 200 (the last
    # tile's second half partly past K); GEMM 2 split 3 ways over K = 264, whose last split starts a tile at 256:
    # sub-tiles wholly past K must add nothing and read no scale past the last group.
    act = Activation(name="silu")
    num_tokens, top_k, num_experts, inter, k_dim = 7, 2, 4, 64, 200
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    layout = align_ref(ids, num_experts, 16)
    num_rows = ids.numel()
    b_q, b_s = _weights(num_experts, 2 * inter, k_dim, qdtype, "block", inter)
    a_q, a_s = _acts(torch.randn(num_tokens, k_dim), qdtype, "block")
    kw = dict(granularity="block", block_shape=BLOCK, num_rows=num_rows, a_row_div=top_k, activation=act)
    for block_n in (32, 128):
        out = torch.full((num_rows, inter), float("nan"))
        grouped_gemm_w8a8(a_q, a_s, b_q, b_s, layout, out, replace(SMALL, block_n=block_n, block_k=block_k), **kw)
        want = grouped_gemm_w8a8_ref(a_q, a_s, b_q, b_s, layout, torch.empty(num_rows, inter), **kw)
        assert_close(out, want, torch.float32, name=f"gemm1 block_n {block_n}")
    hidden, k_dim, split = 48, 264, 3
    b_q, b_s = _weights(num_experts, hidden, k_dim, qdtype, "block")
    a_q, a_s = _acts(torch.randn(num_rows, k_dim), qdtype, "block")
    # The scales as views with a NaN group after the last: a read past the last group shows in the output.
    a_s, b_s = (torch.cat([t, torch.full_like(t[..., :1], float("nan"))], dim=-1)[..., :-1] for t in (a_s, b_s))
    weights = torch.rand(num_rows)
    kw = dict(granularity="block", block_shape=BLOCK, num_rows=num_rows, weights_N=weights)
    out = torch.full((split, num_rows, hidden), float("nan"))
    grouped_gemm_w8a8(a_q, a_s, b_q, b_s, layout, out, GemmConfig(block_n=32, block_k=block_k, split_k=split,
                                                                 num_stages=2), **kw)
    want = grouped_gemm_w8a8_ref(a_q, a_s, b_q, b_s, layout, torch.empty(num_rows, hidden), **kw)
    assert_close(out.sum(0), want, torch.float32, name="gemm2 split 3")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("qdtype", "granularity"), [("int8", "block"), ("fp8_e4m3", "block"),
                                                     ("fp8_e4m3", "channel"), ("fp8_e4m3", "tensor"),
                                                     ("int8", "channel")])
@pytest.mark.parametrize("block_k", [128, 256])
def test_gpu_compiles_and_matches(qdtype, granularity, block_k):
    # Compiled for the GPU (the interpreter runs code the compiler refuses: an int8 block-mode dot once did not
    # compile), DeepSeek-V3's 128 x 128 blocks, K steps of one and two groups, ragged K and N.
    torch.manual_seed(0)
    num_tokens, top_k, num_experts, hidden, k_dim = 37, 2, 6, 320, 1000
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    layout = align_ref(ids, num_experts, 16)
    w = torch.randn(num_experts, hidden, k_dim) * k_dim**-0.5
    shape = (128, 128) if granularity == "block" else None
    device = "cuda"
    per_expert = [quantize_weight(w[e], qdtype, granularity, shape) for e in range(num_experts)]
    b_q, b_s = torch.stack([q for q, _ in per_expert]), torch.stack([s for _, s in per_expert])
    gran, group = {"tensor": ("tensor", None), "channel": ("token", None), "block": ("group", 128)}[granularity]
    # Quantized where they run (act_quant takes its Triton kernel for any tensor when a GPU is present).
    a_q, a_s = act_quant(torch.randn(num_tokens * top_k, k_dim, device=device), qdtype, gran, group)
    kw = dict(granularity=granularity, block_shape=shape, num_rows=num_tokens * top_k)
    want = grouped_gemm_w8a8_ref(a_q.cpu(), a_s.cpu(), b_q, b_s, layout, torch.empty(num_tokens * top_k, hidden),
                                 **kw)
    on_device = [t.to(device) for t in (a_q, a_s, b_q, b_s)]
    out = torch.full((num_tokens * top_k, hidden), float("nan"), device=device)
    grouped_gemm_w8a8(*on_device, align_ref(ids.to(device), num_experts, 16), out,
                      GemmConfig(block_n=64, block_k=block_k, num_stages=3), **kw)
    # int8 dots are exact; fp8 MMAs accumulate each (at most 128-wide) product in reduced precision.
    assert_close(out.cpu(), want, torch.float32 if qdtype == "int8" else torch.bfloat16)
