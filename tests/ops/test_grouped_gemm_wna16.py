"""grouped_gemm_wna16 vs grouped_gemm_wna16_ref (grouped_gemm_ref on dequantize_wna16 weights), in the interpreter,
for every variant: int4 sym/asym and int8 sym/asym codes, group sizes 32/64/128 (and 96, one group), ragged and
odd K, gated GEMM 1 and GEMM 2 with routing weights and split-K, the routing edge cases. Outputs are poisoned with
NaN so unwritten rows show. fp16/fp32 activations only: the interpreter's bf16 tl.dot is wrong (bf16 runs in the
GPU test). The codes times fp16 activations are exact products, so "postscale" and "gemv" match the fp32
reference to fp32 rounding; "dequant" (int32 words of codes wherever the rows allow, fp16 here) and
"dequant_bytes" round each dequantized weight to fp16 (fp16 tolerance).
"""

from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl

from moekit.ops._kernels.grouped_gemm_wna16 import _codes_minus_zero
from moekit.ops.activation import Activation
from moekit.ops.align import align, align_ref, row_per_block
from moekit.ops.grouped_gemm_wna16 import _as_words, grouped_gemm_wna16, grouped_gemm_wna16_ref, k_tiles
from moekit.ops.heuristics import (
    WNA16_VARIANTS, GemmConfig, MoEKernelConfig, MoEShape, gluon_tile_fits, heuristic_config, wna16_bits,
    wna16_variant,
)
from moekit.ops.grouped_gemm import grouped_gemm_ref
from moekit.ops.quantize_wna16 import WNA16Weight, dequantize_wna16, quantize_wna16
from moekit.testing import assert_close

SMALL = GemmConfig(block_n=32, block_k=64, group_m=2, num_warps=4, num_stages=2)
SILU = Activation(name="silu")
variants = pytest.mark.parametrize("variant", WNA16_VARIANTS)


def _tol(variant, dtype):
    """The tolerance row of a variant's output: "dequant" rounds the weights to a's dtype ("gluon_pairs" runs as
    "dequant_pairs" off sm_90: here)."""
    return dtype if variant.startswith("dequant") or variant == "gluon_pairs" else torch.float32


def _weights(num_experts, n_b, k_dim, bits, group_size, sym, dtype=torch.float16):
    return quantize_wna16(torch.randn(num_experts, n_b, k_dim, dtype=dtype) / 10, bits, group_size, sym)


def _routing(num_tokens, top_k, num_experts, block_m=16):
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).reshape(num_tokens, top_k)
    return ids, align_ref(ids, num_experts, block_m)


def _gemm1(x, w, layout, inter, top_k, config=SMALL, act=SILU, bias=None, variant=None):
    """Kernel and reference outputs of GEMM 1 (rows gathered by a_row_div = top_k, activation fused)."""
    num_rows = x.shape[0] * top_k
    kw = dict(num_rows=num_rows, a_row_div=top_k, bias_EN=bias, activation=act)
    out = torch.full((num_rows, inter), float("nan"))
    grouped_gemm_wna16(x, w, layout, out, config, variant=variant, **kw)
    return out, grouped_gemm_wna16_ref(x, w, layout, torch.empty(num_rows, inter), **kw)


@variants
@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gemm1_gated_with_bias(bits, sym, group_size, variant):
    # K = 200: ragged last K tile and last group (g = 32: 6 groups + 8 columns; 128: one whole, one short); odd
    # T; I = 24 not a multiple of the 16-output tile (wrapped columns); bias in the epilogue; BLOCK_K = 64 against
    # g = 32 (two groups a tile), 64 (one) and 128 (a tile in half a group).
    num_tokens, top_k, num_experts, inter, k_dim = 7, 2, 4, 24, 200
    ids, layout = _routing(num_tokens, top_k, num_experts)
    w = _weights(num_experts, 2 * inter, k_dim, bits, group_size, sym)
    x = (torch.randn(num_tokens, k_dim) / 10).half()
    out, want = _gemm1(x, w, layout, inter, top_k, bias=torch.randn(num_experts, 2 * inter).half() / 10,
                       variant=variant)
    assert_close(out, want, _tol(variant, x.dtype))


