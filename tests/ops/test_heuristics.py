"""Launch-config heuristics: valid for every preset and token count; tuned tables override them."""

import json
from dataclasses import replace

import pytest

from moekit.ops import heuristics
from moekit.ops.heuristics import MoEKernelConfig, MoEShape, choose_config, heuristic_config

PRESETS = [(8, 4096, 14336, 2), (128, 2048, 768, 8), (256, 7168, 2048, 8), (128, 2880, 2880, 4), (64, 2048, 1024, 8)]


@pytest.mark.parametrize("num_experts, hidden, inter, top_k", PRESETS)
@pytest.mark.parametrize("num_tokens", [1, 4, 16, 64, 256, 1024, 4096, 16384])
def test_heuristic_configs_are_valid(num_experts, hidden, inter, top_k, num_tokens):
    cfg = heuristic_config(MoEShape(num_tokens=num_tokens, top_k=top_k, num_experts=num_experts, hidden=hidden,
                                    inter=inter))
    assert cfg.gemm1.split_k == 1
    assert MoEKernelConfig.from_dict(cfg.to_dict()) == cfg
    if num_tokens * top_k <= num_experts:  # decode: one row per expert block
        assert cfg.block_m == 16


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="block_m"):
        MoEKernelConfig.from_dict({**heuristic_config(MoEShape(num_tokens=1, top_k=2, num_experts=8, hidden=64,
                                                                inter=32)).to_dict(), "block_m": 24})


def test_tuned_table_overrides(monkeypatch, tmp_path):
    shape = MoEShape(num_tokens=100, top_k=2, num_experts=8, hidden=64, inter=32)
    pinned = heuristic_config(MoEShape(num_tokens=1, top_k=2, num_experts=8, hidden=64, inter=32))
    table = {"8,64,32,2": {"64": heuristic_config(shape).to_dict(), "128": pinned.to_dict()}}
    (tmp_path / "t.json").write_text(json.dumps(table))
    monkeypatch.setattr(heuristics, "gpu_name", lambda: tmp_path.name)
    monkeypatch.setenv("MOEKIT_TUNED_DIR", str(tmp_path.parent))
    assert choose_config(shape) == pinned  # 100 tokens: the entry tuned up to 128
    assert choose_config(MoEShape(num_tokens=500, top_k=2, num_experts=8, hidden=64, inter=32)) == \
        heuristic_config(MoEShape(num_tokens=500, top_k=2, num_experts=8, hidden=64, inter=32))


def test_tuned_table_of_the_shapes_gpu(monkeypatch, tmp_path):
    # The table is chosen by the card the call runs on (MoEShape.gpu), not by the current device.
    shape = MoEShape(num_tokens=100, top_k=2, num_experts=8, hidden=64, inter=32, gpu="other_card")
    pinned = heuristic_config(MoEShape(num_tokens=1, top_k=2, num_experts=8, hidden=64, inter=32))
    (tmp_path / "other_card").mkdir()
    (tmp_path / "other_card" / "t.json").write_text(json.dumps({"8,64,32,2": {"128": pinned.to_dict()}}))
    monkeypatch.setenv("MOEKIT_TUNED_DIR", str(tmp_path))
    assert choose_config(shape) == pinned
    assert choose_config(replace(shape, gpu="cpu")) == heuristic_config(shape)


@pytest.mark.parametrize("inter", [4097, 4100, 6000, 16400])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_split_k_leaves_no_empty_split(inter, elem_bytes):
    # grouped_gemm gives each split ceil(I / (S·BLOCK_K)) K tiles; for a ragged I that rounding can leave the last
    # split(s) with no K at all: programs that only write zeros, and y/reduction traffic for nothing.
    for num_tokens in (1, 2, 4):
        cfg = heuristic_config(MoEShape(num_tokens=num_tokens, top_k=1, num_experts=1, hidden=64, inter=inter,
                                        elem_bytes=elem_bytes))
        split, bk = cfg.gemm2.split_k, cfg.gemm2.block_k
        assert split > 1  # the shape does want split-K (a tiny grid)
        k_per_split = -(-inter // (split * bk)) * bk
        assert (split - 1) * k_per_split < inter, (split, bk, k_per_split)

