"""grouped_gemm vs grouped_gemm_ref over align_ref layouts; outputs poisoned with NaN so unwritten rows show.

fp16/fp32 only: the interpreter's bf16 tl.dot is wrong (bf16 runs in the GPU tests).
"""

import pytest
import torch

from moekit.ops.activation import ACTIVATIONS, Activation
from moekit.ops.align import align_ref, row_per_block
from moekit.ops.grouped_gemm import grouped_gemm, grouped_gemm_ref
from moekit.ops.heuristics import GemmConfig
from moekit.testing import assert_close

SMALL = GemmConfig(block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2)


def _case(num_tokens, top_k, num_experts, n_b, k_dim, dtype, block_m=16, expert_map=None):
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    layout = align_ref(ids, num_experts, block_m, expert_map=expert_map)
    a = torch.randn(num_tokens, k_dim).to(dtype)
    b = (torch.randn(num_experts, n_b, k_dim) * k_dim**-0.5).to(dtype)
    return ids, layout, a, b


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gemm1_fused_activation_and_bias(activation):
    # Gather token rows (a_row_div = K), odd K dim (ragged last K tile), odd I, bias in the epilogue.
    act = Activation(name=activation)
    inter, top_k = 23, 2
    ids, layout, x, w13 = _case(9, top_k, 4, act.w13_rows(inter), 37, torch.float16)
    bias = torch.randn(4, act.w13_rows(inter)).to(torch.float16)
    num_rows = ids.numel()
    out = torch.full((num_rows, inter), float("nan"), dtype=torch.float16)
    grouped_gemm(x, w13, layout, out, SMALL, num_rows=num_rows, a_row_div=top_k, bias_EN=bias, activation=act)
    want = grouped_gemm_ref(x, w13, layout, torch.empty(num_rows, inter), num_rows=num_rows, a_row_div=top_k,
                            bias_EN=bias, activation=act)
    assert_close(out, want, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemm2_weights_and_split_k(dtype, split_k):
    # Rows read one to one, routing weight per row; split-K partials (one holds the bias) sum to the result.
    ids, layout, a, w2 = _case(11, 3, 5, 40, 96, dtype)
    num_rows = ids.numel()
    a = torch.randn(num_rows, 96).to(dtype)
    weights = torch.rand(num_rows)
    bias = torch.randn(5, 40).to(dtype)
    cfg = GemmConfig(block_n=32, block_k=32, split_k=split_k, num_stages=2)
    out = torch.full((split_k, num_rows, 40), float("nan"), dtype=torch.float32)
    grouped_gemm(a, w2, layout, out if split_k > 1 else out[0], cfg, num_rows=num_rows, bias_EN=bias,
                 weights_N=weights)
    want = grouped_gemm_ref(a, w2, layout, torch.empty(num_rows, 40), num_rows=num_rows, bias_EN=bias,
                            weights_N=weights)
    assert_close(out.sum(0), want, dtype)


def test_rows_of_dropped_experts_untouched():
    # Experts mapped to -1 own no slot: their rows keep the poison; every other row is written.
    emap = torch.tensor([0, -1, 1, -1, 2], dtype=torch.int32)
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(8)])
    layout = align_ref(ids, 3, 16, expert_map=emap)
    x = torch.randn(8, 32, dtype=torch.float16)
    w = torch.randn(3, 16, 32, dtype=torch.float16)
    out = torch.full((16, 16), float("nan"), dtype=torch.float16)
    grouped_gemm(x, w, layout, out, SMALL, num_rows=16, a_row_div=2)
    dropped = (emap[ids.flatten()] < 0)
    assert torch.isnan(out[dropped]).all() and torch.isfinite(out[~dropped]).all()