@variants
@pytest.mark.parametrize("bits, sym", [(4, False), (8, True)])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemm2_routing_weights_and_split_k(bits, sym, split_k, variant):
    # Rows read one to one with routing weights, fp32 activations ("ieee" dots); split-K partials each start on
    # a whole K tile (k_per_split = 128 for K = 320 in 3 splits of BLOCK_K = 64: the last one is short).
    num_tokens, top_k, num_experts, hidden, k_dim = 5, 3, 5, 40, 320
    ids, layout = _routing(num_tokens, top_k, num_experts)
    num_rows = ids.numel()
    w = _weights(num_experts, hidden, k_dim, bits, 64, sym, torch.float32)
    a = torch.randn(num_rows, k_dim) / 10
    kw = dict(num_rows=num_rows, weights_N=torch.rand(num_rows), bias_EN=torch.randn(num_experts, hidden) / 10)
    out = torch.full((split_k, num_rows, hidden), float("nan"))
    grouped_gemm_wna16(a, w, layout, out if split_k > 1 else out[0], replace(SMALL, split_k=split_k, variant=variant),
                       **kw)
    want = grouped_gemm_wna16_ref(a, w, layout, torch.empty(num_rows, hidden), **kw)
    assert_close(out.sum(0), want, torch.float32)


@variants
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k_dim", [63, 256])
def test_odd_and_even_k(bits, k_dim, variant):
    # K = 63: odd, so the 4-bit rows end on a padding nibble that must not count; one partial group of 32.
    # K = 256: a whole number of K tiles (the unmasked loop).
    num_tokens, top_k, num_experts, inter = 3, 2, 3, 16
    ids, layout = _routing(num_tokens, top_k, num_experts)
    w = _weights(num_experts, 2 * inter, k_dim, bits, 32, False)
    x = (torch.randn(num_tokens, k_dim) / 10).half()
    out, want = _gemm1(x, w, layout, inter, top_k, variant=variant)
    assert_close(out, want, _tol(variant, x.dtype))


@variants
@pytest.mark.parametrize("group_size", [96, -1])
def test_group_sizes_that_are_not_powers_of_two(group_size, variant):
    # g = 96: K tiles of 32 (the largest power of two dividing it); g = -1: one group over the whole row.
    ids, layout = _routing(4, 2, 4)
    w = _weights(4, 32, 192, 4, group_size, True)
    x = (torch.randn(4, 192) / 10).half()
    out, want = _gemm1(x, w, layout, 16, 2, config=replace(SMALL, block_k=128), variant=variant)
    assert_close(out, want, _tol(variant, x.dtype))


@variants
def test_single_token_row_per_block(variant):
    # T = 1 decode layout (one routed row per block, no align) with the 4-bit decode tile: BLOCK_K = 256 in
    # sub-tiles of g = 64; "gemv" runs it as a 1-row tile.
    num_experts, inter, k_dim, top_k = 6, 32, 256, 3
    ids = torch.randperm(num_experts)[:top_k][None].int()
    w = _weights(num_experts, 2 * inter, k_dim, 4, 64, True)
    x = (torch.randn(1, k_dim) / 10).half()
    cfg = GemmConfig(block_n=32, block_k=256, num_stages=4)
    out, want = _gemm1(x, w, row_per_block(ids, 16), inter, top_k, config=cfg, variant=variant)
    assert_close(out, want, _tol(variant, x.dtype))


def test_no_tokens():
    # T = 0: nothing is launched and out (no rows) is returned as is.
    ids = torch.empty(0, 2, dtype=torch.long)
    layout = align_ref(ids, 4, 16)
    w = _weights(4, 32, 64, 4, 32, True)
    out = torch.empty(0, 16)
    assert grouped_gemm_wna16(torch.empty(0, 64).half(), w, layout, out, SMALL, num_rows=0, a_row_div=2,
                              activation=SILU) is out


