"""The hardware floor of one MoE call, exactly as MEASURING.md defines it.

    bytes    = weight bytes of every expert with >= 1 routed token (biases included) + T·H·in + T·H·out
    flops    = 2 · T · K · (rows(w13) + I) · H          (= 2·T·K·3·H·I for gated activations)
    floor_us = max(bytes / read_bw, flops / mm_rate)

With an 8-bit scheme (``moekit bench --quant fp8_block``, ...) a weight is 1 byte, each touched expert adds its
float32 scales, and ``mm_rate`` is the 8-bit matmul's (``torch._scaled_mm`` fp8 or ``torch._int_mm`` int8) where
the GPU has those dots, else the activation dtype's (the layer runs its dots there). With a weight-only scheme
(``w4a16_g128``, ``w4a16_g128_asym``, ``w8a16_g128``) a weight is its packed code (half a byte at 4 bits, a byte
at 8), each touched expert adds its group scales (in the activation dtype, as ``moekit.quantize`` keeps them)
and, asymmetric, a one-byte zero point per group; ``mm_rate`` is the activation dtype's matmul (the codes are
dequantized to it for the dots). With ``mxfp4`` a weight is half a byte of e2m1 code and every 32 of them share
one e8m0 scale byte (``mxfp4_bytes``); ``mm_rate`` is the activation dtype's matmul too, as it is unquantized
(bf16, fp16 or fp32: ``matmul_dtype``). ``read_bw`` and ``mm_rate`` are measured in the same run by
``measure_ceilings``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit.bench.shapes import MoEShape
from moekit.ops.quantize import expert_scale_shapes, native_8bit_dots
from moekit.ops.quantize_mxfp4 import GROUP as MXFP4_GROUP
from moekit.quant import MXFP4_SCHEMES, QUANT_SCHEMES, WNA16_SCHEMES

# The schemes ``moekit bench --quant`` times: 8-bit weights and activations, weight-only 4/8-bit groups, mxfp4.
BENCH_SCHEMES = [*QUANT_SCHEMES, *WNA16_SCHEMES, *MXFP4_SCHEMES]
# The float matmuls a layer's dots can run in (the activation dtype's), by the name ``Ceilings.mm_dtype`` records.
FLOAT_MATMULS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Ceilings:
    read_bw: float  # bytes / s
    mm_rate: float  # flop / s
    mm_dtype: str = "bf16"  # the matmul mm_rate was measured with: bf16, fp16, fp32, fp8_e4m3 or int8


def scale_bytes(shape: MoEShape, scheme: str) -> int:
    """float32 scale bytes of one expert (w13 and w2) under ``scheme`` (an 8-bit ``moekit.quantize`` scheme)."""
    method = QUANT_SCHEMES[scheme]
    s13, s2 = expert_scale_shapes(method.granularity, method.block_shape, num_experts=1, hidden=shape.hidden_size,
                                  inter=shape.intermediate_size, gated=shape.activation.is_gated)
    return 4 * (math.prod(s13) + math.prod(s2))


def wna16_bytes(shape: MoEShape, scheme: str, elem_size: int) -> int:
    """Bytes of one expert's w13 and w2 under a weight-only ``scheme`` (``moekit.quant.WNA16_SCHEMES``): packed
    codes, group scales of ``elem_size`` bytes, and one-byte zero points when asymmetric."""
    method = WNA16_SCHEMES[scheme]()
    total = 0
    # (rows, K) of w13 [R, H] and w2 [H, I]
    for n, k in ((shape.activation.w13_rows(shape.intermediate_size), shape.hidden_size),
                 (shape.hidden_size, shape.intermediate_size)):
        codes = math.ceil(k / 2) if method.bits == 4 else k
        groups = 1 if method.group_size == -1 else math.ceil(k / method.group_size)
        total += n * (codes + groups * (elem_size + (0 if method.sym else 1)))
    return total


def mxfp4_bytes(shape: MoEShape) -> int:
    """Bytes of one expert's w13 and w2 in mxfp4: two e2m1 codes a byte and one e8m0 scale byte per 32 columns
    (H and I are multiples of 32, which ``moekit.quantize`` requires)."""
    return sum(n * (k // 2 + k // MXFP4_GROUP)
               for n, k in ((shape.activation.w13_rows(shape.intermediate_size), shape.hidden_size),
                            (shape.hidden_size, shape.intermediate_size)))


def matmul_dtype(scheme: str | None, dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None) -> str:
    """The matmul whose rate bounds a ``scheme`` layer's flops with ``dtype`` activations on ``device``: an 8-bit
    scheme's fp8_e4m3 / int8 where the device has those dots (``native_8bit_dots``; None: assume it does), else
    the activation dtype's (bf16, fp16, fp32): the layer dequantizes to it for its dots there (a GPU without fp8
    dots runs an fp8 layer on the torch backend), as weight-only and unquantized layers always do."""
    if dtype not in FLOAT_MATMULS:
        raise ValueError(f"dtype: expected one of {list(FLOAT_MATMULS)}, got {dtype}")
    if scheme in QUANT_SCHEMES:
        qdtype = QUANT_SCHEMES[scheme].qdtype
        if device is None or native_8bit_dots(qdtype, device):
            return qdtype
    return FLOAT_MATMULS[dtype]


def moe_bytes(shape: MoEShape, num_tokens: int, num_active: int, elem_size: int, scheme: str | None = None) -> int:
    """Bytes one call must move: touched experts' weights (+ biases; quantized by ``scheme``: codes + scales (+ zero
    points; mxfp4: codes + one scale byte per 32)) and the activations in and out, in ``elem_size`` bytes."""
    rows = shape.activation.w13_rows(shape.intermediate_size)
    if scheme in WNA16_SCHEMES:
        per_expert = wna16_bytes(shape, scheme, elem_size)
    elif scheme in MXFP4_SCHEMES:
        per_expert = mxfp4_bytes(shape)
    else:
        weight_size = elem_size if scheme is None else 1
        per_expert = (rows * shape.hidden_size + shape.hidden_size * shape.intermediate_size) * weight_size
        if scheme is not None:
            per_expert += scale_bytes(shape, scheme)
    if shape.bias:  # biases stay in the activation dtype when the weights are quantized
        per_expert += (rows + shape.hidden_size) * elem_size
    return num_active * per_expert + 2 * num_tokens * shape.hidden_size * elem_size


def moe_flops(shape: MoEShape, num_tokens: int) -> int:
    rows = shape.activation.w13_rows(shape.intermediate_size)
    return 2 * num_tokens * shape.top_k * (rows + shape.intermediate_size) * shape.hidden_size


def floor_us(shape: MoEShape, num_tokens: int, num_active: int, elem_size: int, ceilings: Ceilings,
             scheme: str | None = None) -> float:
    t_bytes = moe_bytes(shape, num_tokens, num_active, elem_size, scheme) / ceilings.read_bw
    t_flops = moe_flops(shape, num_tokens) / ceilings.mm_rate
    return max(t_bytes, t_flops) * 1e6


def measure_ceilings(device: torch.device, scheme: str | None = None, dtype: torch.dtype = torch.bfloat16) -> Ceilings:
    """Streaming read of a 4 GiB tensor and an 8192³ matmul in ``matmul_dtype(scheme, dtype, device)``: the
    activations' ``dtype`` (also for the weight-only schemes, and for 8-bit ones on a GPU without their dots), or
    the 8-bit one of ``scheme`` (``torch._scaled_mm`` for fp8, ``torch._int_mm`` for int8).

    The read is the fastest of two kernels over a few launch shapes each: a persistent 1-D stream and a stream of
    2-D row tiles shaped like the GEMMs' weight loads (``moekit.bench._kernels``). Taking the best keeps the
    floor honest: a layer cannot stream weights faster than the fastest plain read of the same card."""
    from triton.testing import do_bench

    from moekit.bench._kernels import _stream_read, _stream_tiles

    k_dim = 4096
    n = 4 * 2**30 // 2
    x = torch.randn(n // k_dim, k_dim, device=device, dtype=torch.bfloat16).view(-1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    best = float("inf")
    for per_sm in (4, 8, 16):
        grid = sms * per_sm
        out = torch.empty(grid, device=device, dtype=torch.float32)
        ms = do_bench(lambda grid=grid, out=out, x=x: _stream_read[(grid,)](x, out, n, BLOCK=8192), return_mode="median")
        best = min(best, ms)
    for block_n, block_k, stages in ((64, 128, 4), (32, 256, 4), (128, 64, 3)):
        # _stream_tiles has no masks: whole tiles only (2^31 elements in rows of 4096 divide by all of these)
        assert (n // k_dim) % block_n == 0 and k_dim % block_k == 0 and n % k_dim == 0
        grid = n // k_dim // block_n
        out = torch.empty(grid, device=device, dtype=torch.float32)
        ms = do_bench(lambda grid=grid, out=out, bn=block_n, bk=block_k, st=stages: _stream_tiles[(grid,)](
            x, out, k_dim, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st), return_mode="median")
        best = min(best, ms)
    read_bw = n * 2 / (best * 1e-3)
    del x  # free the 4 GiB before the matmul's buffers
    dots = matmul_dtype(scheme, dtype, device)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the layer's fp32 dots are full fp32 ("ieee"), never TF32
    try:
        ms = do_bench(_matmul(dots, device), return_mode="median")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    mm_rate = 2 * 8192**3 / (ms * 1e-3)
    return Ceilings(read_bw=read_bw, mm_rate=mm_rate, mm_dtype=dots)


def _matmul(mm_dtype: str, device: torch.device, n: int = 8192):
    """A call of the n³ matmul in ``mm_dtype`` on random operands."""
    floats = {name: dtype for dtype, name in FLOAT_MATMULS.items()}
    a = torch.randn(n, n, device=device, dtype=floats.get(mm_dtype, torch.bfloat16))
    b = torch.randn(n, n, device=device, dtype=floats.get(mm_dtype, torch.bfloat16))
    if mm_dtype in floats:
        return lambda: torch.matmul(a, b)
    # The 8-bit kernels take b column-major (b.t() of a row-major tensor), as the cuBLASLt paths require.
    if mm_dtype == "int8":
        a8 = a.clamp(-127, 127).to(torch.int8)
        b8 = b.clamp(-127, 127).to(torch.int8).t()
        return lambda: torch._int_mm(a8, b8)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device, dtype=torch.float32)
    return lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
