"""Host-side argument checks of the public ops: a wrong call raises an error naming the argument and the expected
and actual shape/dtype, instead of reading or writing out of bounds, or silently computing something else."""

import pytest
import torch

from moekit.ops.activation import Activation
from moekit.ops.align import AlignResult, align, align_num_blocks, align_ref
from moekit.ops.grouped_gemm import grouped_gemm, grouped_gemm_ref
from moekit.ops.heuristics import GemmConfig
from moekit.ops.reduce import topk_reduce

CFG = GemmConfig(block_n=32, block_k=32, num_stages=2)


def _gemm_args(num_tokens=6, top_k=2, num_experts=3, n_b=24, k_dim=32):
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    layout = align_ref(ids, num_experts, 16)
    x = torch.randn(num_tokens, k_dim)
    w = torch.randn(num_experts, n_b, k_dim) / 8
    return ids, layout, x, w


def test_grouped_gemm_non_contiguous_bias_and_weights_are_not_misread():
    # The kernel reads bias rows and the per-row weights as dense vectors: a strided view was read at the wrong
    # addresses (a silently wrong result). Such views must be refused with the argument named.
    ids, layout, x, w = _gemm_args()
    num_rows = ids.numel()
    bias = torch.randn(24, 3).t()  # [E, n] with a column stride of 3
    out = torch.zeros(num_rows, 24)
    with pytest.raises(ValueError, match="bias_EN"):
        grouped_gemm(x, w, layout, out, CFG, num_rows=num_rows, a_row_div=2, bias_EN=bias)
    weights = torch.rand(num_rows, 2)[:, 0]  # [N] with a stride of 2
    a = torch.randn(num_rows, 32)
    with pytest.raises(ValueError, match="weights_N"):
        grouped_gemm(a, w, layout, out, CFG, num_rows=num_rows, weights_N=weights)
    # The dense versions give the reference result.
    grouped_gemm(a, w, layout, out, CFG, num_rows=num_rows, bias_EN=bias.contiguous(), weights_N=weights.contiguous())
    want = grouped_gemm_ref(a, w, layout, torch.empty(num_rows, 24), num_rows=num_rows, bias_EN=bias,
                            weights_N=weights)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(out=torch.zeros(5, 24)), r"out: expected \[1, 12, 24\]"),            # fewer rows than N: OOB writes
        (dict(a=torch.randn(5, 32)), r"a: expected at least 6 rows"),             # fewer rows than N / a_row_div
        (dict(a=torch.randn(6, 32, dtype=torch.float16)), r"a: expected dtype float32 \(the dtype of b_ENK\)"),
        (dict(bias_EN=torch.randn(3, 12)), r"bias_EN: expected shape \(3, 24\)"),
        (dict(weights_N=torch.rand(13)), r"weights_N: expected shape \(12,\)"),
        (dict(b_ENK=torch.randn(3, 23, 32), activation=Activation(name="silu"), out=torch.zeros(12, 11)),
         r"b_ENK: gated activation 'silu' needs an even row count"),
    ],
    ids=["out_rows", "a_rows", "a_dtype", "bias_shape", "weights_shape", "odd_gated_rows"],
)
def test_grouped_gemm_rejects_bad_arguments(change, match):
    ids, layout, x, w = _gemm_args()
    kw = dict(a=x, b_ENK=w, layout=layout, out=torch.zeros(12, 24), config=CFG, num_rows=12, a_row_div=2)
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        grouped_gemm(**kw)


def test_topk_reduce_rejects_bad_arguments():
    y = torch.randn(12, 16)
    out = torch.empty(6, 16)
    ids = torch.randint(0, 4, (6, 2), dtype=torch.int32)
    emap = torch.tensor([0, -1, 1, 2], dtype=torch.int32)
    # expert_map without num_experts: every row counted as remote, an all-zero output.
    with pytest.raises(ValueError, match="num_experts: expected a positive int with expert_map, got 0"):
        topk_reduce(y, 2, out, topk_ids_TK=ids, expert_map=emap)
    with pytest.raises(ValueError, match=r"topk_ids_TK: expected shape \(6, 2\)"):
        topk_reduce(y, 2, out, topk_ids_TK=ids[:3], expert_map=emap, num_experts=3)
    with pytest.raises(ValueError, match="out_TH: expected a contiguous last dim"):
        topk_reduce(y, 2, torch.empty(16, 6).t())