@variants
def test_all_tokens_on_one_expert_with_half_tail(variant):
    # 40 rows on expert 2 of 4 (top_k 1; experts 0, 1, 3 get none): two full 32-row blocks and one whose second
    # half is padding, which runs the half-height tile.
    ids = torch.full((40, 1), 2)
    layout = align_ref(ids, 4, 32)
    w = _weights(4, 48, 128, 4, 64, False)
    x = (torch.randn(40, 128) / 10).half()
    out = torch.full((40, 48), float("nan"))
    grouped_gemm_wna16(x, w, layout, out, replace(SMALL, half_tail=True), num_rows=40, variant=variant)
    want = grouped_gemm_wna16_ref(x, w, layout, torch.empty(40, 48), num_rows=40)
    assert_close(out, want, _tol(variant, x.dtype))


@variants
def test_top_k_equals_num_experts(variant):
    # Every token on every expert (top_k = E = 3).
    ids, layout = _routing(5, 3, 3)
    w = _weights(3, 32, 96, 8, 32, False)
    x = (torch.randn(5, 96) / 10).half()
    out, want = _gemm1(x, w, layout, 16, 3, act=Activation(name="gelu"), variant=variant)
    assert_close(out, want, _tol(variant, x.dtype))


def test_k_tiles():
    assert k_tiles(256, 128, 4096, 4) == (256, 128)  # a tile of two groups
    assert k_tiles(64, 128, 4096, 4) == (64, 64)  # a tile in half a group
    assert k_tiles(256, 4096, 4096, 4) == (256, 256)  # one group (g = -1)
    assert k_tiles(128, 96, 4096, 8) == (32, 32)
    with pytest.raises(ValueError, match="config.block_k"):
        k_tiles(16, 128, 4096, 4)
    with pytest.raises(ValueError, match="group_size"):
        k_tiles(128, 16, 4096, 4)  # two dots of 8 columns a group


def test_codes_as_words_only_when_aligned():
    # "dequant" reads 4-bit rows as int32 words (a view, no copy) only where every row starts on a word.
    q = torch.randint(0, 256, (3, 8, 100), dtype=torch.uint8)
    words = _as_words(q)
    assert words.dtype == torch.int32 and words.shape == (3, 8, 25) and words.data_ptr() == q.data_ptr()
    assert _as_words(q[..., :98]) is None  # a row of 98 bytes is not whole words
    assert _as_words(q[:, :, 2:]) is None  # offset by 2 bytes
    assert _as_words(q[..., :96].contiguous()) is not None


def test_bad_inputs_name_the_argument():
    ids, layout = _routing(2, 1, 2)
    w = _weights(2, 32, 64, 4, 32, True)
    x = torch.randn(2, 64).half()
    out = torch.empty(2, 32)
    kw = dict(num_rows=2)
    with pytest.raises(TypeError, match="a: expected dtype"):
        grouped_gemm_wna16(x.int(), w, layout, out, SMALL, **kw)
    with pytest.raises(ValueError, match=r"a: expected \[rows, 64\]"):
        grouped_gemm_wna16(x[:, :32], w, layout, out, SMALL, **kw)
    with pytest.raises(TypeError, match="weight"):
        grouped_gemm_wna16(x, tuple(w), layout, out, SMALL, **kw)
    with pytest.raises(ValueError, match="b.qweight"):
        grouped_gemm_wna16(x, w._replace(qweight=w.qweight[0], scales=w.scales[0]), layout, out, SMALL, **kw)
    with pytest.raises(ValueError, match="scales"):
        grouped_gemm_wna16(x, w._replace(scales=w.scales[:, :, :1]), layout, out, SMALL, **kw)
    with pytest.raises(ValueError, match="out"):
        grouped_gemm_wna16(x, w, layout, out[:, :16], SMALL, **kw)
    with pytest.raises(ValueError, match="b.qweight: gated"):
        grouped_gemm_wna16(x, w._replace(qweight=w.qweight[:, :31], scales=w.scales[:, :31]), layout, out, SMALL,
                           num_rows=2, activation=SILU)
    with pytest.raises(ValueError, match="config.block_k"):
        grouped_gemm_wna16(x, w, layout, out, GemmConfig(block_n=32, block_k=16), **kw)
    with pytest.raises(ValueError, match="variant: expected one of"):
        grouped_gemm_wna16(x, w, layout, out, SMALL, variant="marlin", **kw)
    with pytest.raises(ValueError, match="GemmConfig.variant"):
        replace(SMALL, variant="marlin")


