"""act_quant (Triton) vs act_quant_ref (moekit.ops.quantize.quantize_activation): the same codes and scales, bit for
bit, in the interpreter — including the values the interpreter's own fp8 cast rounds wrongly."""

import pytest
import torch

from moekit.ops.act_quant import act_quant, act_quant_ref
from moekit.ops.quantize import dequantize_activation

CASES = [("group", 128), ("group", 64), ("token", None), ("tensor", None)]


def _x(m, k, dtype):
    # Rows spread over 6 decades; the first holds e4m3 ties and values just under powers of two (where the
    # interpreter's cast carries into the exponent wrongly), signed zeros and a denormal-range value.
    x = torch.randn(m, k) * torch.logspace(-3, 3, m)[:, None]
    x[0, :9] = torch.tensor([15.5, 31.75, 127.4, -0.0, 0.0, 1e-30, 240.0, 248.0, -9.0])
    if m > 2:
        x[2] = 0  # an all-zero row: scale 0, codes 0, no NaN
    return x.to(dtype)


@pytest.mark.parametrize("qdtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize(("granularity", "group"), CASES)
@pytest.mark.parametrize(("m", "k"), [
    (5, 300),    # ragged last group (300 = 2·128 + 44), rows not a multiple of the 4-row program
    (1, 128),    # one row, one whole group
    (7, 1030),   # token: one ragged 2048-wide tile a pass; tensor: two 1024-wide chunks, the second ragged
    (3, 9000),   # token: three 4096-wide tiles a pass (the loop), ragged tail; tensor: nine chunks
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_ref_bit_for_bit(qdtype, granularity, group, m, k, dtype):
    x = _x(m, k, dtype)
    q, s = act_quant(x, qdtype, granularity, group)
    q_ref, s_ref = act_quant_ref(x, qdtype, granularity, group)
    assert q.dtype == q_ref.dtype and s.shape == s_ref.shape
    assert torch.equal(q.float(), q_ref.float())
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("qdtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("scale", [0.0, 0.37, 1e-4])
def test_static_scale(qdtype, scale):
    # A given per-tensor scale (checkpoint input_scale): codes saturate at ±QMAX; 0 gives zero codes.
    x = _x(6, 200, torch.bfloat16)
    static = torch.tensor([scale])
    q, s = act_quant(x, qdtype, "tensor", static_scale=static)
    q_ref, s_ref = act_quant_ref(x, qdtype, "tensor", static_scale=static)
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(s, s_ref)


def test_out_buffers_and_empty():
    x = _x(3, 256, torch.float32)
    q = torch.empty(3, 256, dtype=torch.float8_e4m3fn)
    s = torch.empty(3, 2)
    rq, rs = act_quant(x, "fp8_e4m3", "group", 128, out=(q, s))
    assert rq is q and rs is s
    q_ref, s_ref = act_quant_ref(x, "fp8_e4m3", "group", 128)
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(s, s_ref)
    q0, s0 = act_quant(torch.empty(0, 256), "int8", "token")
    assert q0.shape == (0, 256) and s0.shape == (0, 1)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="x_MK"):
        act_quant(torch.randn(2, 3, 4), "fp8_e4m3", "token")
    with pytest.raises(ValueError, match="x_MK"):
        act_quant(torch.randn(8, 4).t(), "fp8_e4m3", "token")
    with pytest.raises(ValueError, match="qdtype"):
        act_quant(torch.randn(2, 4), "fp4", "token")
    with pytest.raises(ValueError, match="group_size"):
        act_quant(torch.randn(2, 4), "int8", "group")
    with pytest.raises(ValueError, match="static_scale"):
        act_quant(torch.randn(2, 4), "int8", "token", static_scale=torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"out\[0\]"):
        act_quant(torch.randn(2, 4), "int8", "token", out=(torch.empty(2, 4), torch.empty(2, 1)))


@pytest.mark.parametrize("qdtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize(("granularity", "group"), CASES)
def test_a_group_of_subnormal_values_is_finite(qdtype, granularity, group):
    # A group whose largest value is subnormal (1/amax overflows fp32) made m = inf: its zeros became NaN codes
    # (0 * inf) and s = 0, so the group dequantized to NaN. amax is floored at 2^-100: finite codes, a finite
    # scale, values dequantized to (about) themselves; kernel and reference agree bit for bit.
    x = torch.zeros(3, 256)
    x[0, 0], x[0, 5] = 1e-40, -3e-41
    x[1, 1] = 1e-39
    x[2] = torch.randn(256)
    x[2, 130:] = 0.0
    x[2, 200] = 2e-45  # the smallest fp32 subnormal, alone in the row's second group
    q, s = act_quant(x, qdtype, granularity, group)
    q_ref, s_ref = act_quant_ref(x, qdtype, granularity, group)
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(s, s_ref)
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all()
    deq = dequantize_activation(q_ref, s_ref, granularity, group)
    assert torch.isfinite(deq).all()
    assert (deq[:2] - x[:2]).abs().max().item() <= 1e-30  # the subnormal rows: ~themselves (or 0)
    assert (deq[2] - x[2]).abs().max().item() <= 0.07 * x[2].abs().max().item()  # e4m3: half a step is 1/16
