"""Grouped GEMM on 8-bit (fp8 e4m3 / int8) activation and weight codes with their scales.

Same layout and semantics as ``moekit.ops.grouped_gemm`` (see there), with A and B dequantized on the fly:

    h = dequant(A)[row // a_row_div] @ dequant(B[e]).T + bias[e]    (fp32 accumulate; exact integer dots for int8)

    granularity  a_scale                     b_scale                              applied
    tensor       []                          [E]                                  after the K loop
    channel      [rows, 1] (per token)       [E, n_b, 1]                          after the K loop
    block        [rows, ⌈k/bk⌉] (per 1×bk)   [E, ⌈n_b/bn⌉ or 2·⌈n_out/bn⌉, ⌈k/bk⌉] per K tile, in the loop

For a gated activation with block scales, gate rows [0, n_out) and up rows [n_out, 2·n_out) are blocked apart
(``moekit.ops.quantize.expert_scale_shapes``): up row n_out + n has scale row ⌈n_out/bn⌉ + n // bn. In block
mode a K tile lies in one scale group (BLOCK_K divides bk) or spans whole groups (a multiple of bk), each group's
share of it a sub-tile scaled on its own (a 256-wide 8-bit K tile reads 256-byte runs of each weight row, as a
bf16 tile of 128 does).

Activations are quantized by ``moekit.ops.act_quant`` (x in ``prepare``; GEMM 1's output before GEMM 2 by the
experts backend, in a separate pass: fusing it into GEMM 1's epilogue needs an output tile of whole bk-groups,
i.e. OUT_N = 128 = a gated BLOCK_N of 256, which only the prefill tiles use — a tuning step for a GPU).
"""

from __future__ import annotations

import torch

from moekit._checks import check_ndim, check_shape
from moekit.ops._kernels.grouped_gemm_w8a8 import grouped_gemm_w8a8_kernel
from moekit.ops.activation import Activation, activation_code
from moekit.ops.align import AlignResult
from moekit.ops.grouped_gemm import check_epilogue_args, grouped_gemm_ref
from moekit.ops.heuristics import GemmConfig

_MIN_DOT_K = 32  # Triton's smallest K for an 8-bit tl.dot on NVIDIA GPUs
from moekit.ops.quantize import QDTYPES, WEIGHT_GRANULARITIES, dequantize_activation, dequantize_weight

_SCALE_MODES = {"tensor": 0, "channel": 1, "block": 2}
_ACT_GRANULARITY = {"tensor": "tensor", "channel": "token", "block": "group"}


