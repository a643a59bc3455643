"""moekit.ops.quantize_wna16: the 4/8-bit group-scale layout and its converters, against compressed-tensors' own
compressor and AWQ converter, and against GPTQ/AWQ tensors packed here from the formats' documented formulas
(independently of the converters); error of each format against its unquantized N(0,1) source; refusals."""

import math

import pytest
import torch

from moekit.ops.quantize_wna16 import (
    AWQ_ORDER,
    WNA16Weight,
    awq_to_wna16,
    compressed_tensors_to_wna16,
    dequantize_gptq,
    dequantize_wna16,
    gptq_to_wna16,
    quantize_wna16,
)

# QUANT_FORMATS.md 1.11: rel-RMS of int4 g128 on N(0,1) [512, 1024]; each format must land within 20%.
REL_RMS = {True: 0.111, False: 0.101}


# ---- independent packers, written from the formats' definitions (loops over words, no shared helper) ----

def _pack_words(codes_by_word: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., words, 32/bits] (element i of a word at bits ``bits·i``) -> int32 [..., words]."""
    acc = torch.zeros(codes_by_word.shape[:-1], dtype=torch.int64)
    for i in range(codes_by_word.shape[-1]):
        acc |= (codes_by_word[..., i].long() & ((1 << bits) - 1)) << (bits * i)
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)  # the int32 with those bits


def gptq_pack(q_KN: torch.Tensor, z_GN: torch.Tensor, scales_GN: torch.Tensor, bits: int):
    """GPTQ v1: qweight [K/pw, N] packed along K; qzeros [G, ⌈N/pw⌉] packed along N, then one subtracted from
    every field of each word at once, as GPTQModel exports v1 (a word minus 0x11111111 at 4 bits: a zero of 0
    borrows from the field above)."""
    pw = 32 // bits
    k, n = q_KN.shape
    qweight = _pack_words(q_KN.reshape(k // pw, pw, n).permute(0, 2, 1), bits)
    npad = math.ceil(n / pw) * pw
    zs = torch.nn.functional.pad(z_GN.long(), (0, npad - n))
    words = _pack_words(zs.reshape(zs.shape[0], npad // pw, pw), bits).long() & 0xFFFFFFFF
    words = (words - sum(1 << (bits * i) for i in range(pw))) & 0xFFFFFFFF
    qzeros = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return qweight, qzeros, scales_GN


def awq_pack(q_KN: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM: [R, N] codes -> int32 [R, N/8]; nibble j of word w holds column 8w + AWQ_ORDER[j]."""
    r, n = q_KN.shape
    by_word = q_KN.reshape(r, n // 8, 8)[..., list(AWQ_ORDER)]
    return _pack_words(by_word, 4)


def formula(q_NK, z_NG, s_NG, g):
    """W = (q − z[k // g]) · s[k // g], fp32."""
    idx = torch.arange(q_NK.shape[1]) // g
    return (q_NK.float() - z_NG.float()[:, idx]) * s_NG.float()[:, idx]


def rel_rms(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _codes(weight: WNA16Weight):
    """Unsigned codes [N, K] and zeros [N, G] of a moekit weight, read from its documented layout."""
    q = weight.qweight
    if weight.bits == 4:
        q = torch.stack((q & 15, q >> 4), -1).flatten(-2)[..., : weight.k]
    z = weight.zeros if weight.zeros is not None else torch.full_like(weight.scales, 1 << (weight.bits - 1))
    return q, z


# ------------------------------------------------------------------------------------- quantize / dequantize

@pytest.mark.parametrize("sym", [True, False])
def test_quantize_int4_error_matches_the_documented_figure(sym):
    torch.manual_seed(0)
    w = torch.randn(512, 1024)
    qw = quantize_wna16(w, 4, 128, sym)
    assert qw.qweight.shape == (512, 512) and qw.qweight.dtype == torch.uint8
    assert qw.scales.shape == (512, 8) and (qw.zeros is None) == sym
    assert abs(rel_rms(dequantize_wna16(qw), w) / REL_RMS[sym] - 1) < 0.2


@pytest.mark.parametrize("shape", [(3, 13, 200), (5, 7), (2, 0, 64), (4, 33, 1)])
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
def test_quantize_dequantize_formula_on_odd_shapes(shape, bits, sym):
    # Odd N, odd K (a padding nibble), a short last group, K < g, empty N, leading expert dims.
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=torch.bfloat16)
    w[..., :1, :] = 0  # an all-zero row: scale 0, exact zeros back
    qw = quantize_wna16(w, bits, 64, sym)
    n, k = shape[-2:]
    assert qw.k == k and qw.qweight.shape[-1] == ((k + 1) // 2 if bits == 4 else k)
    assert qw.scales.dtype == torch.bfloat16 and qw.scales.shape == (*shape[:-1], math.ceil(k / 64))
    out = dequantize_wna16(qw)
    q, z = _codes(qw)
    idx = torch.arange(k) // 64
    expected = (q.float() - z.float()[..., idx]) * qw.scales.float()[..., idx]
    assert torch.equal(out, expected)
    if n:
        assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :]))
        # Within half a step of the source, plus the bf16 rounding (≤ 2^-8 relative) of the stored scale times the
        # largest code; asym may clip by up to one more step at an end, because its zero point is rounded too.
        qmax = (1 << bits) - 1
        slack = 0.5 + qmax / 2 * 2**-8 if sym else 1 + qmax * 2**-8
        step = qw.scales.float()[..., idx]
        assert bool(((out - w.float()).abs() <= step * slack + 1e-6).all())


