"""grouped_gemm_wna16 on MXFP4 weights (``MXFP4Weight``: e2m1 codes, e8m0 scales, groups of 32) vs
grouped_gemm_wna16_ref (grouped_gemm_ref on dequantize_mxfp4 weights), in the interpreter, for every variant.

fp16/fp32 activations only: the interpreter's bf16 tl.dot and arithmetic are wrong (bf16 runs in the GPU tests).
e2m1 values times fp16 activations are exact products, so "postscale" and "gemv" match the fp32 reference to fp32
rounding; "dequant"/"dequant_bytes" round each scaled weight to fp16 (exactly for the scales of randn/10 weights,
whose products fp16 holds), so every variant meets the fp32 row here. Outputs are poisoned with NaN.
"""

from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl

from moekit.ops._kernels.grouped_gemm_wna16 import _e2m1_f32, _mxfp4_weights, _scales_f32
from moekit.ops.activation import Activation
from moekit.ops.align import align, align_ref, row_per_block
from moekit.ops.grouped_gemm_wna16 import MXFP4Weight, grouped_gemm_wna16, grouped_gemm_wna16_ref, k_tiles
from moekit.ops.heuristics import WNA16_VARIANTS, GemmConfig, MoEShape, heuristic_config
from moekit.ops.quantize_mxfp4 import E2M1_VALUES, dequantize_mxfp4, e8m0_to_float, quantize_mxfp4
from moekit.testing import assert_close
from tests.ops.test_grouped_gemm_wna16 import SILU, SMALL, _gemm1, _routing

variants = pytest.mark.parametrize("variant", WNA16_VARIANTS)


def _weights(num_experts, n_b, k_dim, dtype=torch.float16):
    return MXFP4Weight(*quantize_mxfp4(torch.randn(num_experts, n_b, k_dim, dtype=dtype) / 10))


@triton.jit
def _values_kernel(p_c, p_s, p_out, p_vals, p_scales, N: tl.constexpr, K: tl.constexpr):
    o_n = tl.arange(0, N)
    o = o_n[:, None] * K + tl.arange(0, K)[None, :]
    b_c, b_s = tl.load(p_c + o), tl.load(p_s + o_n)
    tl.store(p_out + o, _mxfp4_weights(b_c, b_s, p_out.dtype.element_ty))
    tl.store(p_vals + o, _e2m1_f32(b_c))
    tl.store(p_scales + o_n, _scales_f32(b_s, True))


# The interpreter's bf16 arithmetic is wrong like its bf16 tl.dot: bf16 runs on the GPU.
@pytest.mark.filterwarnings("ignore:overflow encountered")  # 6 · 2^127 is inf, as the format says
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu), torch.float32])
def test_every_code_and_scale_exact(dtype):
    # Every e2m1 code (both zeros, the subnormal 0.5, ±6) against every e8m0 scale but NaN's 255 (2^-127, a
    # subnormal, up to 2^127, where 6x overflows): each value bit for bit the fp32 product rounded once to the
    # activation dtype, as a copy of the dequantized weights in that dtype would hold it (signed zeros included).
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    codes = torch.arange(16, dtype=torch.uint8, device=dev).repeat(256, 2)  # [s, c]: every pair (twice: K = 32)
    scales = torch.arange(256, dtype=torch.uint8, device=dev)
    scales[255] = 127  # 255 is NaN (refused at load); pad the power-of-two row count with 1.0
    out = torch.empty(256, 32, dtype=dtype, device=dev)
    vals = torch.empty(256, 32, device=dev)
    got_scales = torch.empty(256, device=dev)
    _values_kernel[(1,)](codes, scales, out, vals, got_scales, 256, 32)
    lut = torch.tensor(E2M1_VALUES, device=dev)
    assert torch.equal(vals.view(torch.int32), lut[codes.long()].view(torch.int32))  # -0.0 included
    assert torch.equal(got_scales.view(torch.int32), e8m0_to_float(scales).view(torch.int32))
    want = (lut[codes.long()] * e8m0_to_float(scales)[:, None]).to(dtype)
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(out.view(bits), want.view(bits))
    # The product is what dequantize_mxfp4 gives for the packed codes.
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    assert torch.equal(dequantize_mxfp4(packed, scales[:, None]).to(dtype).view(bits), want.view(bits))


