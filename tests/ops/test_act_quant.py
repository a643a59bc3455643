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
@pytest.mark.parametrize("scale", [0.0, 0.37, 1e-4, -0.01, 1e-40, float("nan")])
def test_static_scale(qdtype, scale):
    # A given per-tensor scale (checkpoint input_scale): codes saturate at ±QMAX. A scale that is not a positive
    # normal float (0, negative, subnormal, NaN) is NaN, so everything it scales dequantizes to NaN (0 gave zero
    # codes and a finite scale: a silently all-zero layer).
    x = _x(6, 200, torch.bfloat16)
    static = torch.tensor([scale])
    q, s = act_quant(x, qdtype, "tensor", static_scale=static)
    q_ref, s_ref = act_quant_ref(x, qdtype, "tensor", static_scale=static)
    assert torch.equal(q.float(), q_ref.float())
    if scale > 1e-38:
        assert torch.equal(s, s_ref)
    else:
        assert torch.isnan(s) and torch.isnan(s_ref) and torch.isnan(dequantize_activation(q, s, "tensor")).all()


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
    # A column-major s (DeepGEMM's layout) got its scales written to the wrong places.
    with pytest.raises(ValueError, match=r"out\[1\]: expected float32 \[2, 4\] with a contiguous last dim"):
        act_quant(torch.randn(2, 512), "fp8_e4m3", "group", 128,
                  out=(torch.empty(2, 512, dtype=torch.float8_e4m3fn), torch.empty(4, 2).t()))


@pytest.mark.parametrize("qdtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize(("granularity", "group"), CASES)
def test_a_nan_dequantizes_to_nan_and_stays_in_its_group(qdtype, granularity, group):
    # A NaN amax took the all-zero branch (s = 0, codes 0: the NaN vanished, and a per-tensor batch became all
    # zeros on the torch side); the kernel's max and clamp dropped it (a finite scale and code -QMAX). Now the
    # group's scale is NaN on both sides, every other group is untouched, per-tensor scaling makes all NaN.
    x = torch.randn(3, 256)
    clean = act_quant_ref(x, qdtype, granularity, group)
    x[1, 5] = float("nan")
    for q, s in (act_quant(x, qdtype, granularity, group), act_quant_ref(x, qdtype, granularity, group)):
        deq = dequantize_activation(q, s, granularity, group)
        if granularity == "tensor":
            assert torch.isnan(s) and torch.isnan(deq).all()
            continue
        assert torch.isnan(deq[1, 5])
        nan_group = torch.isnan(s)
        assert nan_group.sum() == 1 and nan_group[1].any()  # that row's group alone
        assert torch.equal(s[~nan_group], clean[1][~nan_group])
        assert torch.equal(deq[[0, 2]], dequantize_activation(*clean, granularity, group)[[0, 2]])


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qdtype", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize(("granularity", "group"), CASES)
def test_gpu_matches_ref_and_keeps_nan(qdtype, granularity, group):
    # The kernel on a GPU (real fp8 casts, the GPU's NaN semantics of max and clamp) against the torch reference
    # on the same device: bit for bit on finite rows, NaN scales where the reference has them.
    x = _x(7, 1030, torch.bfloat16).cuda()
    x[4, 17] = float("nan")
    q, s = act_quant(x, qdtype, granularity, group)
    q_ref, s_ref = act_quant_ref(x, qdtype, granularity, group)
    assert torch.equal(torch.isnan(s), torch.isnan(s_ref)) and torch.isnan(s).any()
    finite = ~torch.isnan(s_ref)
    assert torch.equal(s[finite], s_ref[finite])
    deq, deq_ref = (dequantize_activation(a, b, granularity, group) for a, b in ((q, s), (q_ref, s_ref)))
    assert torch.equal(torch.isnan(deq), torch.isnan(deq_ref))
    assert torch.equal(deq[~torch.isnan(deq)], deq_ref[~torch.isnan(deq_ref)])