def test_quantize_group_minus_one_is_one_group_and_inputs_are_untouched():
    w = torch.randn(6, 40)
    before = w.clone()
    qw = quantize_wna16(w, 8, -1, True)
    assert qw.group_size == 40 and qw.scales.shape == (6, 1)
    assert torch.equal(w, before)


# ------------------------------------------------------------------------------------------ compressed-tensors

def _ct_compress(w: torch.Tensor, preset: str, group: int):
    ct_q = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = ct_q.preset_name_to_scheme(preset, ["Linear"])
    scheme.weights.group_size = group
    n, k = w.shape
    grouped = w.float().view(n, k // group, group)
    s, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), scheme.weights)
    sd = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": s.to(w.dtype), "weight_zero_point": zp},
                                               scheme)
    ref = PackedQuantizationCompressor.decompress(dict(sd), scheme)["weight"]
    return sd, ref


CT_PRESETS = [("W4A16", 4, True), ("W4A16_ASYM", 4, False), ("W8A16", 8, True)]


@pytest.mark.parametrize("preset,bits,sym", CT_PRESETS)
@pytest.mark.parametrize("n,k,group", [(64, 256, 128), (13, 100, 4), (24, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_tensors_bit_exact_and_zero_copy(preset, bits, sym, n, k, group, dtype):
    torch.manual_seed(2)
    w = torch.randn(n, k, dtype=dtype)
    sd, ref = _ct_compress(w, preset, group)
    zp = sd.get("weight_zero_point")
    assert (zp is None) == sym
    qw = compressed_tensors_to_wna16(sd["weight_packed"], sd["weight_scale"], zp, bits=bits, group_size=group,
                                     k=int(sd["weight_shape"][1]))
    assert qw.qweight.data_ptr() == sd["weight_packed"].data_ptr()  # the checkpoint's storage, reinterpreted
    assert qw.scales is sd["weight_scale"]
    out = dequantize_wna16(qw)
    # compressed-tensors computes in the weight's dtype; fp32 is bit-exact, bf16 after the same final rounding.
    assert torch.equal(out.to(dtype), ref)
    # moekit's round-to-nearest quantizer makes the same scales, and for fp32 inputs the same zeros and codes
    # (for bf16 it makes its zeros and codes with the stored, rounded scale; compressed-tensors with the fp32 one).
    mine = quantize_wna16(w, bits, group, sym)
    assert torch.equal(mine.scales, sd["weight_scale"])
    if dtype == torch.float32:
        assert torch.equal(mine.qweight, qw.qweight)
        assert sym or torch.equal(mine.zeros, qw.zeros)


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_error_matches_the_documented_figure(sym):
    torch.manual_seed(3)
    w = torch.randn(512, 1024)
    sd, _ = _ct_compress(w, "W4A16" if sym else "W4A16_ASYM", 128)
    qw = compressed_tensors_to_wna16(sd["weight_packed"], sd["weight_scale"], sd.get("weight_zero_point"),
                                     bits=4, group_size=128)
    assert abs(rel_rms(dequantize_wna16(qw), w) / REL_RMS[sym] - 1) < 0.2


# ------------------------------------------------------------------------------------------------------- GPTQ

def _random_gptq(k, n, g, bits, sym, seed=4):
    torch.manual_seed(seed)
    groups = math.ceil(k / g)
    q = torch.randint(0, 1 << bits, (k, n), dtype=torch.int32)
    if sym:
        z = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int32)
    else:  # every zero point, 0 (a borrow in v1's packed words) and 2^bits - 1 included
        z = torch.randint(0, 1 << bits, (groups, n), dtype=torch.int32)
        z[0, ::2], z[-1, 1::3] = 0, (1 << bits) - 1
    s = (torch.rand(groups, n) * 0.01 + 1e-3).half()
    return q, z, s


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("k,n,g", [(256, 64, 128), (96, 13, 32), (64, 8, -1)])
def test_gptq_matches_formula_bit_exact(bits, sym, k, n, g):
    gg = k if g == -1 else g
    q, z, s = _random_gptq(k, n, gg, bits, sym)
    qweight, qzeros, scales = gptq_pack(q, z, s, bits)
    g_idx = (torch.arange(k) // gg).int()
    qw = gptq_to_wna16(qweight, qzeros, scales, g_idx, bits=bits, group_size=g, sym=sym)
    expected = formula(q.t(), z.t(), s.t(), gg)
    assert torch.equal(dequantize_wna16(qw), expected)
    assert qw.scales.dtype == torch.float16 and (qw.zeros is None) == sym
    assert torch.equal(dequantize_gptq(qweight, qzeros, scales, g_idx, bits=bits, group_size=g, sym=sym), expected)
    if sym:  # sym checkpoints may come without usable qzeros
        qw2 = gptq_to_wna16(qweight, None, scales, None, bits=bits, group_size=g, sym=True)
        assert torch.equal(dequantize_wna16(qw2), expected)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_v1_zero_point_of_zero_reads_back(bits):
    # GPTQModel exports v1 by subtracting one from each packed word, so a zero point of 0 borrows from the field
    # above it. Reading one field at a time gave 2^bits there (at 8 bits: refused) and one less above it.
    q, z, s = _random_gptq(64, 24, 32, bits, False)
    z[:] = 5
    z[0, 0] = z[1, 7] = 0  # field 0 and the last field of a word (its borrow leaves the word)
    qw = gptq_to_wna16(*gptq_pack(q, z, s, bits), None, bits=bits, group_size=32, sym=False)
    assert torch.equal(qw.zeros.int().t(), z)
    assert torch.equal(dequantize_wna16(qw), formula(q.t(), z.t(), s.t(), 32))


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_error_matches_the_documented_figure(sym):
    torch.manual_seed(5)
    w = torch.randn(512, 1024)
    src = quantize_wna16(w, 4, 128, sym)
    q, z = _codes(src)
    qweight, qzeros, scales = gptq_pack(q.t().int(), z.t().int(), src.scales.t().half(), 4)
    qw = gptq_to_wna16(qweight, qzeros, scales, None, bits=4, group_size=128, sym=sym)
    assert abs(rel_rms(dequantize_wna16(qw), w) / REL_RMS[sym] - 1) < 0.2


def test_gptq_desc_act_is_refused_unless_dequantized():
    k, n, g = 128, 16, 32
    q, z, s = _random_gptq(k, n, g, 4, False)
    perm = torch.randperm(k)
    g_idx = (perm // g).int()  # act order: column k belongs to group g_idx[k]
    qweight, qzeros, scales = gptq_pack(q, z, s, 4)
    with pytest.raises(ValueError, match=r"g_idx: GPTQ group activation ordering \(desc_act=True\)"):
        gptq_to_wna16(qweight, qzeros, scales, g_idx, bits=4, group_size=g, sym=False)
    out = dequantize_gptq(qweight, qzeros, scales, g_idx, bits=4, group_size=g, sym=False)
    expected = (q.float() - z.float()[g_idx.long()]) * s.float()[g_idx.long()]
    assert torch.equal(out, expected.t())


# -------------------------------------------------------------------------------------------------------- AWQ

@pytest.mark.parametrize("k,n,g", [(256, 64, 128), (96, 24, 32)])
def test_awq_matches_formula_and_compressed_tensors_converter(k, n, g):
    torch.manual_seed(6)
    groups = k // g
    q = torch.randint(0, 16, (k, n), dtype=torch.int32)
    z = torch.randint(0, 16, (groups, n), dtype=torch.int32)
    s = (torch.rand(groups, n) * 0.01 + 1e-3).half()
    qweight, qzeros = awq_pack(q), awq_pack(z)
    qw = awq_to_wna16(qweight, qzeros, s, group_size=g)
    out = dequantize_wna16(qw)
    assert torch.equal(out, formula(q.t(), z.t(), s.t(), g))

    conv = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.autoawq")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    ct = conv.AutoAWQConverter(group_size=g).process({"m.qweight": qweight, "m.qzeros": qzeros, "m.scales": s})
    scheme = preset_name_to_scheme("W4A16_ASYM", ["Linear"])
    scheme.weights.group_size = g
    ref = PackedQuantizationCompressor.decompress(
        {"weight_packed": ct["m.weight_packed"], "weight_scale": ct["m.weight_scale"],
         "weight_zero_point": ct["m.weight_zero_point"], "weight_shape": ct["m.weight_shape"]}, scheme)["weight"]
    assert torch.equal(out.half(), ref)
    # The converter's output runs through moekit's compressed-tensors path to the same internal tensors.
    via_ct = compressed_tensors_to_wna16(ct["m.weight_packed"], ct["m.weight_scale"], ct["m.weight_zero_point"],
                                         bits=4, group_size=g)
    assert torch.equal(via_ct.qweight, qw.qweight) and torch.equal(via_ct.zeros, qw.zeros)


def test_awq_error_matches_the_documented_figure():
    torch.manual_seed(7)
    w = torch.randn(512, 1024)
    src = quantize_wna16(w, 4, 128, False)
    q, z = _codes(src)
    qw = awq_to_wna16(awq_pack(q.t().int()), awq_pack(z.t().int()), src.scales.t().half(), group_size=128)
    assert abs(rel_rms(dequantize_wna16(qw), w) / REL_RMS[False] - 1) < 0.2


# --------------------------------------------------------------------------------------------------- refusals

def test_refusals_name_the_argument():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="bits"):
        quantize_wna16(w, 3, 32, True)
    for bits in (8.0, True):  # 8.0 == 8 and True == 1 would pass a plain membership test
        with pytest.raises(TypeError, match=rf"bits: expected an int \(one of \[4, 8\]\), got {type(bits).__name__}"):
            quantize_wna16(w, bits, 32, True)
    with pytest.raises(ValueError, match="group_size"):
        quantize_wna16(w, 4, 0, True)
    with pytest.raises(TypeError, match="w_NK: expected dtype"):
        quantize_wna16(w.int(), 4, 32, True)
    with pytest.raises(ValueError, match="w_NK: expected at least 2 dims"):
        quantize_wna16(torch.randn(64), 4, 32, True)
    with pytest.raises(TypeError, match="sym"):
        quantize_wna16(w, 4, 32, 1)
    for bad in (float("inf"), float("-inf"), float("nan")):  # would turn its whole group into NaN
        poisoned = w.clone()
        poisoned[3, 40] = bad
        for sym in (True, False):
            with pytest.raises(ValueError, match="w_NK: expected finite values"):
                quantize_wna16(poisoned, 4, 32, sym)
    qw = quantize_wna16(w, 4, 32, False)
    with pytest.raises(TypeError, match="weight: expected a WNA16Weight"):
        dequantize_wna16(tuple(qw))
    with pytest.raises(ValueError, match="scales: expected shape"):
        dequantize_wna16(qw._replace(scales=qw.scales[:, :1]))
    with pytest.raises(TypeError, match="zeros: expected dtype"):
        dequantize_wna16(qw._replace(zeros=qw.zeros.int()))
    with pytest.raises(ValueError, match="qweight: expected shape"):
        dequantize_wna16(qw._replace(k=70))

    q, z, s = _random_gptq(64, 16, 32, 4, True)
    qweight, qzeros, scales = gptq_pack(q, z, s, 4)
    with pytest.raises(TypeError, match="qweight: expected dtype"):
        gptq_to_wna16(qweight.long(), qzeros, scales, None, bits=4, group_size=32, sym=True)
    with pytest.raises(ValueError, match="scales: expected shape"):
        gptq_to_wna16(qweight, qzeros, scales.t(), None, bits=4, group_size=32, sym=True)
    with pytest.raises(ValueError, match="g_idx: expected shape"):
        gptq_to_wna16(qweight, qzeros, scales, torch.zeros(63, dtype=torch.int32), bits=4, group_size=32, sym=True)
    with pytest.raises(ValueError, match="qzeros: expected an int32 tensor for sym=False"):
        gptq_to_wna16(qweight, None, scales, None, bits=4, group_size=32, sym=False)
    asym_q, asym_z, asym_s = _random_gptq(64, 16, 32, 4, False)
    with pytest.raises(ValueError, match="qzeros: expected every zero to be 8"):
        gptq_to_wna16(*gptq_pack(asym_q, asym_z, asym_s, 4), None, bits=4, group_size=32, sym=True)
    with pytest.raises(ValueError, match="g_idx: expected group indices"):
        dequantize_gptq(qweight, qzeros, scales, torch.full((64,), 2, dtype=torch.int32), bits=4, group_size=32,
                        sym=True)

    with pytest.raises(ValueError, match="qzeros: expected shape"):
        awq_to_wna16(awq_pack(q), awq_pack(q[:1]), s, group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        awq_to_wna16(awq_pack(q), awq_pack(z), s, group_size=True)

    packed = torch.zeros(16, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="k: expected a positive int"):
        compressed_tensors_to_wna16(packed, torch.ones(16, 2), bits=4, group_size=32, k=30)
    with pytest.raises(ValueError, match="weight_zero_point: expected shape"):
        compressed_tensors_to_wna16(packed, torch.ones(16, 2), torch.zeros(16, 2, dtype=torch.int32), bits=4,
                                    group_size=32)
    with pytest.raises(TypeError, match="weight_packed: expected dtype"):
        compressed_tensors_to_wna16(packed.view(torch.uint8), torch.ones(16, 2), bits=4, group_size=32)


def test_gptq_sym_zeros_are_checked_when_dequantized_too():
    # dequantize_gptq (act order, shared experts) refuses a "sym" checkpoint whose zeros are not the midpoint, as
    # gptq_to_wna16 does (it used whatever zeros were stored).
    q, z, s = _random_gptq(64, 8, 32, 4, True)
    z[0, 3] = 5
    with pytest.raises(ValueError, match="qzeros: expected every zero to be 8"):
        dequantize_gptq(*gptq_pack(q, z, s, 4), None, bits=4, group_size=32, sym=True)