@variants
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemm1_gated_with_bias(dtype, variant):
    # K = 160: five 32-column groups, BLOCK_K = 64 holds two (the last tile ragged: one group of 32); odd T = 7;
    # I = 24 not a multiple of the 16-output tile; bias in the epilogue; fp32 activations run "ieee" dots.
    num_tokens, top_k, num_experts, inter, k_dim = 7, 2, 4, 24, 160
    ids, layout = _routing(num_tokens, top_k, num_experts)
    w = _weights(num_experts, 2 * inter, k_dim)
    x = (torch.randn(num_tokens, k_dim) / 10).to(dtype)
    out, want = _gemm1(x, w, layout, inter, top_k, bias=torch.randn(num_experts, 2 * inter).to(dtype) / 10,
                       variant=variant)
    assert_close(out, want, torch.float32)


@variants
def test_swigluoai_with_clamp_and_bias(variant):
    # gpt-oss's activation (alpha 1.702, limit 7) with fp32-like biases: weights x10 so the clamp is reached.
    num_tokens, top_k, num_experts, inter, k_dim = 5, 2, 3, 32, 64
    ids, layout = _routing(num_tokens, top_k, num_experts)
    w = MXFP4Weight(*quantize_mxfp4(torch.randn(num_experts, 2 * inter, k_dim) * 2))
    x = torch.randn(num_tokens, k_dim).half()
    act = Activation(name="swigluoai", alpha=1.702, limit=7.0)
    out, want = _gemm1(x, w, layout, inter, top_k, act=act, bias=torch.randn(num_experts, 2 * inter).half(),
                       variant=variant)
    assert float(want.abs().max()) > 7  # the clamp took part
    assert_close(out, want, torch.float32)


@variants
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemm2_routing_weights_and_split_k(split_k, variant):
    # Rows one to one with routing weights and a bias; K = 320 in 3 splits of 128 (the last one short).
    num_tokens, top_k, num_experts, hidden, k_dim = 5, 3, 5, 40, 320
    ids, layout = _routing(num_tokens, top_k, num_experts)
    num_rows = ids.numel()
    w = _weights(num_experts, hidden, k_dim)
    a = (torch.randn(num_rows, k_dim) / 10).half()
    kw = dict(num_rows=num_rows, weights_N=torch.rand(num_rows), bias_EN=torch.randn(num_experts, hidden) / 10)
    out = torch.full((split_k, num_rows, hidden), float("nan"))
    grouped_gemm_wna16(a, w, layout, out if split_k > 1 else out[0], replace(SMALL, split_k=split_k, variant=variant),
                       **kw)
    want = grouped_gemm_wna16_ref(a, w, layout, torch.empty(num_rows, hidden), **kw)
    assert_close(out.sum(0), want, torch.float32)


@variants
def test_single_token_row_per_block(variant):
    # T = 1 decode layout (one routed row per block, no align), the 4-bit decode tile: BLOCK_K = 256 in
    # sub-tiles of 32 (eight groups a tile); "gemv" runs it as a 1-row tile.
    num_experts, inter, k_dim, top_k = 6, 32, 256, 3
    ids = torch.randperm(num_experts)[:top_k][None].int()
    w = _weights(num_experts, 2 * inter, k_dim)
    x = (torch.randn(1, k_dim) / 10).half()
    cfg = GemmConfig(block_n=32, block_k=256, num_stages=4)
    out, want = _gemm1(x, w, row_per_block(ids, 16), inter, top_k, config=cfg, variant=variant)
    assert_close(out, want, torch.float32)