PRESETS = [(8, 4096, 14336, 2), (128, 2048, 768, 8), (256, 7168, 2048, 8)]


@pytest.mark.parametrize("num_experts, hidden, inter, top_k", PRESETS)
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 1024, 4096])
@pytest.mark.parametrize("scheme", ["w4a16_g128", "w8a16_g32_asym"])
def test_wna16_heuristic_tiles(num_experts, hidden, inter, top_k, num_tokens, scheme):
    shape = MoEShape(num_tokens=num_tokens, top_k=top_k, num_experts=num_experts, hidden=hidden, inter=inter,
                     weights=scheme)
    cfg = heuristic_config(shape)
    assert MoEKernelConfig.from_dict(cfg.to_dict()) == cfg
    bits = wna16_bits(scheme)
    for gemm, k_dim in ((cfg.gemm1, hidden), (cfg.gemm2, inter)):
        k_tiles(gemm.block_k, int(scheme.split("_g")[1].split("_")[0]), k_dim, bits)  # a valid K tiling
    if cfg.block_m <= 32:  # decode: 128 B of codes a weight row per K tile
        assert cfg.gemm1.block_k * bits == 1024
    # Decode tiles load the codes as bytes at T = 1 and (4-bit codes past one token) as int32 words dequantized in
    # packed pairs, prefill tiles as int32 words (H200 measurements: heuristics.py).
    want = "dequant_bytes" if cfg.block_m <= 32 or num_tokens == 1 else "dequant"
    if want == "dequant_bytes" and bits == 4 and (num_tokens > 1 or hidden * inter >= 4 << 20):
        want = "gluon_pairs"  # one token: large experts only (mixtral, deepseek-v3; not qwen3-30b-a3b)
    assert cfg.gemm1.variant == cfg.gemm2.variant == want
    if want == "gluon_pairs" and num_tokens == 1:  # twice the BLOCK_N of the byte loads (groups of 32: no pairs)
        plain = heuristic_config(replace(shape, weights="w4a16_g32"))
        assert plain.gemm1.variant == "dequant_bytes"
        assert (cfg.gemm1.block_n, cfg.gemm2.block_n) == (2 * plain.gemm1.block_n, 2 * plain.gemm2.block_n)
    if bits == 4 and num_tokens > 1 and want != "dequant":  # groups of 32 split the nibbles instead
        assert heuristic_config(replace(shape, weights="w4a16_g32")).gemm1.variant == "dequant_split"
    # A config naming no variant gets the same, or plain byte loads where the heuristic takes the pairs.
    assert wna16_variant(cfg.block_m, num_tokens == 1) == want.replace("gluon_pairs", "dequant_bytes")
    assert shape.table_key == f"{num_experts},{hidden},{inter},{top_k},{scheme}"
    # Where the call runs the Gluon kernel, its 16-slot blocks take twice the BLOCK_N (H200 probe) where the
    # doubled tile still runs there; nothing else changes.
    on_gluon = heuristic_config(replace(shape, gluon=True))
    wide = want == "gluon_pairs" and num_tokens > 1 and cfg.block_m <= 16
    for g, on, n_out, gated in ((cfg.gemm1, on_gluon.gemm1, inter, True), (cfg.gemm2, on_gluon.gemm2, hidden, False)):
        doubled = wide and gluon_tile_fits(2 * g.block_n, g.num_warps, n_out, gated)
        assert on == (replace(g, block_n=2 * g.block_n) if doubled else g)
    assert on_gluon.block_m == cfg.block_m


@pytest.mark.parametrize("inter, hidden, want1, want2", [
    (768, 2048, True, True),    # qwen3-30b-a3b
    (192, 2048, False, True),   # its TP = 4 slice: 128 outputs do not divide 192
    (704, 2048, False, True),   # qwen2-moe / DeepSeek-V2-Lite at TP = 2
    (720, 2880, False, False),  # gpt-oss's H = 2880 (w4a16) at TP = 4: neither doubled tile divides
])
def test_wider_gluon_tiles_only_where_they_still_run(inter, hidden, want1, want2):
    shape = MoEShape(num_tokens=16, top_k=8, num_experts=128, hidden=hidden, inter=inter, weights="w4a16_g128",
                     gluon=True)
    cfg, narrow = heuristic_config(shape), heuristic_config(replace(shape, gluon=False))
    assert cfg.block_m == 16
    for g, base, want in ((cfg.gemm1, narrow.gemm1, want1), (cfg.gemm2, narrow.gemm2, want2)):
        if base.variant == "gluon_pairs":
            assert g.block_n == (2 if want else 1) * base.block_n


