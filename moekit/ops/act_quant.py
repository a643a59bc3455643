"""Dynamic 8-bit activation quantization in Triton: the twin of ``moekit.ops.quantize.quantize_activation``.

Shapes: M rows, K columns, g = group size, G = ⌈K/g⌉.

    group   (g):  for each row r, group j:  s[r, j] = max|x[r, jg:(j+1)g]| / QMAX,  q = codes(x / s)   s [M, G]
    token:        one group of K columns per row                                                   s [M, 1]
    tensor:       m = QMAX / max|x| over the whole tensor (or 1 / static_scale); q = codes(x · m)  s []

Same codes and scales as the torch function bit for bit (``act_quant_ref`` is that function): the multiplier and
its reciprocal are correctly rounded divisions and the codes are rounded to nearest even on the 8-bit grid before
the (then exact) cast — see ``moekit.ops._kernels.quantize`` for what the interpreter gets wrong otherwise.
The per-tensor amax is one torch reduction; everything else is one launch.
"""

from __future__ import annotations

import torch

from moekit._checks import check_choice, check_dtype, check_ndim, check_tensor
from moekit.ops._kernels.quantize import act_quant_kernel
from moekit.ops.quantize import (
    ACT_GRANULARITIES,
    QDTYPES,
    QMAX,
    act_block,
    multiplier,
    quantize_activation,
    static_act_scale,
)

act_quant_ref = quantize_activation

_IN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def act_quant(
    x_MK: torch.Tensor,
    qdtype: str,
    granularity: str,
    group_size: int | None = None,
    *,
    static_scale: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)`` of ``x_MK`` [M, K] as ``quantize_activation`` returns them (same arguments).

    ``out``: optional ``(q, s)`` buffers to write (q [M, K] in ``QDTYPES[qdtype]``, last dim contiguous; s float32
    [M, G] for group/token granularity; ignored for tensor granularity, whose s is returned).
    """
    check_tensor("x_MK", x_MK)
    check_ndim("x_MK", x_MK, 2, "[M, K]")
    check_dtype("x_MK", x_MK, _IN_DTYPES)
    check_choice("qdtype", qdtype, tuple(QDTYPES))
    check_choice("granularity", granularity, ACT_GRANULARITIES)
    if x_MK.stride(-1) != 1:
        raise ValueError(f"x_MK: expected a contiguous last dim, got strides {x_MK.stride()}")
    m, k = x_MK.shape
    _, group = act_block(granularity, group_size, m, k)
    num_groups = -(-k // group) if k else 0
    device = x_MK.device
    if out is None:
        q = torch.empty((m, k), dtype=QDTYPES[qdtype], device=device)
        s = torch.empty((m, num_groups), dtype=torch.float32, device=device) if granularity != "tensor" else None
    else:
        q, s = out
        if q.shape != (m, k) or q.dtype != QDTYPES[qdtype] or q.stride(-1) != 1:
            raise ValueError(f"out[0]: expected {QDTYPES[qdtype]} [{m}, {k}] with a contiguous last dim, got "
                             f"{q.dtype} {tuple(q.shape)}")
        # The kernel writes s[row, group] at row · stride + group: a column-major s got scrambled scales.
        if granularity != "tensor" and (s.shape != (m, num_groups) or s.dtype != torch.float32
                                        or (num_groups > 1 and s.stride(-1) != 1)):
            raise ValueError(f"out[1]: expected float32 [{m}, {num_groups}] with a contiguous last dim, got {s.dtype} "
                             f"{tuple(s.shape)} with strides {s.stride()}")
        for name, t in (("out[0]", q), ("out[1]", s)):
            if t is not None and t.device != device:
                raise ValueError(f"{name}: expected a tensor on {device} (x_MK's device), got one on {t.device}")
    mult = None
    if static_scale is not None:
        s = static_act_scale(static_scale, granularity)
        mult = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    elif granularity == "tensor":
        # The torch function's arithmetic, so the multiplier (hence every code) is the same float.
        amax = x_MK.abs().amax().float() if x_MK.numel() else torch.zeros((), device=device)
        mult, s = multiplier(amax, qdtype)
    if m == 0 or k == 0:
        if s is not None and s.dim() == 2:
            s.zero_()  # an empty group (K = 0) has amax 0
        return q, s
    if mult is not None:
        # One multiplier for every element: no reduction, so the columns are cut into independent one-pass chunks
        # (a whole row per program would walk a 14336-wide row in a serial loop: ~15 µs of a decode call).
        group = min(_next_pow2(k), 1024)
        num_groups = -(-k // group)
    one_pass = mult is not None or group <= 128  # a given multiplier's chunks are at most 1024 wide (above)
    if one_pass:
        block_m, block_k = (4 if group <= 128 else 1), max(16, _next_pow2(group))
    else:
        # A per-token amax over a long row: one row per program, wide tiles, so each of the two passes over the
        # row is a few iterations (at decode there are only a handful of rows: parallelism comes from width).
        block_m, block_k = 1, min(4096, _next_pow2(group))
    grid = (-(-m // block_m), num_groups)
    act_quant_kernel[grid](
        x_MK, q, s if mult is None else q, mult.reshape(1) if mult is not None else x_MK,
        m, k, group,
        x_MK.stride(0), q.stride(0), s.stride(0) if mult is None else 0,
        QMAX=QMAX[qdtype], IS_INT=qdtype == "int8", GIVEN_MULT=mult is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=8 if block_k >= 2048 else 4,
    )
    return q, s


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