@variants
def test_empty_expert_and_top_k_one(variant):
    # top_k = 1, 40 tokens on experts 0 and 2 of 4 (1 and 3 get none): full, half-padded (half tail) blocks.
    ids = torch.tensor([0, 2] * 20)[:, None]
    layout = align_ref(ids, 4, 32)
    w = _weights(4, 48, 128)
    x = (torch.randn(40, 128) / 10).half()
    out = torch.full((40, 48), float("nan"))
    grouped_gemm_wna16(x, w, layout, out, replace(SMALL, half_tail=True), num_rows=40, variant=variant)
    want = grouped_gemm_wna16_ref(x, w, layout, torch.empty(40, 48), num_rows=40)
    assert_close(out, want, torch.float32)


@variants
def test_top_k_equals_num_experts(variant):
    # Every token on every expert (top_k = E = 3), a non-silu gated activation.
    ids, layout = _routing(5, 3, 3)
    w = _weights(3, 32, 96)
    x = (torch.randn(5, 96) / 10).half()
    out, want = _gemm1(x, w, layout, 16, 3, act=Activation(name="gelu"), variant=variant)
    assert_close(out, want, torch.float32)


def test_no_tokens():
    # T = 0: nothing is launched and out (no rows) is returned as is.
    layout = align_ref(torch.empty(0, 2, dtype=torch.long), 4, 16)
    out = torch.empty(0, 16)
    assert grouped_gemm_wna16(torch.empty(0, 64).half(), _weights(4, 32, 64), layout, out, SMALL, num_rows=0,
                              a_row_div=2, activation=SILU) is out


def test_bad_inputs_name_the_argument():
    ids, layout = _routing(2, 1, 2)
    w = _weights(2, 32, 64)
    x = torch.randn(2, 64).half()
    out = torch.empty(2, 32)
    with pytest.raises(TypeError, match="b.qweight: expected dtype"):
        grouped_gemm_wna16(x, w._replace(qweight=w.qweight.int()), layout, out, SMALL, num_rows=2)
    with pytest.raises(TypeError, match="b.scales: expected dtype"):
        grouped_gemm_wna16(x, w._replace(scales=w.scales.float()), layout, out, SMALL, num_rows=2)
    with pytest.raises(ValueError, match=r"b.scales: expected shape \(2, 32, 2\)"):
        grouped_gemm_wna16(x, w._replace(scales=w.scales[..., :1]), layout, out, SMALL, num_rows=2)
    with pytest.raises(ValueError, match="b.qweight: expected shape"):
        grouped_gemm_wna16(x, w._replace(qweight=w.qweight[..., :8]), layout, out, SMALL, num_rows=2)
    with pytest.raises(ValueError, match=r"a: expected \[rows, 64\]"):
        grouped_gemm_wna16(x[:, :32], w, layout, out, SMALL, num_rows=2)
    with pytest.raises(ValueError, match="b.qweight: expected a 3-d"):
        grouped_gemm_wna16(x, MXFP4Weight(w.qweight[0], w.scales[0]), layout, out, SMALL, num_rows=2)


