"""moekit.ops.quantize_mxfp4: dequantization bit-exact against transformers' gpt-oss decoder
(``convert_moe_packed_tensors``) and compressed-tensors' MXFP4 decompress, quantization bit-exact against
compressed-tensors' MXFP4 producer, the error on N(0,1) against QUANT_FORMATS.md's figure, rounding ties, refusals."""

import pytest
import torch

from moekit.ops.quantize_mxfp4 import E2M1_VALUES, dequantize_mxfp4, e8m0_to_float, quantize_mxfp4

# QUANT_FORMATS.md 1.11: rel-RMS of mxfp4 on N(0,1) [512, 1024]; ours must land within 20%.
REL_RMS = 0.112


def _random(shape_nk, seed=0, scale_range=(0, 255)):
    """Random codes uint8 [..., N, K/2] and e8m0 scales [..., N, K/32] (NaN's 255 left out)."""
    g = torch.Generator().manual_seed(seed)
    *lead, n, k = shape_nk
    codes = torch.randint(0, 256, (*lead, n, k // 2), generator=g).to(torch.uint8)
    scales = torch.randint(*scale_range, (*lead, n, k // 32), generator=g).to(torch.uint8)
    return codes, scales


def _formula(codes, scales):
    """W[n, k] = E2M1[nibble] · 2^(s − 127), element by element in float64 (exact), then float32."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    lo, hi = lut[(codes & 15).long()], lut[(codes >> 4).long()]
    values = torch.stack((lo, hi), -1).flatten(-2)
    exp = scales.double() - 127
    return (values * torch.pow(2.0, exp).repeat_interleave(32, -1)).float()


def test_dequantize_matches_transformers_gpt_oss_decoder_bit_exact():
    hf = pytest.importorskip("transformers.integrations.mxfp4")
    codes, scales = _random((3, 40, 96), scale_range=(0, 255))  # every e8m0 but NaN: 2^-127 .. 2^127
    scales[0, 0, 0] = 254  # 6 · 2^127 overflows float32 in both
    ours = dequantize_mxfp4(codes, scales)
    # gpt-oss blocks [E, N, K/32, 16]; transformers returns its own [E, K, N] layout
    ref = hf.convert_moe_packed_tensors(codes.view(3, 40, 3, 16), scales, dtype=torch.float32).transpose(1, 2)
    assert torch.equal(ours, ref)
    assert torch.equal(ours, _formula(codes, scales))
    assert torch.isinf(ours[0, 0, :32]).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_and_dequantize_match_compressed_tensors_bit_exact(dtype):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import MXFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 4).to(dtype)
    w[0, :32] = 0                 # an all-zero group
    w[1, 3] = -1e-4               # a negative rounding to 0: code -0
    w[2, :32] = 1.75 * 2.0**-3    # amax with mantissa 1.75: the scale rounds up
    w[3, :32] = 1.7 * 2.0**5      # just below: it does not
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    groups = w.view(64, 8, 32)
    s, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    sd = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": s}, scheme)
    codes, scales = quantize_mxfp4(w)
    assert torch.equal(codes, sd["weight_packed"]) and torch.equal(scales, sd["weight_scale"])
    ref = MXFP4PackedCompressor.decompress(dict(sd), scheme)["weight"]
    assert torch.equal(dequantize_mxfp4(codes, scales).to(dtype), ref)  # decompress rounds to the weight dtype


def test_quantize_error_matches_the_documented_figure():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    out = dequantize_mxfp4(*quantize_mxfp4(w))
    rel = float((out - w).norm() / w.norm())
    assert abs(rel / REL_RMS - 1) < 0.2, rel


def test_quantize_rounds_ties_to_even_and_clamps():
    # One group with amax 6 (s = 127 + 2 - 2: unit scale), the ties between every pair of e2m1 neighbours.
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    row = torch.tensor(ties + [-t for t in ties] + [6.0, -6.0, 5.9, 0.3] + [0.0] * 14)
    codes, scales = quantize_mxfp4(row.view(1, 32))
    assert scales.item() == 127
    out = dequantize_mxfp4(codes, scales)[0]
    assert out[:14].tolist() == expected + [-e for e in expected]
    assert out[14:18].tolist() == [6.0, -6.0, 6.0, 0.5]
    # amax 7.5 ≥ 1.75 · 4: the scale rounds up to 2 and 7.5 becomes 8 (4 · 2), not a clamped 6.
    codes, scales = quantize_mxfp4(torch.full((1, 32), 7.5))
    assert scales.item() == 128 and dequantize_mxfp4(codes, scales).unique().tolist() == [8.0]


def test_quantize_is_exact_on_representable_weights_and_leaves_the_input():
    codes, scales = _random((2, 8, 64), seed=3, scale_range=(100, 150))
    w = dequantize_mxfp4(codes, scales)
    before = w.clone()
    again = dequantize_mxfp4(*quantize_mxfp4(w))
    assert torch.equal(again, w) and torch.equal(w, before)


def _per_element(codes, scales):
    """The definition computed element by element in float32 (a value per nibble, times its group's scale): what
    the one-lookup-per-byte table must reproduce bit for bit, NaN scale included."""
    lut = torch.tensor(E2M1_VALUES)
    values = torch.stack((lut[(codes & 15).long()], lut[(codes >> 4).long()]), -1).flatten(-2)
    return (values.unflatten(-1, (-1, 32)) * e8m0_to_float(scales).unsqueeze(-1)).flatten(-2)


def test_dequantize_every_scale_and_byte_bit_exact():
    # Every (e8m0, code byte) pair once: row s holds scale s (255: NaN) over all 256 bytes (16 groups of 16 bytes).
    codes = torch.arange(256, dtype=torch.uint8).repeat(256, 1)
    scales = torch.arange(256, dtype=torch.uint8).unsqueeze(1).repeat(1, 16)
    got, want = dequantize_mxfp4(codes, scales), _per_element(codes, scales)
    assert got.dtype == torch.float32 and got.shape == (256, 512)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[255]).all()
    assert torch.equal(got[:255].view(torch.int32), want[:255].view(torch.int32))  # -0, inf, 2^-128 too


def test_dequantize_views_batches_and_empty():
    codes, scales = _random((3, 8, 128), seed=4)
    codes_before, scales_before = codes.clone(), scales.clone()
    want = _per_element(codes, scales)
    assert torch.equal(dequantize_mxfp4(codes, scales), want)   # leading dims
    assert torch.equal(codes, codes_before) and torch.equal(scales, scales_before)
    assert torch.equal(dequantize_mxfp4(codes[:, ::2], scales[:, ::2]), want[:, ::2])  # strided rows
    assert torch.equal(dequantize_mxfp4(codes[1].t().contiguous().t(), scales[1].t().contiguous().t()),
                       want[1])  # column-major
    assert dequantize_mxfp4(codes[:, :0], scales[:, :0]).shape == (3, 0, 128)  # no rows


def test_e8m0_nan_and_subnormal():
    s = torch.tensor([0, 1, 127, 254, 255], dtype=torch.uint8)
    f = e8m0_to_float(s)
    assert f[:4].tolist() == [2.0**-127, 2.0**-126, 1.0, 2.0**127] and torch.isnan(f[4])


@pytest.mark.parametrize(("codes", "scales", "match"), [
    (torch.zeros(4, 16, dtype=torch.int8), torch.zeros(4, 1, dtype=torch.uint8), "codes: expected dtype"),
    (torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1), "scales: expected dtype"),       # float scales
    (torch.zeros(4, 24, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8), "codes: expected shape"),  # K 48
    (torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8), r"scales: expected shape \(4, 2\)"),
    (torch.zeros(16, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8), "codes: expected shape"),
])
def test_dequantize_refusals(codes, scales, match):
    with pytest.raises((TypeError, ValueError), match=match):
        dequantize_mxfp4(codes, scales)


def test_quantize_refusals():
    with pytest.raises(ValueError, match=r"w_NK: expected shape \[..., N, K\] with K a multiple of 32"):
        quantize_mxfp4(torch.zeros(4, 48))
    with pytest.raises(TypeError, match="w_NK: expected dtype"):
        quantize_mxfp4(torch.zeros(4, 32, dtype=torch.float64))
    w = torch.zeros(4, 32)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="w_NK: expected finite values"):
        quantize_mxfp4(w)
