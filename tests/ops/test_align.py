"""align vs align_ref: integer metadata compared exactly, outputs poisoned so an unwritten slot shows."""

import pytest
import torch

from moekit.ops.align import AlignResult, align, align_num_blocks, align_ref


def _distinct_ids(num_tokens: int, top_k: int, num_experts: int) -> torch.Tensor:
    return torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).to(torch.int32)


def _poisoned(num_rows: int, num_experts: int, block_m: int) -> AlignResult:
    nb = align_num_blocks(num_rows, num_experts, block_m)
    return AlignResult(
        sorted_ids=torch.full((nb * block_m,), -7, dtype=torch.int32),
        expert_ids=torch.full((nb,), -7, dtype=torch.int32),
        num_padded=torch.full((1,), -7, dtype=torch.int32),
        block_m=block_m,
    )


def _check(ids: torch.Tensor, num_experts: int, block_m: int, expert_map=None) -> AlignResult:
    got = align(ids, num_experts, block_m, expert_map=expert_map, out=_poisoned(ids.numel(), num_experts, block_m))
    want = align_ref(ids, num_experts, block_m, expert_map=expert_map)
    for field in ("sorted_ids", "expert_ids", "num_padded"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    return got


@pytest.mark.parametrize(
    "num_tokens, top_k, num_experts, block_m",
    [
        (1, 2, 8, 16),      # T = 1: one block per routed row
        (7, 3, 5, 16),      # odd T, prime E
        (33, 4, 4, 32),     # top_k = E: every expert gets every token
        (5, 8, 256, 16),    # E >= 256: most experts empty
        (700, 2, 8, 64),    # two chunks in the single-program path
        (160, 8, 64, 16),   # > 2 chunks: count kernel + cumsum + scatter path
        (16, 8, 128, 16),   # E = 128 at decode: half-size one-hot tiles, 4 chunks, the multi-program path
        (9, 1, 3, 128),     # top_k = 1, block_m > N
    ],
)
def test_align_matches_ref(num_tokens, top_k, num_experts, block_m):
    _check(_distinct_ids(num_tokens, top_k, num_experts), num_experts, block_m)


def test_align_all_tokens_one_expert():
    # Every row on expert 3 (top_k = 1): one expert holds N rows, the others none.
    got = _check(torch.full((50, 1), 3, dtype=torch.int32), 8, 16)
    assert int(got.num_padded) == 64


@pytest.mark.parametrize("num_tokens", [3, 200])  # single-program and multi-program paths
def test_align_expert_map_drops_rows(num_tokens):
    # 16 global experts, 6 local; rows of the other 10 are dropped.
    emap = torch.full((16,), -1, dtype=torch.int32)
    emap[torch.tensor([1, 4, 6, 9, 12, 15])] = torch.arange(6, dtype=torch.int32)
    ids = _distinct_ids(num_tokens, 8, 16)
    got = _check(ids, 6, 16, expert_map=emap)
    kept = int((emap[ids.long()] >= 0).sum())
    assert int((got.sorted_ids < ids.numel()).sum()) == kept


def test_align_no_local_rows():
    # Nothing routed to this rank: zero padded rows, every block unused.
    emap = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)
    got = _check(torch.tensor([[0, 1], [1, 0]], dtype=torch.int32), 2, 16, expert_map=emap)
    assert int(got.num_padded) == 0 and bool((got.expert_ids == -1).all())


def test_align_empty_input():
    got = align(torch.empty(0, 2, dtype=torch.int32), 4, 16)
    assert int(got.num_padded) == 0 and got.sorted_ids.numel() == 0


def test_align_int64_ids():
    ids = _distinct_ids(6, 2, 8).long()
    _check(ids, 8, 16)


@pytest.mark.parametrize("num_tokens", [3, 84])  # the single-program path and the count + scatter path
def test_align_uint8_ids_with_256_experts(num_tokens):
    # Masked tail rows were loaded as -1, which a uint8 load reads as 255: a real expert at E = 256, so every tail
    # row was counted and scattered past the end of sorted_ids (garbage outputs, a heap corruption once).
    ids = _distinct_ids(num_tokens, 2, 256).to(torch.uint8)
    _check(ids, 256, 16)
