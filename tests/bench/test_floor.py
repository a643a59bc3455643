"""The floor arithmetic of MEASURING.md, checked by hand."""

import pytest
import torch

import moekit.bench.floor as floor
from moekit.bench.floor import BENCH_SCHEMES, Ceilings, floor_us, matmul_dtype, moe_bytes, moe_flops
from moekit.bench.shapes import PRESETS, MoEShape


def test_bytes_and_flops_by_hand():
    s = MoEShape(name="t", num_experts=8, hidden_size=4096, intermediate_size=14336, top_k=2)
    # 2 active experts, bf16: weights 2 * 3 * 4096 * 14336 * 2 B, plus x and out: 2 * T * H * 2 B
    assert moe_bytes(s, 1, 2, 2) == 2 * 3 * 4096 * 14336 * 2 + 2 * 1 * 4096 * 2
    assert moe_flops(s, 1) == 2 * 1 * 2 * 3 * 4096 * 14336


def test_biases_count_and_relu2_has_no_gate():
    s = PRESETS["gpt-oss-120b"]
    per_expert = (3 * 2880 * 2880 + 2 * 2880 + 2880) * 2
    assert moe_bytes(s, 0, 1, 2) == per_expert
    r = MoEShape(name="r", num_experts=4, hidden_size=8, intermediate_size=16, top_k=1, activation="relu2")
    assert moe_flops(r, 3) == 2 * 3 * 1 * 2 * 8 * 16


def test_floor_is_the_larger_term():
    s = PRESETS["mixtral-8x7b"]
    c = Ceilings(read_bw=4.4e12, mm_rate=7.5e14)
    t1 = floor_us(s, 1, 2, 2, c)
    assert abs(t1 - moe_bytes(s, 1, 2, 2) / 4.4e12 * 1e6) < 1e-9  # decode: bandwidth-bound
    t16k = floor_us(s, 16384, 8, 2, c)
    assert abs(t16k - moe_flops(s, 16384) / 7.5e14 * 1e6) < 1e-9  # prefill: compute-bound


def test_quantized_bytes_count_codes_and_scales_by_hand():
    # mixtral: H = 4096, I = 14336 (112 blocks of 128), gated: w13 [2I, H], w2 [H, I], 1 byte a weight.
    s = PRESETS["mixtral-8x7b"]
    codes = 3 * 4096 * 14336
    acts = 2 * 3 * 4096 * 2  # T = 3 tokens in and out, bf16
    block_scales = (2 * 112 * 32 + 32 * 112) * 4  # w13: gate and up blocked apart, [224, 32]; w2 [32, 112]
    assert moe_bytes(s, 3, 2, 2, "fp8_block") == 2 * (codes + block_scales) + acts
    channel_scales = (2 * 14336 + 4096) * 4  # one per output row
    assert moe_bytes(s, 3, 2, 2, "fp8_channel") == 2 * (codes + channel_scales) + acts
    assert moe_bytes(s, 3, 2, 2, "int8_channel") == 2 * (codes + channel_scales) + acts
    assert moe_bytes(s, 3, 2, 2, "fp8_tensor") == 2 * (codes + 2 * 4) + acts  # one scale per expert and weight
    # Biases stay in the activation dtype.
    g = PRESETS["gpt-oss-120b"]
    assert moe_bytes(g, 0, 1, 2, "fp8_tensor") == 3 * 2880 * 2880 + 8 + (2 * 2880 + 2880) * 2


def test_quantized_floor_uses_the_quantized_bytes():
    s = PRESETS["mixtral-8x7b"]
    c = Ceilings(read_bw=4.4e12, mm_rate=1.25e15, mm_dtype="fp8_e4m3")
    assert abs(floor_us(s, 1, 2, 2, c, "fp8_block") - moe_bytes(s, 1, 2, 2, "fp8_block") / 4.4e12 * 1e6) < 1e-9


def test_weight_only_bytes_count_packed_codes_scales_and_zero_points_by_hand():
    # mixtral: w13 [2I, H] = [28672, 4096], w2 [H, I] = [4096, 14336]; groups of 128 along K: 32 and 112.
    s = PRESETS["mixtral-8x7b"]
    acts = 2 * 3 * 4096 * 2  # T = 3 tokens in and out, bf16
    groups = 28672 * 32 + 4096 * 112
    half_bytes = 3 * 4096 * 14336 // 2  # two 4-bit codes a byte
    assert moe_bytes(s, 3, 2, 2, "w4a16_g128") == 2 * (half_bytes + 2 * groups) + acts  # bf16 scales
    assert moe_bytes(s, 3, 2, 2, "w4a16_g128_asym") == 2 * (half_bytes + 3 * groups) + acts  # + uint8 zero points
    assert moe_bytes(s, 3, 2, 2, "w8a16_g128") == 2 * (2 * half_bytes + 2 * groups) + acts
    assert moe_bytes(s, 0, 1, 4, "w4a16_g128") == half_bytes + 4 * groups  # fp32 activations: fp32 scales
    # An odd K packs into ⌈K/2⌉ bytes a row and a short last group (olmoe-like toy: H = 33, I = 20).
    t = MoEShape(name="t", num_experts=2, hidden_size=33, intermediate_size=20, top_k=1)
    assert moe_bytes(t, 0, 1, 2, "w4a16_g128") == 40 * 17 + 33 * 10 + 2 * (40 + 33)


