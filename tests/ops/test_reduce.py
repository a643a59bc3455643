"""topk_reduce vs topk_reduce_ref; rows that must not be read are poisoned with NaN."""

import pytest
import torch

from moekit.ops.reduce import topk_reduce, topk_reduce_ref
from moekit.testing import assert_close


@pytest.mark.parametrize(
    "num_tokens, top_k, hidden, splits",
    [
        (1, 1, 16, 1),      # T = 1, top_k = 1
        (7, 3, 45, 1),      # odd T, odd H, K not a power of two
        (5, 8, 1500, 2),    # H over one tile (two programs per token), split-K partials
        (2, 8, 100, 40),    # the fused decode's many partials: two loads of 32 (the second ragged)
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reduce_matches_ref(num_tokens, top_k, hidden, splits, dtype):
    y = torch.randn(splits, num_tokens * top_k, hidden)
    out = torch.full((num_tokens, hidden), float("nan"), dtype=dtype)
    topk_reduce(y, top_k, out)
    want = topk_reduce_ref(y, top_k, torch.empty(num_tokens, hidden, dtype=torch.float64))
    assert_close(out, want, dtype)


def test_reduce_skips_rows_of_other_ranks():
    num_tokens, top_k, hidden = 6, 2, 24
    ids = torch.tensor([[0, 3], [1, 2], [3, 3], [2, 0], [1, 1], [0, 2]], dtype=torch.int32)
    emap = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    y = torch.randn(num_tokens * top_k, hidden)
    y[(emap[ids.long()] < 0).flatten()] = float("nan")  # never written by the GEMMs: must not be read
    out = torch.full((num_tokens, hidden), float("nan"))
    topk_reduce(y, top_k, out, topk_ids_TK=ids, expert_map=emap, num_experts=2)
    want = topk_reduce_ref(y, top_k, torch.empty(num_tokens, hidden), topk_ids_TK=ids, expert_map=emap, num_experts=2)
    assert torch.isfinite(out).all()
    assert_close(out, want, torch.float32)
    assert torch.equal(out[2], torch.zeros(hidden))  # token 2 has no local expert


def test_reduce_is_deterministic():
    y = torch.randn(64 * 4, 96)
    a = topk_reduce(y, 4, torch.empty(64, 96))
    b = topk_reduce(y, 4, torch.empty(64, 96))
    assert torch.equal(a, b)
