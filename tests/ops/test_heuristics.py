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



def test_tuned_entries_are_keyed_by_weight_format(monkeypatch, tmp_path):
    # An fp8 layer and a bf16 layer of one shape have different best tiles: each reads only its own entries.
    bf16 = MoEShape(num_tokens=100, top_k=2, num_experts=8, hidden=64, inter=32, gpu="card")
    fp8 = replace(bf16, elem_bytes=1, weights="fp8_block")
    assert bf16.table_key == replace(bf16, weights="float16").table_key == "8,64,32,2"
    assert fp8.table_key == "8,64,32,2,fp8_block"
    pinned = heuristic_config(MoEShape(num_tokens=1, top_k=2, num_experts=8, hidden=64, inter=32))
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "t.json").write_text(json.dumps({"8,64,32,2,fp8_block": {"128": pinned.to_dict()}}))
    monkeypatch.setenv("MOEKIT_TUNED_DIR", str(tmp_path))
    assert choose_config(fp8) == pinned
    assert choose_config(bf16) == heuristic_config(bf16)
    assert choose_config(replace(fp8, weights="fp8_channel")) == heuristic_config(fp8)


@pytest.mark.parametrize(("num_experts", "hidden", "inter", "top_k", "num_tokens"), [
    (256, 7168, 2048, 8, 1024), (256, 7168, 2048, 8, 16384), (8, 4096, 14336, 2, 256)])
def test_8bit_prefill_tiles(num_experts, hidden, inter, top_k, num_tokens):
    # Block-scaled 8-bit dots need a second accumulator-sized register block: the 128 x 256 bf16 prefill tile
    # spills there, so 8-bit prefill runs 64 x 128 tiles with 128-wide K (the bytes of a bf16 64-wide K stage),
    # from 24 rows an expert on (deepseek-v3 T=1024 has 32: bf16 keeps its 32-row decode tiles there).
    shape = MoEShape(num_tokens=num_tokens, top_k=top_k, num_experts=num_experts, hidden=hidden, inter=inter)
    cfg = heuristic_config(replace(shape, elem_bytes=1, weights="fp8_block"))
    assert cfg.block_m == 64 and cfg.gemm1.block_n == 128 and cfg.gemm1.block_k == 128


@pytest.mark.parametrize("num_tokens", [1, 4, 16, 64])
def test_8bit_decode_k_steps(num_tokens):
    # 16-row 8-bit decode tiles past one token take 256-wide K steps in 3 stages (256-byte runs of each weight
    # row, a bf16 step's bytes); at one token (one row a block) 128-wide in 4, as bf16's decode tiles; 32-row
    # tiles (mixtral T=64) are left as they were.
    shape = MoEShape(num_tokens=num_tokens, top_k=8, num_experts=256, hidden=7168, inter=2048)
    fp8 = heuristic_config(replace(shape, elem_bytes=1, weights="fp8_block"))
    bf16 = heuristic_config(shape)
    assert fp8.block_m == bf16.block_m == 16
    for g8, g16 in ((fp8.gemm1, bf16.gemm1), (fp8.gemm2, bf16.gemm2)):
        assert g16.block_k == 128 and g16.num_stages == 4
        assert (g8.block_k, g8.num_stages) == ((128, 4) if num_tokens == 1 else (256, 3))
    mixtral = heuristic_config(MoEShape(num_tokens=64, top_k=2, num_experts=8, hidden=4096, inter=14336,
                                        elem_bytes=1, weights="fp8_block"))
    assert mixtral.block_m == 32 and mixtral.gemm1.block_k == 128 and mixtral.gemm1.num_stages == 4


def test_fused_decode_only_for_small_float_experts_at_decode():
    def cfg(num_tokens, preset, weights="bfloat16"):
        e, h, i, k = preset
        return choose_config(MoEShape(num_tokens=num_tokens, top_k=k, num_experts=e, hidden=h, inter=i,
                                      weights=weights, elem_bytes=1 if weights.startswith(("fp8", "int8")) else 2,
                                      gpu="no_such_gpu"))

    qwen3, olmoe, gpt_oss, mixtral = PRESETS[1], PRESETS[4], PRESETS[3], PRESETS[0]
    assert cfg(1, qwen3).fused is not None and cfg(4, olmoe).fused is not None
    assert cfg(5, qwen3).fused is None  # 40 routed rows
    assert cfg(4, (40, 1536, 512, 8)).fused is None and cfg(2, (40, 1536, 512, 8)).fused is not None  # N <= E / 2
    assert cfg(1, gpt_oss).fused is None and cfg(1, mixtral).fused is None  # large experts: it lost there
    assert cfg(1, qwen3, "fp8_block").fused is None and cfg(1, qwen3, "w4a16_g128").fused is None
    assert MoEKernelConfig.from_dict(cfg(1, qwen3).to_dict()) == cfg(1, qwen3)