def test_align_rejects_bad_arguments():
    ids = torch.randint(0, 4, (10, 2), dtype=torch.int32)
    with pytest.raises(TypeError, match="topk_ids_TK: expected an integer dtype"):
        align(ids.float(), 4, 16)
    with pytest.raises(ValueError, match="num_experts: expected a positive int, got 0"):
        align(ids, 0, 16)
    nb = align_num_blocks(20, 4, 16)
    small = AlignResult(sorted_ids=torch.empty(nb * 16 - 16, dtype=torch.int32),
                        expert_ids=torch.empty(nb, dtype=torch.int32), num_padded=torch.empty(1, dtype=torch.int32),
                        block_m=16)
    with pytest.raises(ValueError, match=rf"out.sorted_ids: expected shape \({nb * 16},\)"):
        align(ids, 4, 16, out=small)
    with pytest.raises(ValueError, match="out.block_m: expected 16"):
        align(ids, 4, 16, out=AlignResult(sorted_ids=torch.empty(nb * 16, dtype=torch.int32),
                                          expert_ids=torch.empty(nb, dtype=torch.int32),
                                          num_padded=torch.empty(1, dtype=torch.int32), block_m=32))
    big = torch.randint(0, 4, (3000, 2), dtype=torch.int32)  # the multi-program path, which uses scratch
    with pytest.raises(ValueError, match="scratch: expected an int32 tensor of at least"):
        align(big, 4, 16, scratch=torch.empty(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="expert_map: expected a 1-d tensor"):
        align(ids, 4, 16, expert_map=torch.zeros(2, 2, dtype=torch.int32))


def test_bf16_dots_in_the_interpreter_are_refused():
    # Triton's CPU interpreter computes bf16 tl.dot wrongly (~1e10, no error): each op with a dot refuses bf16
    # CPU tensors naming the argument (fp16 runs and is right: the other tests).
    from moekit.ops.fused_decode import fused_decode
    from moekit.ops.grouped_gemm_wna16 import grouped_gemm_wna16
    from moekit.ops.grouped_wgrad import grouped_wgrad
    from moekit.ops.heuristics import FusedDecodeConfig
    from moekit.ops.quantize_wna16 import quantize_wna16

    ids, layout, x, w = _gemm_args()
    bf = torch.bfloat16
    num_rows = ids.numel()
    msg = "bfloat16 on cpu runs in Triton's CPU interpreter"
    with pytest.raises(ValueError, match=f"a: {msg}"):
        grouped_gemm(x.to(bf), w.to(bf), layout, torch.empty(num_rows, 24, dtype=bf), CFG, num_rows=num_rows,
                     a_row_div=2)
    with pytest.raises(ValueError, match=f"a: {msg}"):
        grouped_gemm_wna16(x.to(bf), quantize_wna16(w, 4, 32, True), layout, torch.empty(num_rows, 24, dtype=bf),
                           CFG, num_rows=num_rows, a_row_div=2)
    with pytest.raises(ValueError, match=f"x: {msg}"):
        grouped_wgrad(torch.randn(num_rows, 24).to(bf), x.to(bf), layout, torch.empty(3, 24, 32, dtype=bf),
                      num_rows=num_rows, x_row_div=2)
    act = Activation(name="silu")
    with pytest.raises(ValueError, match=f"x_TH: {msg}"):
        fused_decode(x.to(bf), torch.randn(3, 48, 32).to(bf), torch.randn(3, 32, 24).to(bf), torch.rand(6, 2),
                     ids, torch.empty(1, num_rows, 32), FusedDecodeConfig(block_i=32), activation=act)
