"""Grouped GEMM on 4-bit / 8-bit integer weight codes with group scales ("WNA16": weight-only, activations stay
fp16/bf16/fp32), dequantized inside the K loop.

Same layout and semantics as ``moekit.ops.grouped_gemm`` (see there: gathered rows, gate|up tiles with the
activation in the epilogue, routing weight, bias, split-K partials), with B in the internal layout of
``moekit.ops.quantize_wna16`` stacked over experts:

    W[e, n, k] = (q[e, n, k] - z[e, n, k // g]) * s[e, n, k // g]        (z = 2^(bits-1) without zero points)
    h = A[row // a_row_div] @ W[e].T + bias[e]                            (fp32 accumulate)

    qweight  uint8 [E, n_b, ⌈k/2⌉] (4 bits, low nibble = even k) or [E, n_b, k] (8 bits)
    scales   [E, n_b, ⌈k/g⌉] fp16/bf16/fp32;   zeros  uint8 [E, n_b, ⌈k/g⌉] or None

or MXFP4 codes (``MXFP4Weight``: e2m1 nibbles laid out as the 4-bit codes above, e8m0 uint8 scales, g = 32, no
zero points; ``moekit.ops.quantize_mxfp4``):

    W[e, n, k] = E2M1[q[e, n, k]] * 2^(s[e, n, k // 32] - 127)

A K tile lies in one scale group or is a whole number of groups: g a multiple of BLOCK_K (or g >= k, one group),
or BLOCK_K a multiple of g with g >= 32 (4 bits; 16 for 8 bits: each group is one tl.dot of at least 16). Other
group sizes (e.g. 96) run on the largest power-of-two K tile dividing g. The checkpoints in use have g in
{32, 64, 128} or one group per row (g = -1).

How the Triton experts backend calls it (both GEMMs over one ``align`` layout, as ``TritonExperts._run`` does for
bf16; the weight codes stay packed, the activations are not quantized):

    gemm1: grouped_gemm_wna16(x_TH, WNA16Weight(w13_q, w13_s, w13_z, bits, g, H), layout, a_NI, cfg.gemm1,
                              num_rows=N, a_row_div=K, bias_EN=w13_bias, activation=activation)
    gemm2: grouped_gemm_wna16(a_NI, WNA16Weight(w2_q, w2_s, w2_z, bits, g, I), layout, y_SNH, cfg.gemm2,
                              num_rows=N, bias_EN=w2_bias, weights_N=topk_weights.reshape(-1))
    then topk_reduce(y_SNH, K, out_TH)

with ``cfg = choose_config(MoEShape(..., weights="w4a16_g128"))`` (the scheme's name selects the WNA16 tiles).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit._checks import (
    ACT_DTYPES, check_choice, check_dot_operand, check_dtype, check_ndim, check_same_device, triton_interpreting,
)
from moekit.ops._kernels.grouped_gemm_wna16 import grouped_gemm_wna16_kernel
from moekit.ops.activation import Activation, activation_code
from moekit.ops.align import AlignResult
from moekit.ops.gluon_wna16 import gluon_unsupported, grouped_gemm_wna16_gluon
from moekit.ops.grouped_gemm import check_epilogue_args, grouped_gemm_ref
from moekit.ops.heuristics import WNA16_VARIANTS, GemmConfig, k_tiles, pairs_sub_tile, wna16_variant
from moekit.ops.quantize_mxfp4 import GROUP as MXFP4_GROUP
from moekit.ops.quantize_mxfp4 import check_mxfp4, dequantize_mxfp4
from moekit.ops.quantize_wna16 import WNA16Weight, _check_wna16, dequantize_wna16


class MXFP4Weight(NamedTuple):
    """MXFP4 weights stacked over experts, as ``grouped_gemm_wna16`` takes them (``moekit.ops.quantize_mxfp4``'s
    layout): ``qweight`` uint8 [E, n, k/2] e2m1 codes (low nibble = even k), ``scales`` uint8 [E, n, k/32] e8m0."""

    qweight: torch.Tensor
    scales: torch.Tensor


def grouped_gemm_wna16(
    a: torch.Tensor,
    b: WNA16Weight | MXFP4Weight,
    layout: AlignResult,
    out: torch.Tensor,
    config: GemmConfig,
    *,
    num_rows: int,
    a_row_div: int = 1,
    bias_EN: torch.Tensor | None = None,
    weights_N: torch.Tensor | None = None,
    activation: Activation | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """Run one grouped GEMM on weight codes (module docstring) into ``out`` and return it.

    Args:
        a: [rows, k] fp16/bf16/fp32 activations, last dim contiguous; the dots run in this dtype.
        b: the experts' weights, ``qweight`` [E, n_b, ⌈k/2⌉ or k] (n_b = 2·n_out for a gated activation): integer
            codes (``WNA16Weight``) or e2m1 codes (``MXFP4Weight``; "dequant" then always reads bytes).
        variant: how the codes are multiplied, one of ``WNA16_VARIANTS`` (see the kernel's docstring); None
            takes ``config.variant``, else ``wna16_variant``'s choice for the layout. "dequant" reads 4-bit codes
            as int32 words where the rows allow (fp16/bf16 activations), "dequant_bytes" always as bytes,
            "dequant_split" as bytes without interleaving the nibbles (two dots on A's even and odd columns),
            "dequant_pairs" as int32 words, nibbles r and r + 4 of a word dequantized as one packed pair, four
            swapped dots a sub-tile (integer 4-bit codes in aligned words, fp16/bf16, K sub-tiles of >= 64
            columns: groups that are a multiple of 64 or a whole row, K tiles >= 64; else it runs as
            "dequant_bytes" on one-row blocks and "dequant_split" on others); all round each dequantized weight to
            a's dtype (as a bf16 copy of the weights would). "postscale" and "gemv" multiply exact codes and scale
            in fp32. "gluon_pairs": "dequant_pairs"'s pieces in a Gluon kernel on sm_90 that keeps its wgmmas in
            flight and scales each group's product in fp32 (``moekit.ops.gluon_wna16``; the weights are not
            rounded; mxfp4 too, exactly); where ``gluon_unsupported`` names a reason it runs as "dequant_pairs"
            (mxfp4: "dequant_bytes").
        The other arguments are ``grouped_gemm``'s.
    """
    if variant is None:
        variant = config.variant or wna16_variant(layout.block_m, layout.row_per_block)
    check_choice("variant", variant, WNA16_VARIANTS)
    if config.swap_ab and not (variant.startswith("dequant") or variant == "gluon_pairs"):  # the pairs always swap
        raise ValueError(f"config.swap_ab: only the dequant variants (and gluon_pairs) swap their operands, got variant "
                         f"{variant!r}")
    check_ndim("a", a, 2, "[rows, k]")
    check_dtype("a", a, ACT_DTYPES)
    check_dot_operand("a", a)
    qweight, scales, zeros, bits, group, k_dim, e2m1 = _check_weight(b)
    check_ndim("b.qweight", qweight, 3, "[E, n, packed k]")
    for name, t in (("b.qweight", qweight), ("b.scales", scales), ("b.zeros", zeros), ("out", out)):
        if t is not None:
            check_same_device(name, t, "a", a)
    if a.shape[1] != k_dim:
        raise ValueError(f"a: expected [rows, {k_dim}] (b.k = {k_dim}), got shape {tuple(a.shape)}")
    if a.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError(f"grouped_gemm_wna16: a and out need a contiguous last dim, got strides {a.stride()} "
                         f"and {out.stride()}")
    n_b = qweight.shape[1]
    gated = activation is not None and activation.is_gated
    n_out = n_b // 2 if gated else n_b
    if gated and n_b % 2:
        raise ValueError(f"b.qweight: gated activation {activation.name!r} needs an even row count 2·n_out, got "
                         f"{tuple(qweight.shape)}")
    min_a_rows = -(-num_rows // a_row_div)
    if a.shape[0] < min_a_rows:
        raise ValueError(f"a: expected at least {min_a_rows} rows (N = {num_rows}, a_row_div = {a_row_div}), "
                         f"got shape {tuple(a.shape)}")
    split = config.split_k
    out_3d = check_epilogue_args("grouped_gemm_wna16", qweight, out, split, num_rows=num_rows, n_out=n_out,
                                 bias_EN=bias_EN, weights_N=weights_N, activation=activation)
    block_k, sub_k = k_tiles(config.block_k, group, k_dim, bits)
    half_tail = config.half_tail and not layout.row_per_block and layout.block_m >= 32
    num_blocks = layout.expert_ids.numel()
    out_n = config.block_n // 2 if gated else config.block_n
    grid = (num_blocks * -(-n_out // out_n), split)
    if grid[0] == 0:
        return out  # no routed rows (T = 0): nothing to launch
    k_per_split = -(-k_dim // (split * block_k)) * block_k
    z = zeros if zeros is not None else scales  # never read without zero points
    if variant == "gluon_pairs":
        words = _as_words(qweight) if bits == 4 else None  # e2m1 too: the Gluon kernel has its own e2m1 pieces
        if gluon_unsupported(a, qweight, words, bits, e2m1, group, k_dim, n_out, layout, config, activation, scales,
                             zeros) is None:
            grouped_gemm_wna16_gluon(a, words, scales, zeros, group, k_dim, layout, out_3d, config,
                                     num_rows=num_rows, a_row_div=a_row_div, n_out=n_out, weights_N=weights_N,
                                     activation=activation, bias_EN=bias_EN, e2m1=e2m1)
            return out
        # The same math in Triton; mxfp4's decode variant where the Gluon kernel cannot run.
        variant = "dequant_bytes" if e2m1 else "dequant_pairs"
    # gemv's fp32 FMAs take words from any activation dtype; dequant's 16-bit trick needs fp16/bf16.
    # e2m1 codes never: the word tricks make integers, not e2m1 values.
    use_words = bits == 4 and not e2m1 and (variant == "gemv" or (variant in ("dequant", "dequant_pairs")
                                                                    and a.dtype != torch.float32))
    words = _as_words(qweight) if use_words else None
    rocm = a.is_cuda and torch.version.hip is not None
    # Not on ROCm: measured and checked on NVIDIA only (its zero-point workaround is inline PTX).
    pairs = variant == "dequant_pairs" and words is not None and pairs_sub_tile(sub_k) and not rocm
    if variant == "dequant_pairs" and not pairs:  # the decode choice it replaces
        variant, words = ("dequant_bytes" if layout.row_per_block else "dequant_split"), None
    codes = words if words is not None else qweight
    # Inline PTX: NVIDIA GPUs only, and never in Triton's CPU interpreter (which may be handed CUDA tensors).
    asm = a.is_cuda and not rocm and not triton_interpreting()
    grouped_gemm_wna16_kernel[grid](
        a, codes, scales, z, out_3d,
        bias_EN if bias_EN is not None else a,
        weights_N if weights_N is not None else a,
        layout.sorted_ids, layout.expert_ids, layout.num_padded,
        num_rows, n_out, k_dim, a_row_div, n_out, k_per_split, group,
        a.stride(0), codes.stride(0), codes.stride(1), codes.stride(2),
        scales.stride(0), scales.stride(1), scales.stride(2), z.stride(0), z.stride(1), z.stride(2),
        out_3d.stride(0), out_3d.stride(1),
        bias_EN.stride(0) if bias_EN is not None else 0,
        activation.alpha if activation is not None else 0.0,
        activation.limit if activation is not None and activation.limit is not None else 0.0,
        VARIANT="dequant" if variant.startswith("dequant") else variant, WORDS=words is not None, BITS=bits,
        E2M1=e2m1, HAS_ZEROS=zeros is not None, SUB_K=sub_k, SPLIT=variant == "dequant_split" and bits == 4,
        SWAP=config.swap_ab or pairs, PAIRS=pairs,
        ASM=asm, OPAQUE_ZEROS=asm and pairs and zeros is not None and not _wgmma_tile(a.device, config),
        ACTIVATION=activation_code(activation),
        GATED=gated, HAS_BIAS=bias_EN is not None, HAS_WEIGHTS=weights_N is not None,
        BLOCK_M=layout.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, GROUP_M=config.group_m,
        EVEN_K=k_dim % block_k == 0, EVEN_N=n_out % out_n == 0, ROW_PER_BLOCK=layout.row_per_block,
        HALF_TAIL=half_tail, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def _wgmma_tile(device: torch.device, config: GemmConfig) -> bool:
    """Whether a swapped tile's dots run on Hopper's wgmma: sm_90, weight rows a multiple of 64 (wgmma's M of a
    warpgroup) and whole warpgroups (Triton's condition); other tiles, and other GPUs, run mma.sync, where the
    pairs need OPAQUE_ZEROS (see the kernel's docstring)."""
    return (torch.cuda.get_device_capability(device)[0] == 9 and config.block_n % 64 == 0
            and config.num_warps % 4 == 0)


def _check_weight(b: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int, int, bool]:
    """(qweight, scales, zeros, bits, group size, k, e2m1) of a validated ``WNA16Weight`` or ``MXFP4Weight``."""
    if isinstance(b, MXFP4Weight):
        try:
            k_dim = check_mxfp4(b.qweight, b.scales)
        except (TypeError, ValueError) as exc:  # name the fields as the caller passed them
            raise type(exc)(f"b.{exc}".replace("b.codes", "b.qweight")) from None
        return b.qweight, b.scales, None, 4, MXFP4_GROUP, k_dim, True
    return (*_check_wna16(b), False)


def _dequantize(b: WNA16Weight | MXFP4Weight) -> torch.Tensor:
    """Float32 [..., n, k] of either weight kind."""
    if isinstance(b, MXFP4Weight):
        _check_weight(b)
        return dequantize_mxfp4(b.qweight, b.scales)
    return dequantize_wna16(b)


def _as_words(qweight: torch.Tensor) -> torch.Tensor | None:
    """``qweight`` (uint8) viewed as int32 words of 8 codes, no copy, or None where the bytes do not group into
    aligned words (a row of ⌈k/2⌉ bytes not a multiple of 4, a strided or offset view)."""
    if qweight.stride(-1) != 1 or qweight.storage_offset() % 4 or any(st % 4 for st in qweight.stride()[:-1]) \
            or qweight.shape[-1] % 4:
        return None
    return qweight.view(torch.int32)


def grouped_gemm_wna16_ref(
    a: torch.Tensor,
    b: WNA16Weight | MXFP4Weight,
    layout: AlignResult,
    out: torch.Tensor,
    *,
    num_rows: int,
    a_row_div: int = 1,
    bias_EN: torch.Tensor | None = None,
    weights_N: torch.Tensor | None = None,
    activation: Activation | None = None,
) -> torch.Tensor:
    """Pure-torch twin (``split_k`` = 1): ``grouped_gemm_ref`` on ``dequantize_wna16(b)`` (``dequantize_mxfp4``
    for ``MXFP4Weight``), in fp32."""
    return grouped_gemm_ref(a, _dequantize(b), layout, out, num_rows=num_rows, a_row_div=a_row_div,
                            bias_EN=bias_EN, weights_N=weights_N, activation=activation)