@pytest.mark.parametrize("num_tokens", [1, 16, 64])
def test_wna16_decode_k_tile_divides_k(num_tokens):
    # gpt-oss (K = 2880 = 64 * 45 in both GEMMs): a K tile that does not divide K masks every tile's loads (2.8x
    # slower at T = 16 on an H200), so decode tiles shrink to the widest power of two that divides K; K = 2080
    # (32 * 65) gets 32; a K no tile of >= 32 divides keeps the 256-wide tile (masked, still correct).
    for hidden, inter, want in ((2880, 2880, (64, 64)), (4096, 2080, (256, 32)), (2880, 1000, (64, 256))):
        cfg = heuristic_config(MoEShape(num_tokens=num_tokens, top_k=4, num_experts=128, hidden=hidden, inter=inter,
                                        weights="mxfp4"))
        assert (cfg.gemm1.block_k, cfg.gemm2.block_k) == want


def test_wna16_bits():
    assert [wna16_bits(w) for w in ("w4a16_g128", "w8a16", "w4a16_g32_asym", "bfloat16", "fp8_block")] == \
        [4, 8, 4, None, None]


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens, bits, sym, variant", [
    (1, 4, True, None), (64, 4, True, None), (4096, 4, True, None), (1, 4, False, None), (64, 4, False, None),
    (1, 8, True, None), (64, 8, False, None),
    # each variant off its heuristic shape: T = 1 on tensor cores, a 32-row block on FMAs, the old scaling
    (1, 4, False, "dequant"), (1, 4, True, "postscale"), (64, 4, False, "gemv"), (64, 8, True, "postscale"),
    (64, 4, False, "dequant_bytes"), (64, 4, False, "dequant_split"),
])
def test_mixtral_size_on_gpu(num_tokens, bits, sym, variant):
    # The tolerance (atol 2e-2 on randn/10 inputs) at mixtral-8x7b's size, bf16 activations, both GEMMs
    # on the heuristic tiles (decode, T = 64's 32-row blocks, prefill), each against the reference on the same
    # input. The fp32 reference of T = 4096 is ~3 TFLOP (once, for int4 sym).
    num_experts, hidden, inter, top_k = 8, 4096, 14336, 2
    dev = torch.device("cuda")
    scheme = f"w{bits}a16_g128{'' if sym else '_asym'}"
    cfg = heuristic_config(MoEShape(num_tokens=num_tokens, top_k=top_k, num_experts=num_experts, hidden=hidden,
                                    inter=inter, weights=scheme))
    if variant is not None:
        cfg = replace(cfg, gemm1=replace(cfg.gemm1, variant=variant), gemm2=replace(cfg.gemm2, variant=variant))
    w13 = quantize_wna16(torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) / 10, bits,
                         128, sym)
    w2 = quantize_wna16(torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16) / 10, bits, 128,
                        sym)
    x = torch.randn(num_tokens, hidden, device=dev, dtype=torch.bfloat16) / 10
    ids = torch.stack([torch.randperm(num_experts, device=dev)[:top_k] for _ in range(num_tokens)])
    layout = row_per_block(ids.int(), cfg.block_m) if num_tokens == 1 else align(ids, num_experts, cfg.block_m)
    num_rows = num_tokens * top_k
    a = torch.full((num_rows, inter), float("nan"), device=dev, dtype=torch.bfloat16)
    grouped_gemm_wna16(x, w13, layout, a, cfg.gemm1, num_rows=num_rows, a_row_div=top_k, activation=SILU)
    want_a = grouped_gemm_wna16_ref(x, w13, layout, torch.empty(num_rows, inter, device=dev), num_rows=num_rows,
                                    a_row_div=top_k, activation=SILU)
    assert_close(a, want_a, torch.bfloat16, name="gemm1")
    # The atol, plus the bf16 rounding of the stored output (half an ulp: 2^-8 relative) that the fp32
    # reference does not have (T = 4096 once read 0.02096 at a value of 4.07).
    torch.testing.assert_close(a.float(), want_a, atol=2e-2, rtol=2 ** -8)
    weights = torch.rand(num_rows, device=dev)
    split = cfg.gemm2.split_k
    y = torch.full((split, num_rows, hidden), float("nan"), device=dev)
    grouped_gemm_wna16(a, w2, layout, y if split > 1 else y[0], cfg.gemm2, num_rows=num_rows, weights_N=weights)
    want_y = grouped_gemm_wna16_ref(a, w2, layout, torch.empty(num_rows, hidden, device=dev), num_rows=num_rows,
                                    weights_N=weights)
    # fp32 sums of exact products, but "dequant" rounds the weights to bf16
    rounds = cfg.gemm2.variant.startswith("dequant")
    assert_close(y.sum(0), want_y, torch.bfloat16 if rounds else torch.float16, name="gemm2")
    if rounds:  # the atol as vLLM applies it: against the layer on weights dequantized to bf16
        want_y = grouped_gemm_ref(a, dequantize_wna16(w2).to(torch.bfloat16), layout,
                                  torch.empty(num_rows, hidden, device=dev), num_rows=num_rows, weights_N=weights)
    torch.testing.assert_close(y.sum(0), want_y, atol=2e-2, rtol=0)


