"""grouped_wgrad (Triton, interpreter on CPU) against its torch twin and a row-by-row outer-product loop."""

import pytest
import torch

from moekit.ops.align import align, row_per_block
from moekit.ops.grouped_wgrad import expert_block_start, grouped_wgrad, grouped_wgrad_ref
from moekit.ops.heuristics import GemmConfig
from moekit.testing import assert_close


def _loop(g, x, ids_N, num_experts, g_div, x_div, w_N, emap=None):
    """The definition, one routed row at a time, in fp64."""
    out = torch.zeros(num_experts, g.shape[1], x.shape[1], dtype=torch.float64)
    bias = torch.zeros(num_experts, g.shape[1], dtype=torch.float64)
    for r, e in enumerate(ids_N.tolist()):
        e = e if emap is None else int(emap[e])
        if e < 0:
            continue
        g_r = g[r // g_div].double() * (1.0 if w_N is None else float(w_N[r]))
        out[e] += torch.outer(g_r, x[r // x_div].double())
        bias[e] += g_r
    return out, bias


@pytest.mark.parametrize(
    "num_tokens, top_k, num_experts, n, k, block_m, g_div, x_div, weighted",
    [
        (13, 3, 6, 40, 24, 16, 3, 1, True),    # dW2 shape: G gathered per token, per-row weights; odd T
        (13, 3, 6, 24, 40, 16, 1, 3, False),   # dW13 shape: X gathered per token
        (1, 2, 8, 33, 19, 16, 1, 2, True),     # T = 1, odd n and k (ragged tiles)
        (40, 1, 3, 32, 16, 32, 1, 1, False),   # top_k = 1, several blocks per expert
        (5, 8, 256, 16, 16, 16, 8, 1, True),   # E >= 256: most experts have no row (zeros)
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_definition(num_tokens, top_k, num_experts, n, k, block_m, g_div, x_div, weighted, dtype):
    gen = torch.Generator().manual_seed(num_tokens)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)]).int()
    num_rows = num_tokens * top_k
    g = torch.randn(-(-num_rows // g_div), n, generator=gen).to(dtype)
    x = torch.randn(-(-num_rows // x_div), k, generator=gen).to(dtype)
    w_N = torch.rand(num_rows, generator=gen) if weighted else None
    layout = align(ids, num_experts, block_m)
    out = torch.full((num_experts, n, k), float("nan"), dtype=dtype)  # poisoned: every element must be written
    bias = torch.full((num_experts, n), float("nan"), dtype=dtype)
    kw = {"num_rows": num_rows, "g_row_div": g_div, "x_row_div": x_div, "weights_N": w_N, "bias_grad_EN": bias}
    grouped_wgrad(g, x, layout, out, **kw, config=GemmConfig(block_n=32, block_k=16, num_stages=2))
    want, want_bias = _loop(g, x, ids.flatten(), num_experts, g_div, x_div, w_N)
    assert_close(out, want, dtype)
    assert_close(bias, want_bias, dtype, name="bias grad")
    ref, ref_bias = torch.empty_like(out), torch.empty_like(bias)
    grouped_wgrad_ref(g, x, layout, ref, **{**kw, "bias_grad_EN": ref_bias})
    assert_close(ref, want, dtype, name="ref")
    assert_close(ref_bias, want_bias, dtype, name="ref bias grad")


def test_expert_map_and_all_rows_on_one_expert():
    # Remote rows (-1) are left out; every local row on expert 1, experts 0 and 2 empty.
    ids = torch.tensor([[4, 1], [4, 5], [0, 4]], dtype=torch.int32)
    emap = torch.tensor([-1, -1, -1, -1, 1, -1], dtype=torch.int32)
    layout = align(ids, 3, 16, expert_map=emap)
    g, x = torch.randn(6, 8), torch.randn(6, 4)
    out = torch.empty(3, 8, 4)
    grouped_wgrad(g, x, layout, out, num_rows=6)
    want, _ = _loop(g, x, ids.flatten(), 3, 1, 1, None, emap)
    assert_close(out, want, torch.float32)
    assert bool((out[[0, 2]] == 0).all())


def test_expert_block_start():
    ids = torch.tensor([[2, 0], [2, 2]], dtype=torch.int32)
    layout = align(ids, 4, 16)  # expert 0: one block, 1: none, 2: one block, 3: none
    assert expert_block_start(layout, 4).tolist() == [0, 1, 1, 2, 2]


def test_validation():
    ids = torch.tensor([[0, 1]], dtype=torch.int32)
    layout = align(ids, 2, 16)
    g, x = torch.randn(2, 8), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"out_ENK: expected \[E, 8, 4\]"):
        grouped_wgrad(g, x, layout, torch.empty(2, 4, 8), num_rows=2)
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        grouped_wgrad(g, x.half(), layout, torch.empty(2, 8, 4), num_rows=2)
    with pytest.raises(ValueError, match="g: expected at least 2 rows"):
        grouped_wgrad(g[:1], x, layout, torch.empty(2, 8, 4), num_rows=2)
    with pytest.raises(ValueError, match="row-per-block"):
        grouped_wgrad(g, x, row_per_block(ids, 16), torch.empty(2, 8, 4), num_rows=2)
    with pytest.raises(ValueError, match="out_ENK: expected a contiguous last dim"):
        grouped_wgrad(g, x, layout, torch.empty(2, 4, 8).transpose(1, 2), num_rows=2)
