"""The hardware floor of one MoE call, exactly as MEASURING.md defines it.

    bytes    = weight bytes of every expert with >= 1 routed token (biases included) + T·H·in + T·H·out
    flops    = 2 · T · K · (rows(w13) + I) · H          (= 2·T·K·3·H·I for gated activations)
    floor_us = max(bytes / read_bw, flops / mm_rate)

``read_bw`` and ``mm_rate`` are measured in the same run by ``measure_ceilings``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.bench.shapes import MoEShape


@dataclass(frozen=True)
class Ceilings:
    read_bw: float  # bytes / s
    mm_rate: float  # flop / s


def moe_bytes(shape: MoEShape, num_tokens: int, num_active: int, elem_size: int) -> int:
    rows = shape.activation.w13_rows(shape.intermediate_size)
    per_expert = (rows * shape.hidden_size + shape.hidden_size * shape.intermediate_size) * elem_size
    if shape.bias:
        per_expert += (rows + shape.hidden_size) * elem_size
    return num_active * per_expert + 2 * num_tokens * shape.hidden_size * elem_size


def moe_flops(shape: MoEShape, num_tokens: int) -> int:
    rows = shape.activation.w13_rows(shape.intermediate_size)
    return 2 * num_tokens * shape.top_k * (rows + shape.intermediate_size) * shape.hidden_size


def floor_us(shape: MoEShape, num_tokens: int, num_active: int, elem_size: int, ceilings: Ceilings) -> float:
    t_bytes = moe_bytes(shape, num_tokens, num_active, elem_size) / ceilings.read_bw
    t_flops = moe_flops(shape, num_tokens) / ceilings.mm_rate
    return max(t_bytes, t_flops) * 1e6


def measure_ceilings(device: torch.device) -> Ceilings:
    """Streaming read of a 4 GiB tensor (best of a few persistent grids) and an 8192³ bf16 matmul."""
    from triton.testing import do_bench

    from moekit.bench._kernels import _stream_read

    n = 4 * 2**30 // 2
    x = torch.randn(n // 4096, 4096, device=device, dtype=torch.bfloat16).view(-1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    best = float("inf")
    for per_sm in (4, 8, 16):
        grid = sms * per_sm
        out = torch.empty(grid, device=device, dtype=torch.float32)
        ms = do_bench(lambda grid=grid, out=out, x=x: _stream_read[(grid,)](x, out, n, BLOCK=8192), return_mode="median")
        best = min(best, ms)
    read_bw = n * 2 / (best * 1e-3)
    del x  # free the 4 GiB before the matmul's buffers
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: torch.matmul(a, b), return_mode="median")
    mm_rate = 2 * 8192**3 / (ms * 1e-3)
    return Ceilings(read_bw=read_bw, mm_rate=mm_rate)