def grouped_gemm_w8a8(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_ENK: torch.Tensor,
    b_scale: torch.Tensor,
    layout: AlignResult,
    out: torch.Tensor,
    config: GemmConfig,
    *,
    granularity: str,
    block_shape: tuple[int, int] | None = None,
    num_rows: int,
    a_row_div: int = 1,
    bias_EN: torch.Tensor | None = None,
    weights_N: torch.Tensor | None = None,
    activation: Activation | None = None,
) -> torch.Tensor:
    """Run one quantized grouped GEMM (module docstring) into ``out`` and return it.

    Args:
        a_q: [rows, k] codes (fp8 e4m3 or int8, the dtype of ``b_ENK``), last dim contiguous.
        a_scale, b_scale: float32 scales per ``granularity`` (table above).
        b_ENK: [E, n_b, k] weight codes. ``block_shape``: (bn, bk) with block granularity.
        The other arguments are ``grouped_gemm``'s.
    """
    check_ndim("a_q", a_q, 2, "[rows, k]")
    check_ndim("b_ENK", b_ENK, 3, "[E, n, k]")
    if granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"granularity: expected one of {list(WEIGHT_GRANULARITIES)}, got {granularity!r}")
    if b_ENK.dtype not in QDTYPES.values() or a_q.dtype != b_ENK.dtype:
        raise ValueError(f"a_q, b_ENK: expected the same 8-bit dtype ({list(QDTYPES.values())}), got {a_q.dtype} "
                         f"and {b_ENK.dtype}")
    num_experts, n_b, k_dim = b_ENK.shape
    gated = activation is not None and activation.is_gated
    n_out = n_b // 2 if gated else n_b
    if a_q.shape[1] != k_dim:
        raise ValueError(f"a_q: expected [rows, {k_dim}], got shape {tuple(a_q.shape)}")
    if a_q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("grouped_gemm_w8a8: a_q and out need a contiguous last dim")
    if gated and n_b % 2:
        raise ValueError(f"b_ENK: gated activation {activation.name!r} needs an even row count, "
                         f"got {tuple(b_ENK.shape)}")
    if a_q.shape[0] < -(-num_rows // a_row_div):
        raise ValueError(f"a_q: expected at least {-(-num_rows // a_row_div)} rows, got shape {tuple(a_q.shape)}")
    for name, t in (("a_scale", a_scale), ("b_scale", b_scale)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name}: expected float32, got {t.dtype}")
    group_n = group_k = 1
    up_scale_rows = 0
    block_k = config.block_k
    # fp8 products are added in fp32 every 128 columns at most (Hopper's fp8 MMA accumulates in ~14 bits).
    sub_k = min(block_k, 128) if b_ENK.dtype != torch.int8 else block_k
    if granularity == "tensor":
        check_shape("a_scale", a_scale.reshape(-1), (1,), "[] (one element)")
        check_shape("b_scale", b_scale, (num_experts,), "[E]")
        a_stride = 0
    elif granularity == "channel":
        check_shape("a_scale", a_scale, (a_q.shape[0], 1), "[rows, 1]")
        check_shape("b_scale", b_scale, (num_experts, n_b, 1), "[E, n, 1]")
        a_stride = a_scale.stride(0)
    else:
        if block_shape is None:
            raise ValueError("block_shape: expected (bn, bk) with block granularity, got None")
        group_n, group_k = block_shape
        up_scale_rows = -(-n_out // group_n) if gated else 0
        scale_rows = 2 * up_scale_rows if gated else -(-n_b // group_n)
        k_groups = -(-k_dim // group_k)
        check_shape("a_scale", a_scale, (a_q.shape[0], k_groups), "[rows, ⌈k/bk⌉]")
        check_shape("b_scale", b_scale, (num_experts, scale_rows, k_groups), "[E, scale rows, ⌈k/bk⌉]")
        if a_scale.stride(-1) != 1:
            raise ValueError(f"a_scale: expected a contiguous last dim, got strides {a_scale.stride()}")
        # A K tile spans whole scale groups (each scaled on its own: the kernel's sub-tiles) or lies in one: the
        # largest power of two <= block_k that divides bk. An 8-bit dot needs K >= 32 on the GPU.
        if block_k % group_k == 0 and group_k % _MIN_DOT_K == 0:
            sub_k = group_k
        else:
            while block_k > _MIN_DOT_K and group_k % block_k:
                block_k //= 2
            if group_k % block_k or block_k < _MIN_DOT_K:
                raise ValueError(f"block_shape: bk = {group_k} needs a K tile that divides it or that it divides, a "
                                 f"power of two >= {_MIN_DOT_K}")
            sub_k = block_k
        a_stride = a_scale.stride(0)
    split = config.split_k
    out_3d = check_epilogue_args("grouped_gemm_w8a8", b_ENK, out, split, num_rows=num_rows, n_out=n_out,
                                 bias_EN=bias_EN, weights_N=weights_N, activation=activation)
    k_per_split = -(-k_dim // (split * block_k)) * block_k
    out_n = config.block_n // 2 if gated else config.block_n
    grid = (layout.expert_ids.numel() * -(-n_out // out_n), split)
    bs_strides = (b_scale.stride(0), b_scale.stride(1) if b_scale.dim() > 1 else 0,
                  b_scale.stride(2) if b_scale.dim() > 2 else 0)
    grouped_gemm_w8a8_kernel[grid](
        a_q, a_scale, b_ENK, b_scale, out_3d,
        bias_EN if bias_EN is not None else a_scale,
        weights_N if weights_N is not None else a_scale,
        layout.sorted_ids, layout.expert_ids, layout.num_padded,
        num_rows, n_out, k_dim, a_row_div, n_out, up_scale_rows, k_per_split, group_n, group_k,
        a_q.stride(0), b_ENK.stride(0), b_ENK.stride(1), b_ENK.stride(2), out_3d.stride(0), out_3d.stride(1),
        bias_EN.stride(0) if bias_EN is not None else 0,
        a_stride, *bs_strides,
        activation.alpha if activation is not None else 0.0,
        activation.limit if activation is not None and activation.limit is not None else 0.0,
        SCALE_MODE=_SCALE_MODES[granularity], IS_INT=b_ENK.dtype == torch.int8,
        # Every tile's (half-)rows in one scale row: tiles start at multiples of out_n, which divides group_n.
        # Gated tiles then run as two dots; below 32 outputs (decode tiles, memory-bound, where the scaling costs
        # nothing) two 16-wide dots were slower than one 32-wide (H200, qwen3-30b-a3b T=1: 29.8 against 26.2 µs).
        UNIFORM_BS=granularity == "block" and group_n % out_n == 0 and (not gated or out_n >= 32),
        ACTIVATION=activation_code(activation),
        GATED=gated, HAS_BIAS=bias_EN is not None, HAS_WEIGHTS=weights_N is not None,
        BLOCK_M=layout.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, SUB_K=sub_k, GROUP_M=config.group_m,
        EVEN_K=k_dim % block_k == 0, EVEN_N=n_out % out_n == 0, ROW_PER_BLOCK=layout.row_per_block,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def grouped_gemm_w8a8_ref(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_ENK: torch.Tensor,
    b_scale: torch.Tensor,
    layout: AlignResult,
    out: torch.Tensor,
    *,
    granularity: str,
    block_shape: tuple[int, int] | None = None,
    num_rows: int,
    a_row_div: int = 1,
    bias_EN: torch.Tensor | None = None,
    weights_N: torch.Tensor | None = None,
    activation: Activation | None = None,
) -> torch.Tensor:
    """Pure-torch twin (``split_k`` = 1): ``grouped_gemm_ref`` on the dequantized codes, in fp32."""
    gated = activation is not None and activation.is_gated
    gate_rows = b_ENK.shape[1] // 2 if gated and granularity == "block" else None
    act_gran = _ACT_GRANULARITY[granularity]
    a = dequantize_activation(a_q, a_scale, act_gran, block_shape[1] if granularity == "block" else None)
    b = dequantize_weight(b_ENK, b_scale, granularity, block_shape, gate_rows=gate_rows)
    return grouped_gemm_ref(a, b, layout, out, num_rows=num_rows, a_row_div=a_row_div, bias_EN=bias_EN,
                            weights_N=weights_N, activation=activation)