@triton.jit
def _codes_kernel(p_c, p_z, p_out, N: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr):
    o_n = tl.arange(0, N)
    o = o_n[:, None] * K + tl.arange(0, K)[None, :]
    b_f = _codes_minus_zero(tl.load(p_c + o), tl.load(p_z + o_n), p_out.dtype.element_ty, BITS)
    tl.store(p_out + o, b_f)


# The interpreter's bf16 arithmetic is wrong like its bf16 tl.dot (128 - 128 gave 64): bf16 runs on the GPU.
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu), torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_codes_minus_zero_exact(dtype, bits):
    # The exponent trick (code OR-ed into the mantissa of 1024 / 128 / 2^23, minus power + zero) gives q - z
    # exactly for every code and zero point of the width, in each activation dtype (bf16 8-bit codes convert).
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 1 << bits
    codes = torch.arange(n, dtype=torch.uint8, device=dev).repeat(n, 1)  # [z, q]: every pair
    zeros = torch.arange(n, dtype=torch.int32, device=dev)
    out = torch.empty(n, n, dtype=dtype, device=dev)
    _codes_kernel[(1,)](codes, zeros, out, n, n, bits)
    want = codes.int() - zeros[:, None]
    assert torch.equal(out.float(), want.float())


@pytest.mark.parametrize("variant", ["dequant", "dequant_bytes", "dequant_split", "dequant_pairs"])
@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, False)])
@pytest.mark.parametrize("layout_kind", ["row_per_block", "block16", "half_tail32"])
def test_swapped_operands(variant, bits, sym, layout_kind):
    # swap_ab: the same products as acc^T = w @ a^T (the weights as the MMA's first operand): against the
    # reference on the decode layout of one token, 16-row blocks, and 32-row blocks whose 16-row half tiles
    # make the MMA's N 16; ragged K (200) and group 64.
    num_experts, inter, k_dim = 5, 24, 200
    w = _weights(num_experts, 2 * inter, k_dim, bits, 64, sym)
    cfg = replace(SMALL, swap_ab=True, half_tail=layout_kind == "half_tail32")
    if layout_kind == "row_per_block":
        ids = torch.randperm(num_experts)[:3][None].int()
        layout, num_tokens, top_k = row_per_block(ids, 16), 1, 3
    else:
        num_tokens, top_k = 9, 2
        _, layout = _routing(num_tokens, top_k, num_experts, block_m=32 if layout_kind == "half_tail32" else 16)
    x = (torch.randn(num_tokens, k_dim) / 10).half()
    out, want = _gemm1(x, w, layout, inter, top_k, config=cfg, variant=variant,
                       bias=torch.randn(num_experts, 2 * inter).half() / 10)
    assert_close(out, want, _tol(variant, x.dtype))