@pytest.mark.parametrize("num_tokens", [1, 16, 64, 4096])
def test_heuristic_tiles_are_the_4bit_ones(num_tokens):
    # mxfp4 runs on the 4-bit tiles (decode: K tiles that divide K = 2880), each a valid K tiling of 32-column
    # groups, keyed by its own scheme in tuned tables; its decode variant reads bytes and interleaves the nibbles
    # (splitting them, integer codes' choice at T > 1, measured level or behind for mxfp4 on an H200); past one
    # token it swaps the MMA's operands, which integer codes do not (except inside "dequant_pairs", which needs
    # groups of >= 64: not these of 32).
    shape = MoEShape(num_tokens=num_tokens, top_k=4, num_experts=128, hidden=2880, inter=2880, weights="mxfp4")
    cfg = heuristic_config(shape)
    int4 = heuristic_config(replace(shape, weights="w4a16_g32"))

    def tiles(c):
        return replace(c, gemm1=replace(c.gemm1, variant=None, swap_ab=False),
                       gemm2=replace(c.gemm2, variant=None, swap_ab=False))

    if num_tokens == 4096:  # swapped prefill tiles: 256 weight rows (the MMA's M) against integer codes' 128
        assert cfg.gemm1.block_n == cfg.gemm2.block_n == 256 and int4.gemm1.block_n == 128
        cfg = replace(cfg, gemm1=replace(cfg.gemm1, block_n=128), gemm2=replace(cfg.gemm2, block_n=128))
    assert tiles(cfg) == tiles(int4)
    assert cfg.gemm1.swap_ab == cfg.gemm2.swap_ab == (num_tokens > 1) and not int4.gemm1.swap_ab
    assert cfg.gemm1.variant not in ("dequant_split", "dequant_pairs")
    for gemm in (cfg.gemm1, cfg.gemm2):
        assert k_tiles(gemm.block_k, 32, 2880, 4)[1] == 32
    assert shape.table_key == "128,2880,2880,4,mxfp4"


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens, variant", [
    (1, None), (64, None), (4096, None),
    (1, "dequant"), (1, "postscale"), (64, "gemv"), (64, "postscale"),  # each variant off its heuristic shape
])
def test_mixtral_size_on_gpu(num_tokens, variant):
    # Mixtral-8x7b's size in bf16 on the mxfp4 heuristic tiles, both GEMMs against the reference on the same
    # input; "dequant" rounds each weight to bf16, so GEMM 2 is also held to atol 2e-2 against the layer on
    # weights dequantized to bf16 (vLLM's reference for weight-only kernels).
    num_experts, hidden, inter, top_k = 8, 4096, 14336, 2
    dev = torch.device("cuda")
    cfg = heuristic_config(MoEShape(num_tokens=num_tokens, top_k=top_k, num_experts=num_experts, hidden=hidden,
                                    inter=inter, weights="mxfp4"))
    if variant is not None:  # swapped operands only for the dequant variants
        swap = cfg.gemm1.swap_ab and variant.startswith("dequant")
        cfg = replace(cfg, gemm1=replace(cfg.gemm1, variant=variant, swap_ab=swap),
                      gemm2=replace(cfg.gemm2, variant=variant, swap_ab=swap))
    w13 = MXFP4Weight(*quantize_mxfp4(torch.randn(num_experts, 2 * inter, hidden, device=dev) / 10))
    w2 = MXFP4Weight(*quantize_mxfp4(torch.randn(num_experts, hidden, inter, device=dev) / 10))
    x = torch.randn(num_tokens, hidden, device=dev, dtype=torch.bfloat16) / 10
    ids = torch.stack([torch.randperm(num_experts, device=dev)[:top_k] for _ in range(num_tokens)])
    layout = row_per_block(ids.int(), cfg.block_m) if num_tokens == 1 else align(ids, num_experts, cfg.block_m)
    num_rows = num_tokens * top_k
    a = torch.full((num_rows, inter), float("nan"), device=dev, dtype=torch.bfloat16)
    grouped_gemm_wna16(x, w13, layout, a, cfg.gemm1, num_rows=num_rows, a_row_div=top_k, activation=SILU)
    want_a = grouped_gemm_wna16_ref(x, w13, layout, torch.empty(num_rows, inter, device=dev), num_rows=num_rows,
                                    a_row_div=top_k, activation=SILU)
    assert_close(a, want_a, torch.bfloat16, name="gemm1")
    weights = torch.rand(num_rows, device=dev)
    split = cfg.gemm2.split_k
    y = torch.full((split, num_rows, hidden), float("nan"), device=dev)
    grouped_gemm_wna16(a, w2, layout, y if split > 1 else y[0], cfg.gemm2, num_rows=num_rows, weights_N=weights)
    want_y = grouped_gemm_wna16_ref(a, w2, layout, torch.empty(num_rows, hidden, device=dev), num_rows=num_rows,
                                    weights_N=weights)
    assert_close(y.sum(0), want_y, torch.bfloat16, name="gemm2")
    torch.testing.assert_close(y.sum(0), want_y, atol=2e-2, rtol=2 ** -8)