def test_one_expert_many_blocks_and_empty_experts():
    # All 40 rows on expert 2 (several blocks of one expert, GROUP_M swizzle across them); experts 0,1,3 empty.
    ids = torch.full((40, 1), 2)
    layout = align_ref(ids, 4, 16)
    x = torch.randn(40, 64, dtype=torch.float16)
    w = torch.randn(4, 48, 64, dtype=torch.float16) / 8
    out = torch.full((40, 48), float("nan"), dtype=torch.float16)
    grouped_gemm(x, w, layout, out, SMALL, num_rows=40)
    assert_close(out, x.float() @ w[2].float().t(), torch.float16)


def test_row_per_block_layout_matches_aligned():
    # T = 1 path: one routed row per block read straight from topk_ids (int64 ids, K distinct experts, gated).
    act = Activation(name="silu")
    ids = torch.tensor([[5, 0, 3]])
    x = torch.randn(1, 24).to(torch.float16)
    w13 = (torch.randn(6, 2 * 20, 24) * 0.2).to(torch.float16)
    out = torch.full((3, 20), float("nan"), dtype=torch.float16)
    grouped_gemm(x, w13, row_per_block(ids, 16), out, SMALL, num_rows=3, a_row_div=3, activation=act)
    want = grouped_gemm_ref(x, w13, align_ref(ids.int(), 6, 16), torch.empty(3, 20), num_rows=3, a_row_div=3,
                            activation=act)
    assert_close(out, want, torch.float16)
    assert_close(grouped_gemm_ref(x, w13, row_per_block(ids, 16), torch.empty(3, 20), num_rows=3, a_row_div=3,
                                  activation=act), want, torch.float32)


@pytest.mark.parametrize("gated", [False, True])
def test_half_tail_tiles(gated):
    # Block 32: expert 0 has 40 rows (tail of 8 <= 16: half tile), expert 1 has 27 (tail 27 > 16: full tile),
    # expert 2 has 16 (exactly half: half tile), expert 3 none; a gated GEMM1 and a weighted GEMM2.
    ids = torch.cat([torch.full((40,), 0), torch.full((27,), 1), torch.full((16,), 2)])[torch.randperm(83)][:, None]
    layout = align_ref(ids, 4, 32)
    act = Activation(name="silu") if gated else None
    n_out, k_dim = 24, 40
    x = torch.randn(83, k_dim).to(torch.float16)
    w = (torch.randn(4, 2 * n_out if gated else n_out, k_dim) * k_dim**-0.5).to(torch.float16)
    weights = None if gated else torch.rand(83)
    cfg = GemmConfig(block_n=32, block_k=16, group_m=2, num_stages=2, half_tail=True)
    out = torch.full((83, n_out), float("nan"), dtype=torch.float16)
    grouped_gemm(x, w, layout, out, cfg, num_rows=83, weights_N=weights, activation=act)
    want = grouped_gemm_ref(x, w, layout, torch.empty(83, n_out), num_rows=83, weights_N=weights, activation=act)
    assert_close(out, want, torch.float16)


@pytest.mark.parametrize("activation", [*ACTIVATIONS, "silu_limit"])
def test_nan_input_row_stays_nan(activation):
    # torch's clamp/relu propagate NaN (the _ref twin does); a min/max that drops NaN would turn a blown-up token
    # into finite garbage for the clamped activations and relu2. Other rows must stay finite.
    act = Activation(name="silu", limit=1.0) if activation == "silu_limit" else Activation(name=activation)
    ids = torch.tensor([[0], [1], [0]])
    layout = align_ref(ids, 2, 16)
    x = torch.randn(3, 32)
    x[1, 3] = float("nan")
    w = torch.randn(2, act.w13_rows(16), 32) / 8
    out = torch.zeros(3, 16)
    grouped_gemm(x, w, layout, out, SMALL, num_rows=3, activation=act)
    want = grouped_gemm_ref(x, w, layout, torch.zeros(3, 16), num_rows=3, activation=act)
    assert bool(want[1].isnan().all()) and bool(out[1].isnan().all())
    assert_close(out[[0, 2]], want[[0, 2]], torch.float32)