def test_swap_only_with_dequant_variants():
    w = _weights(2, 32, 64, 4, 32, True)
    ids, layout = _routing(2, 1, 2)
    with pytest.raises(ValueError, match="config.swap_ab: only the dequant variants"):
        _gemm1(torch.randn(2, 64).half(), w, layout, 16, 1, config=replace(SMALL, swap_ab=True), variant="gemv")


class _LaunchSpy:
    """Stands in for the kernel object: records each launch's PAIRS and SPLIT flags, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((kwargs["PAIRS"], kwargs["SPLIT"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    import moekit.ops.grouped_gemm_wna16 as op
    spy = _LaunchSpy(op.grouped_gemm_wna16_kernel)
    monkeypatch.setattr(op, "grouped_gemm_wna16_kernel", spy)
    return spy.launches


@pytest.mark.parametrize("k_dim, group_size, split_k, sym", [
    (200, 64, 1, False),   # ragged K: the last sub-tile half past the end, zero points
    (136, -1, 1, True),    # 17 words a row, one group a row (sub-tiles of the whole 64-wide K tile)
    (72, 64, 2, True),     # split-K whose second split holds 8 columns of a sub-tile
    (448, 128, 3, False),  # split-K over groups of 128 (sub-tiles of 64 inside a group)
])
def test_pairs_on_ragged_k_split_k_and_whole_row_groups(launches, k_dim, group_size, split_k, sym):
    # The cases where "dequant_pairs" runs (not its fallback): each launch says PAIRS, and GEMM 2's split partials
    # sum to the reference.
    num_tokens, top_k, num_experts, hidden = 5, 2, 4, 32
    ids, layout = _routing(num_tokens, top_k, num_experts)
    num_rows = ids.numel()
    w = _weights(num_experts, hidden, k_dim, 4, group_size, sym)
    a = (torch.randn(num_rows, k_dim) / 10).half()
    kw = dict(num_rows=num_rows, weights_N=torch.rand(num_rows))
    out = torch.full((split_k, num_rows, hidden), float("nan"))
    grouped_gemm_wna16(a, w, layout, out if split_k > 1 else out[0], replace(SMALL, split_k=split_k),
                       variant="dequant_pairs", **kw)
    assert launches == [(True, False)]
    assert_close(out.sum(0), grouped_gemm_wna16_ref(a, w, layout, torch.empty(num_rows, hidden), **kw), torch.float16)


@pytest.mark.parametrize("case", ["fp32", "group32", "group96", "8bit", "row_per_block_group32"])
def test_pairs_fall_back_where_they_cannot_run(launches, case):
    # fp32 activations, sub-tiles under 64 columns (groups of 32, 96) and 8-bit codes run the decode choice the
    # pairs replace: split nibbles on row blocks, byte loads (no split) on one-row blocks; results stay right.
    bits, group_size = (8, 64) if case == "8bit" else (4, {"group96": 96}.get(case, 32 if "32" in case else 64))
    dtype = torch.float32 if case == "fp32" else torch.float16
    w = _weights(4, 32, 192, bits, group_size, True, dtype)
    if case.startswith("row_per_block"):
        layout, num_tokens, top_k = row_per_block(torch.tensor([[2, 0]]).int(), 16), 1, 2
    else:
        num_tokens, top_k = 4, 2
        _, layout = _routing(num_tokens, top_k, 4)
    x = (torch.randn(num_tokens, 192) / 10).to(dtype)
    out, want = _gemm1(x, w, layout, 16, top_k, config=replace(SMALL, block_k=128), variant="dequant_pairs")
    assert_close(out, want, dtype)
    split = bits == 4 and not case.startswith("row_per_block")
    assert launches == [(False, split)]


@pytest.mark.parametrize("scheme, elem_bytes, inter, want1, want2", [
    ("w4a16_g128", 2, 14336, "gluon_pairs", "gluon_pairs"),
    ("w4a16_channel", 2, 14336, "gluon_pairs", "gluon_pairs"),
    ("w4a16_g128", 4, 14336, "dequant_bytes", "dequant_bytes"),   # fp32 activations: no 16-bit pairs
    ("w4a16_g96", 2, 14336, "dequant_bytes", "dequant_bytes"),    # 32-column sub-tiles
    ("w4a16_g64", 2, 14336, "dequant_bytes", "dequant_bytes"),    # 64-column sub-tiles: 16-wide dots, unmeasured
    ("w4a16_g128", 2, 1440, "gluon_pairs", "dequant_bytes"),    # GEMM 2's K tile of 32 divides I = 1440
    ("w4a16_g128", 2, 2880, "gluon_pairs", "dequant_bytes"),    # GEMM 2's K tiles of 64 (gpt-oss's I = 2880)
])
def test_pairs_heuristic_at_one_token_per_gemm(scheme, elem_bytes, inter, want1, want2):
    # One token on a large expert: each GEMM takes the pairs (with twice the BLOCK_N) only where they would run.
    shape = MoEShape(num_tokens=1, top_k=2, num_experts=8, hidden=4096, inter=inter, weights=scheme,
                     elem_bytes=elem_bytes)
    cfg, plain = heuristic_config(shape), heuristic_config(replace(shape, weights="w4a16_g32"))
    for gemm, base, want in ((cfg.gemm1, plain.gemm1, want1), (cfg.gemm2, plain.gemm2, want2)):
        assert gemm.variant == want
        assert gemm.block_n == (2 if want == "gluon_pairs" else 1) * base.block_n


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size, k_dim, sym, block_n, num_warps", [
    (64, 200, False, 32, 4),   # 32 weight rows: mma.sync, where loaded zero points need OPAQUE_ZEROS
    (128, 448, False, 64, 2),  # not a whole warpgroup: mma.sync too
    (128, 448, False, 64, 4),  # wgmma, without it
    (128, 448, False, 128, 8),  # the heuristic's 8-warp tiles
    (128, 448, True, 32, 4),
    (-1, 264, True, 64, 4),
])
def test_pairs_inline_asm_on_gpu(launches, dtype, group_size, k_dim, sym, block_n, num_warps):
    # The CUDA path of "dequant_pairs" (inline PTX, which the CPU tests never run): fp16's and bf16's magic
    # numbers, groups of 64 / 128 / a whole row, ragged K, zero points on mma.sync and wgmma tiles, against the
    # reference.
    dev = torch.device("cuda")
    num_tokens, top_k, num_experts, inter = 9, 2, 4, 48
    ids, _ = _routing(num_tokens, top_k, num_experts)
    layout = align(ids.to(dev), num_experts, 16)
    w = quantize_wna16(torch.randn(num_experts, 2 * inter, k_dim, device=dev, dtype=dtype) / 10, 4, group_size, sym)
    x = torch.randn(num_tokens, k_dim, device=dev, dtype=dtype) / 10
    num_rows = num_tokens * top_k
    kw = dict(num_rows=num_rows, a_row_div=top_k, activation=SILU)
    out = torch.full((num_rows, inter), float("nan"), device=dev, dtype=dtype)
    grouped_gemm_wna16(x, w, layout, out, replace(SMALL, block_n=block_n, num_warps=num_warps), variant="dequant_pairs",
                       **kw)
    assert launches == [(True, False)]
    assert_close(out, grouped_gemm_wna16_ref(x, w, layout, torch.empty(num_rows, inter, device=dev), **kw), dtype)


@pytest.mark.parametrize(("capability", "block_n", "num_warps", "wgmma"), [
    ((9, 0), 64, 4, True), ((9, 0), 128, 8, True), ((9, 0), 256, 4, True),
    ((9, 0), 32, 4, False),   # fewer rows than a warpgroup's M
    ((9, 0), 64, 2, False),   # not a whole warpgroup
    ((8, 0), 128, 4, False), ((10, 0), 128, 8, False),  # no wgmma (Ampere), or not measured (Blackwell)
])
def test_zero_points_are_made_opaque_off_wgmma(monkeypatch, capability, block_n, num_warps, wgmma):
    # OPAQUE_ZEROS (the workaround for Triton's mis-compile of the pairs with zero points on mma.sync) is asked for
    # exactly where the swapped dots do not run on wgmma.
    import moekit.ops.grouped_gemm_wna16 as op
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    config = GemmConfig(block_n=block_n, block_k=128, group_m=1, num_warps=num_warps, num_stages=2)
    assert op._wgmma_tile(torch.device("cuda"), config) == wgmma