@pytest.mark.parametrize("variant", ["dequant", "dequant_bytes", "dequant_split"])
def test_swapped_operands(variant):
    # swap_ab (what the heuristic picks for mxfp4 past one token): gated GEMM 1 with bias and GEMM 2 with
    # routing weights and split-K, against the reference on the dequantized weights.
    num_tokens, top_k, num_experts, inter, k_dim = 7, 2, 4, 32, 128
    ids, layout = _routing(num_tokens, top_k, num_experts)
    w13 = _weights(num_experts, 2 * inter, k_dim)
    x = (torch.randn(num_tokens, k_dim) / 10).half()
    cfg = replace(SMALL, swap_ab=True)
    out, want = _gemm1(x, w13, layout, inter, top_k, config=cfg, variant=variant,
                       bias=torch.randn(num_experts, 2 * inter).half() / 10)
    assert_close(out, want, torch.float32)
    w2 = _weights(num_experts, 48, inter)
    a = (torch.randn(num_tokens * top_k, inter) / 10).half()
    weights = torch.rand(num_tokens * top_k)
    out = torch.full((2, num_tokens * top_k, 48), float("nan"))
    grouped_gemm_wna16(a, w2, layout, out, replace(cfg, split_k=2, variant=variant), num_rows=num_tokens * top_k,
                       weights_N=weights)
    want = grouped_gemm_wna16_ref(a, w2, layout, torch.empty(num_tokens * top_k, 48), num_rows=num_tokens * top_k,
                                  weights_N=weights)
    assert_close(out.sum(0), want, torch.float32)


def test_heuristic_swaps_mxfp4_past_one_token():
    def cfg(t, weights="mxfp4", elem_bytes=2):
        return heuristic_config(MoEShape(num_tokens=t, top_k=4, num_experts=128, hidden=2880, inter=2880,
                                         weights=weights, elem_bytes=elem_bytes))

    assert not cfg(1).gemm1.swap_ab and cfg(16).gemm1.swap_ab and cfg(4096).gemm2.swap_ab
    assert not cfg(16, "w4a16_g128").gemm1.swap_ab and not cfg(16, elem_bytes=4).gemm1.swap_ab


@pytest.mark.parametrize("num_tokens", [1, 4, 64, 4096])
def test_heuristic_takes_the_gluon_kernel_for_decode_where_it_runs(num_tokens):
    # Where the Gluon decode kernel runs the call (MoEShape.gluon: sm_90, bf16 activations), mxfp4 decode gets its
    # tiles: GEMM 1 128 weight rows (64 outputs: the gated minimum), GEMM 2 64 (gpt-oss's H = 2880 is no multiple
    # of 128), K steps of 128; GEMM 2 split at one token (4 experts x 45 tiles fill less than two programs an SM).
    # Prefill, other calls and integer codes keep the Triton tiles; a GEMM whose tile does not divide its outputs
    # keeps them too (gpt-oss at TP = 2: I = 1440 is no multiple of 64, H = 2880 is).
    shape = MoEShape(num_tokens=num_tokens, top_k=4, num_experts=128, hidden=2880, inter=2880, weights="mxfp4",
                     gluon=True)
    cfg = heuristic_config(shape)
    if num_tokens == 4096:
        assert cfg == heuristic_config(replace(shape, gluon=False))
        return
    assert (cfg.gemm1.variant, cfg.gemm2.variant) == ("gluon_pairs", "gluon_pairs")
    assert (cfg.gemm1.block_n, cfg.gemm2.block_n, cfg.gemm1.block_k) == (128, 64, 128)
    assert cfg.gemm2.split_k == (2 if num_tokens == 1 else 1) and not cfg.gemm1.swap_ab
    for off in (replace(shape, gluon=False), replace(shape, weights="w4a16_g32")):
        assert heuristic_config(off).gemm1.variant != "gluon_pairs"
    tp2 = heuristic_config(replace(shape, inter=1440))
    assert tp2.gemm1 == heuristic_config(replace(shape, inter=1440, gluon=False)).gemm1
    assert tp2.gemm2.variant == "gluon_pairs"