def test_weight_only_flops_are_bounded_by_the_bf16_matmul():
    s = PRESETS["mixtral-8x7b"]
    assert matmul_dtype("w4a16_g128") == "bf16" and matmul_dtype(None) == "bf16"
    assert matmul_dtype("fp8_block") == "fp8_e4m3" and matmul_dtype("int8_channel") == "int8"
    c = Ceilings(read_bw=4.4e12, mm_rate=7.5e14)
    assert abs(floor_us(s, 1, 2, 2, c, "w4a16_g128") - moe_bytes(s, 1, 2, 2, "w4a16_g128") / 4.4e12 * 1e6) < 1e-9
    assert abs(floor_us(s, 16384, 8, 2, c, "w4a16_g128") - moe_flops(s, 16384) / 7.5e14 * 1e6) < 1e-9


def test_mxfp4_bytes_count_codes_and_one_scale_byte_per_32_by_hand():
    # gpt-oss-120b: w13 [2I, H] = [5760, 2880], w2 [H, I] = [2880, 2880]: half a byte a weight, 2880 / 32 = 90
    # e8m0 bytes a row; the biases stay in the activation dtype. The flops are bounded by the bf16 matmul.
    g = PRESETS["gpt-oss-120b"]
    per_expert = (5760 + 2880) * (1440 + 90) + (5760 + 2880) * 2
    acts = 2 * 3 * 2880 * 2
    assert moe_bytes(g, 3, 4, 2, "mxfp4") == 4 * per_expert + acts
    assert moe_bytes(g, 0, 1, 2, "mxfp4") < 0.3 * moe_bytes(g, 0, 1, 2)  # against bf16 weights
    assert matmul_dtype("mxfp4") == "bf16" and "mxfp4" in BENCH_SCHEMES
    c = Ceilings(read_bw=4.4e12, mm_rate=7.5e14)
    assert abs(floor_us(g, 1, 4, 2, c, "mxfp4") - moe_bytes(g, 1, 4, 2, "mxfp4") / 4.4e12 * 1e6) < 1e-9


def test_read_kernels_read_every_element_once():
    # Both read-ceiling kernels must touch every element exactly once (a kernel that skipped or re-read tiles would
    # report a wrong bandwidth): their partial sums add up to the tensor's sum.
    import torch

    from moekit.bench._kernels import _stream_read, _stream_tiles

    k_dim, rows = 256, 96
    x = torch.randint(-8, 8, (rows, k_dim)).to(torch.float16)  # small integers: the fp32 sums are exact
    grid = 5
    out = torch.empty(grid, dtype=torch.float32)
    _stream_read[(grid,)](x.view(-1), out, x.numel(), BLOCK=512)
    assert out.sum().item() == x.float().sum().item()
    block_n, block_k = 32, 64
    out = torch.empty(rows // block_n, dtype=torch.float32)
    _stream_tiles[(rows // block_n,)](x.view(-1), out, k_dim, BLOCK_N=block_n, BLOCK_K=block_k)
    assert out.sum().item() == x.float().sum().item()
    assert out[0].item() == x[:block_n].float().sum().item()


@pytest.mark.parametrize("native", [True, False])
def test_matmul_ceiling_is_the_dots_the_layer_runs(monkeypatch, native):
    # fp8 on a GPU without fp8 dots (compute capability < 8.9): the layer runs its dots in the activation dtype,
    # and measuring torch._scaled_mm there crashed; --dtype fp32 was floored with the bf16 rate.
    seen = []
    monkeypatch.setattr(floor, "native_8bit_dots", lambda qdtype, device: seen.append((qdtype, device)) or native)
    gpu = torch.device("cuda", 1)
    assert matmul_dtype("fp8_block", torch.bfloat16, gpu) == ("fp8_e4m3" if native else "bf16")
    assert seen == [("fp8_e4m3", gpu)]
    assert matmul_dtype("fp8_tensor", torch.float16, gpu) == ("fp8_e4m3" if native else "fp16")
    assert matmul_dtype("int8_channel", torch.float32, gpu) == ("int8" if native else "fp32")
    assert matmul_dtype(None, torch.float32, gpu) == "fp32" and matmul_dtype("mxfp4", torch.float16, gpu) == "fp16"
    assert matmul_dtype("w4a16_g128", torch.float32, gpu) == "fp32"
    with pytest.raises(ValueError, match="dtype: expected one of .* got torch.float64"):
        matmul_dtype(None, torch.float64, gpu)


@pytest.mark.parametrize("mm_dtype", ["bf16", "fp16", "fp32"])
def test_float_matmuls_run_in_their_dtype(mm_dtype):
    out = floor._matmul(mm_dtype, torch.device("cpu"), n=16)()
    assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[mm_dtype]


@pytest.mark.gpu
def test_measure_ceilings_records_the_matmul_it_timed():
    device = torch.device("cuda")
    fp8 = floor.measure_ceilings(device, "fp8_block")
    assert fp8.mm_dtype == ("fp8_e4m3" if floor.native_8bit_dots("fp8_e4m3", device) else "bf16")
    fp32 = floor.measure_ceilings(device, None, torch.float32)
    assert fp32.mm_dtype == "fp32" and fp32.mm_rate < floor.measure_ceilings(device).mm_rate
