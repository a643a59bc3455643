"""moekit.ops.quantize: the 8-bit reference quantizers, against transformers' fp8 block (de)quantizer and the
format's definition (zero blocks, short edge blocks, rounding)."""

import types

import pytest
import torch

from moekit.ops.quantize import (
    dequantize_activation,
    dequantize_blocks,
    dequantize_weight,
    quantize_activation,
    quantize_blocks,
    quantize_weight,
)

fp8_tf = pytest.importorskip("transformers.integrations.finegrained_fp8")


def _transformers_block(w):
    from transformers import FineGrainedFP8Config

    hfq = types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=[128, 128]))
    out = fp8_tf.Fp8Quantize(hfq).convert({"experts.gate_up_proj": w})
    return out["experts.gate_up_proj"], out["experts.gate_up_proj_scale_inv"], fp8_tf.Fp8Dequantize(hfq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_quantize_is_transformers_bit_for_bit(dtype):
    # [E, N, K] multiples of 128 (transformers' domain); one all-zero block; a block holding one huge value.
    w = (torch.randn(3, 256, 384) * 0.02).to(dtype)
    w[0, :128, :128] = 0
    w[1, 128:, 256:] *= 1e4
    tq, ts, deq = _transformers_block(w)
    q, s = quantize_weight(w, "fp8_e4m3", "block", (128, 128))
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (3, 2, 3)
    assert torch.equal(q.view(torch.uint8), tq.view(torch.uint8))
    # transformers stores 1.0 for an all-zero block, moekit 0 (its amax / 448); both dequantize to exact zeros.
    assert s[0, 0, 0] == 0 and ts[0, 0, 0] == 1
    ts = ts.clone()
    ts[0, 0, 0] = 0
    assert torch.equal(s, ts)
    ours = dequantize_weight(q, s, "block", (128, 128))
    assert torch.equal(ours, deq._dequantize_one(tq, ts, torch.float32))
    assert torch.equal(ours[0, :128, :128], torch.zeros(128, 128))


def test_block_scale_is_the_dequant_multiplier():
    # DeepSeek-V3's weight_scale_inv: s = amax / 448 (to one ulp), W ≈ q · s[n // 128, k // 128].
    w = torch.randn(256, 256)
    q, s = quantize_blocks(w, (128, 128), "fp8_e4m3")
    amax = w.reshape(2, 128, 2, 128).abs().amax(dim=(1, 3))
    torch.testing.assert_close(s, amax / 448, rtol=2**-23, atol=0)
    assert q.float().abs().max() == 448  # the block maximum maps to the largest code
    rel = (dequantize_blocks(q, s, (128, 128)) - w).norm() / w.norm()
    assert rel < 0.035  # QUANT_FORMATS.md: fp8 block rel-RMS 0.026 on N(0, 1)


def test_short_edge_blocks_behave_as_zero_padded():
    # N = 200, K = 130: the last block row/column is short; its scale is the one of the block padded with zeros.
    w = torch.randn(200, 130)
    q, s = quantize_blocks(w, (128, 128), "fp8_e4m3")
    assert q.shape == (200, 130) and s.shape == (2, 2)
    padded = torch.zeros(256, 256)
    padded[:200, :130] = w
    qp, sp = quantize_blocks(padded, (128, 128), "fp8_e4m3")
    assert torch.equal(s, sp) and torch.equal(q.view(torch.uint8), qp[:200, :130].view(torch.uint8))
    assert torch.equal(dequantize_blocks(q, s, (128, 128)), dequantize_blocks(qp, sp, (128, 128))[:200, :130])


def test_block_weight_keeps_gate_and_up_apart():
    # I = 200 is not a multiple of 128: gate rows [0, 200) and up rows [200, 400) are blocked separately, so no
    # scale spans both; the scale rows are [2 gate, 2 up] (vLLM's 2·⌈I/128⌉).
    w = torch.randn(400, 256)
    w[200:] *= 100  # a block straddling gate and up would take up's amax for gate rows
    q, s = quantize_weight(w, "fp8_e4m3", "block", (128, 128), gate_rows=200)
    assert s.shape == (4, 2)
    qg, sg = quantize_weight(w[:200], "fp8_e4m3", "block", (128, 128))
    assert torch.equal(s[:2], sg) and torch.equal(q[:200].view(torch.uint8), qg.view(torch.uint8))
    deq = dequantize_weight(q, s, "block", (128, 128), gate_rows=200)
    assert (deq - w)[:200].norm() / w[:200].norm() < 0.035


@pytest.mark.parametrize("qdtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_all_zero_weights_give_zeros_not_nan(qdtype, granularity):
    w = torch.zeros(2, 256, 128)
    q, s = quantize_weight(w, qdtype, granularity, (128, 128) if granularity == "block" else None)
    assert torch.equal(s, torch.zeros_like(s))
    deq = dequantize_weight(q, s, granularity, (128, 128) if granularity == "block" else None)
    assert torch.equal(deq, torch.zeros_like(w))


@pytest.mark.parametrize("qdtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize(("granularity", "gate_rows"), [("tensor", None), ("channel", None), ("block", None),
                                                        ("block", 200)])  # gate/up blocked apart: both halves
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_weights_are_refused(qdtype, granularity, gate_rows, bad):
    # An inf makes its block's amax inf (multiplier 0, scale inf: every code of the block dequantizes to NaN); a
    # NaN spreads through amax the same way. Neither has a code, so the quantizer refuses instead.
    block = (128, 128) if granularity == "block" else None
    for row in (3, 250):  # in the gate half and in the up half
        w = torch.randn(2, 384, 130)
        w[1, row, 129] = bad
        with pytest.raises(ValueError, match="w_NK: expected finite values"):
            quantize_weight(w, qdtype, granularity, block, gate_rows=gate_rows)


def test_int8_channel_rounds_half_to_even():
    # s = amax / 127 = 1 for a row holding 127: codes are round-half-even of x, clamped to ±127.
    w = torch.tensor([[127.0, 2.5, -2.5, 3.5, 0.5, -126.5]])
    q, s = quantize_weight(w, "int8", "channel")
    assert s.shape == (1, 1) and s.item() == 1.0
    assert q.tolist() == [[127, 2, -2, 4, 0, -126]]


def test_fp8_codes_clamp_to_448():
    # A static scale smaller than amax / 448 saturates at ±448 instead of turning into NaN.
    x = torch.tensor([[1000.0, -1000.0, 1.0]])
    q, s = quantize_activation(x, "fp8_e4m3", "tensor", static_scale=torch.tensor([1.0]))
    assert q.float().tolist() == [[448.0, -448.0, 1.0]] and s.item() == 1.0


@pytest.mark.parametrize(("qdtype", "granularity", "scale_shape"), [
    ("fp8_e4m3", "group", (5, 3)),    # per token, per 128 columns: 300 = 2·128 + 44
    ("fp8_e4m3", "token", (5, 1)),
    ("fp8_e4m3", "tensor", ()),
    ("int8", "token", (5, 1)),
])
def test_activation_quantizers(qdtype, granularity, scale_shape):
    x = torch.randn(5, 300, dtype=torch.bfloat16)
    x[1] = 0  # an all-zero token: scale 0, zeros back
    x[2, 7] = 1e4  # an outlier only coarsens its own row (group: its own 128 columns)
    q, s = quantize_activation(x, qdtype, granularity, 128)
    assert s.shape == scale_shape and s.dtype == torch.float32
    deq = dequantize_activation(q, s, granularity, 128)
    assert torch.isfinite(deq).all() and torch.equal(deq[1], torch.zeros(300))
    ref = x.float()
    if granularity != "tensor":
        assert s[1].eq(0).all()
        others = [0, 3, 4]
        step = 2**-4 if qdtype == "fp8_e4m3" else 0.5 / 127  # worst relative rounding error of the row maximum
        assert ((deq[others] - ref[others]).abs() <= step * ref[others].abs().amax(-1, keepdim=True) + 1e-6).all()


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="x: expected dtype"):
        quantize_blocks(torch.zeros(4, 4, dtype=torch.int32), (2, 2), "fp8_e4m3")
    with pytest.raises(TypeError, match="w_NK: expected dtype"):
        quantize_weight(torch.zeros(4, 4, dtype=torch.int32), "int8", "channel")
    with pytest.raises(ValueError, match=r"w_NK: expected at least 2 dims \[..., N, K\], got shape \(4,\)"):
        quantize_weight(torch.zeros(4), "int8", "channel")
    with pytest.raises(ValueError, match="qdtype: expected one of"):
        quantize_blocks(torch.zeros(4, 4), (2, 2), "fp4")
    with pytest.raises(ValueError, match="block_shape: expected two positive ints"):
        quantize_blocks(torch.zeros(4, 4), (0, 2), "fp8_e4m3")
    with pytest.raises(ValueError, match=r"scale: expected shape \(2, 2\)"):
        dequantize_blocks(torch.zeros(4, 4, dtype=torch.float8_e4m3fn), torch.ones(2, 3), (2, 2))
    with pytest.raises(ValueError, match="static_scale: expected one element with tensor granularity"):
        quantize_activation(torch.zeros(2, 4), "fp8_e4m3", "token", static_scale=torch.ones(1))
    with pytest.raises(ValueError, match="group_size: expected a positive int"):
        quantize_activation(torch.zeros(2, 4), "fp8_e4m3", "group")


@pytest.mark.parametrize("qdtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize(("granularity", "block_shape"), [("block", (128, 128)), ("channel", None)])
def test_a_weight_block_of_subnormal_values_is_finite(qdtype, granularity, block_shape):
    # Its largest value subnormal: the multiplier was inf, the block's zeros NaN codes (0 * inf), its scale 0.
    w = torch.randn(256, 256) / 16
    w[:128, :128] = 0.0
    w[3, 7] = 1e-40
    q, s = quantize_weight(w, qdtype, granularity, block_shape)
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all()
    deq = dequantize_weight(q, s, granularity, block_shape)
    assert torch.isfinite(deq).all() and abs(deq[3, 7].item()) <= 1e-30
