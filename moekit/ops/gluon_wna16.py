"""The decode tiles of ``grouped_gemm_wna16`` in Gluon on Hopper: 4-bit codes (integer, or mxfp4's e2m1 with e8m0
group scales), 16-bit activations.

``grouped_gemm_wna16(..., variant="gluon_pairs")`` lands here when ``gluon_unsupported`` finds nothing against
it, else it runs as "dequant_pairs" (Triton; mxfp4: "dequant_bytes"). Same layout, epilogue and results as the Triton
variants within the tolerance table (integer weights are not rounded to the activations' dtype, mxfp4 weights are
exact in bf16: see ``_kernels/gluon_wna16.py``); not bit-equal to them.

    gather_pieces(a, layout)  [⌈K / 128⌉ · 4, P, 32]: the slots' rows of A, columns in piece order (one launch)
    gluon_wna16_kernel        both operands by TMA, register-operand wgmmas kept in flight, group scales in fp32

Supported (else the Triton kernel; ``gluon_unsupported`` says which rule failed): an sm_90 GPU, Triton >= 3.6
with Gluon; 4-bit codes in int32 words, 16-byte aligned and contiguous, scales and zero points with a unit last
stride; integer codes: groups that are multiples of 128 (or one group a row), fp16/bf16 activations; mxfp4: bf16
activations; any K that is a multiple of 32 (a last partial 128-column step reads zeros past K); the activation
none, silu, gelu, gelu_tanh, swigluoai or clamped silu (gated: no split-K), a bias; row blocks of at most 32 slots
(decode); output tiles of whole warpgroups, 64 to 256 rows a TMA box (a gated tile: its gate and up halves, so at
least 128 rows), dividing the outputs.
"""

from __future__ import annotations

import functools

import torch
import triton

from moekit._checks import (
    ACT_DTYPES, check_dtype, check_ndim, check_positive, check_same_device, triton_interpreting,
)
from moekit.ops._kernels.pieces import gather_pieces_kernel
from moekit.ops.activation import Activation, activation_code
from moekit.ops.align import AlignResult
from moekit.ops.heuristics import GemmConfig, gluon_tile_fits

PIECE_GROUP = 128  # columns of one K step: 16 code words, four pieces of 32


def piece_order(device: torch.device | None = None) -> torch.Tensor:
    """[128] int64: column j of a group in piece order is column ``piece_order()[j]`` of the group in A."""
    j = torch.arange(PIECE_GROUP, device=device)
    return 8 * ((j % 32) // 2) + j // 32 + 4 * (j % 2)


def gather_pieces(a: torch.Tensor, layout: AlignResult, *, num_rows: int, a_row_div: int = 1,
                  block_m: int | None = None) -> torch.Tensor:
    """A's row ``sorted_ids[p] // a_row_div`` for each slot p of ``layout`` (zeros for padding), each group of 128
    columns in piece order, as a new [⌈K / 128⌉ · 4, P, 32] tensor, P = blocks · ``block_m`` (default the layout's;
    with ``row_per_block`` a smaller one may be given: slot 0 of each block is its row). K must be a multiple of 32;
    columns past K (in the last group) are zeros."""
    _check_gather(a, layout, num_rows, a_row_div, block_m)
    bm = block_m or layout.block_m
    num_slots = layout.expert_ids.numel() * bm
    k_dim = a.shape[1]
    groups = -(-k_dim // PIECE_GROUP)
    out = torch.empty((4 * groups, num_slots, 32), dtype=a.dtype, device=a.device)
    if num_slots and groups:
        block_p = 16
        grid = (triton.cdiv(num_slots, block_p), groups)
        gather_pieces_kernel[grid](a, out, layout.sorted_ids, num_rows, a_row_div, a.stride(0), num_slots, k_dim,
                                   BLOCK_M=bm, BLOCK_P=block_p, ROW_PER_BLOCK=layout.row_per_block)
    return out


def gather_pieces_ref(a: torch.Tensor, layout: AlignResult, *, num_rows: int, a_row_div: int = 1,
                      block_m: int | None = None) -> torch.Tensor:
    """Pure-torch twin of ``gather_pieces``."""
    _check_gather(a, layout, num_rows, a_row_div, block_m)
    bm = block_m or layout.block_m
    num_slots = layout.expert_ids.numel() * bm
    slots = torch.arange(num_slots, device=a.device)
    if layout.row_per_block:
        rows = torch.where(slots % bm == 0, slots // bm, num_rows)
    else:
        rows = layout.sorted_ids[:num_slots].long()
    real = rows < num_rows
    g = a[(rows.clamp(max=num_rows - 1) // a_row_div).clamp(min=0)] if num_rows else a.new_zeros(num_slots, a.shape[1])
    g = torch.where(real[:, None], g, torch.zeros((), dtype=a.dtype, device=a.device))
    groups = -(-a.shape[1] // PIECE_GROUP)
    g = torch.nn.functional.pad(g, (0, groups * PIECE_GROUP - a.shape[1]))
    g = g.reshape(num_slots, groups, PIECE_GROUP)[:, :, piece_order(a.device)]
    return g.reshape(num_slots, 4 * groups, 32).transpose(0, 1).contiguous()


def _check_gather(a: torch.Tensor, layout: AlignResult, num_rows: int, a_row_div: int, block_m: int | None) -> None:
    check_ndim("a", a, 2, "[rows, K]")
    check_dtype("a", a, ACT_DTYPES)
    if a.shape[1] % 32:
        raise ValueError(f"a: expected K a multiple of 32, got shape {tuple(a.shape)}")
    if a.stride(-1) != 1:
        raise ValueError(f"a: expected a contiguous last dim, got strides {a.stride()}")
    check_same_device("layout.sorted_ids", layout.sorted_ids, "a", a)
    check_positive("a_row_div", a_row_div)
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows: expected an int >= 0, got {num_rows!r}")
    if a.shape[0] < -(-num_rows // a_row_div):
        raise ValueError(f"a: expected at least {-(-num_rows // a_row_div)} rows (num_rows = {num_rows}, a_row_div = "
                         f"{a_row_div}), got shape {tuple(a.shape)}")
    if block_m is not None and (block_m < 8 or block_m % 8 or (block_m != layout.block_m
                                                               and not layout.row_per_block)):
        raise ValueError(f"block_m: expected a multiple of 8, and the layout's {layout.block_m} unless the layout "
                         f"holds one row a block, got {block_m}")


def _device_unsupported(a: torch.Tensor) -> str | None:
    """Why ``a``'s device or this Triton cannot run the kernel (None: they can)."""
    if not a.is_cuda or torch.version.hip is not None or triton_interpreting():
        return "not an NVIDIA GPU"
    if torch.cuda.get_device_capability(a.device) != (9, 0):
        return "not sm_90"
    if _triton_version() < (3, 6):
        return f"Triton {triton.__version__} (Gluon's API is checked on 3.6)"
    if _kernel() is None:
        return "this Triton has no Gluon"
    return None


def gluon_available(device: torch.device) -> bool:
    """Whether ``device`` runs the Gluon kernel (an sm_90 NVIDIA GPU, Triton >= 3.6 with Gluon)."""
    if device.type != "cuda":
        return False
    return _device_available(torch.cuda.current_device() if device.index is None else device.index)


def gluon_decode(device: torch.device, dtype: torch.dtype) -> bool:
    """``MoEShape.gluon`` of a call with ``dtype`` activations on ``device``: the device runs the Gluon kernel and
    the activations are bf16 (what its mxfp4 pieces take and where its tiles were measured)."""
    return dtype == torch.bfloat16 and gluon_available(device)


@functools.cache
def _device_available(index: int) -> bool:
    return _device_unsupported(torch.empty(0, device=torch.device("cuda", index))) is None


@functools.cache
def _triton_version() -> tuple[int, int]:
    major, minor = (int("".join(c for c in p if c.isdigit()) or 0) for p in triton.__version__.split(".")[:2])
    return major, minor


@functools.cache
def _kernel():
    """The Gluon kernel, or None where this Triton has no Gluon (imported on first use: CPU-only installs never
    need it)."""
    try:
        from moekit.ops._kernels.gluon_wna16 import gluon_wna16_kernel
    except (ImportError, AttributeError):
        return None
    return gluon_wna16_kernel


class GluonTiles:
    """The Gluon launch of a ``GemmConfig``: BN weight rows (config.block_n; gated: OUT_N gate rows then OUT_N up
    rows), WG = num_warps / 4 warpgroups, BK, stages S, BM slots a block."""

    def __init__(self, config: GemmConfig, layout: AlignResult, k_dim: int, gated: bool, e2m1: bool = False) -> None:
        self.bn = config.block_n
        self.out_n = self.bn // 2 if gated else self.bn
        # Whole warpgroups; at most two of wgmma's 64-row blocks a warpgroup (registers: gate and up at most).
        self.wg = max(1, config.num_warps // 4, self.bn // 128)
        # One row a block: 8 slots (wgmma's narrowest N) instead of the layout's BLOCK_M: half of A's bytes.
        self.bm = 8 if layout.row_per_block else layout.block_m
        k_per_split = -(-k_dim // (config.split_k * PIECE_GROUP)) * PIECE_GROUP
        # Every split a whole number of stages, the last one too: 256 only where both K and the split divide.
        # e2m1: 128 (one step's scale bytes at a time; 256 measured 5-10% slower on gpt-oss's K = 2880, whose
        # last stage would be a quarter full: docs/perf/NOTES.md).
        self.bk = 256 if k_dim % 256 == 0 and k_per_split % 256 == 0 and not e2m1 else 128
        self.k_per_split = -(-k_dim // (config.split_k * self.bk)) * self.bk
        stage = self.bn * self.bk // 2 + self.bm * self.bk * 2
        # Two programs an SM (228 KB of shared memory) with up to four stages in flight each.
        self.stages = max(2, min(4, (100 << 10) // stage))


# grouped_gemm's activation codes the kernel's epilogue has (``activation_code``): none, silu, gelu, gelu_tanh,
# swigluoai, clamped silu.
_ACTIVATIONS = (0, 1, 2, 3, 5, 6)


def gluon_unsupported(a: torch.Tensor, qweight: torch.Tensor, words: torch.Tensor | None, bits: int, e2m1: bool,
                      group: int, k_dim: int, n_out: int, layout: AlignResult, config: GemmConfig,
                      activation: Activation | None, scales: torch.Tensor | None = None,
                      zeros: torch.Tensor | None = None) -> str | None:
    """Why ``gluon_wna16_kernel`` cannot run this GEMM (None: it can)."""
    gated = activation is not None and activation.is_gated
    why = _device_unsupported(a)
    if why is not None:
        return why
    if bits != 4 or words is None:
        return "not 4-bit codes in aligned int32 words"
    if words.data_ptr() % 16 or (words.stride(1) * 4) % 16:
        return "codes not 16-byte aligned (TMA)"
    if any(t is not None and t.stride(-1) != 1 for t in (scales, zeros)):
        return "scales or zero points with a last stride other than 1"
    if a.dtype not in ((torch.bfloat16,) if e2m1 else (torch.float16, torch.bfloat16)):
        return f"activations {a.dtype}" + (" (mxfp4: bf16 only)" if e2m1 else "")
    if k_dim % 32 or (not e2m1 and 0 < group < k_dim and group % PIECE_GROUP):
        return f"K = {k_dim} not a multiple of 32 or group size {group} not a multiple of {PIECE_GROUP}"
    if activation_code(activation) not in _ACTIVATIONS or (activation is not None and not gated
                                                           and activation_code(activation) != 0):
        return f"activation {activation.name if activation else None}"
    if not layout.row_per_block and (layout.block_m > 32 or layout.block_m % 8):
        return f"row blocks of {layout.block_m} slots"
    if not gluon_tile_fits(config.block_n, config.num_warps, n_out, gated):
        return f"tile of {config.block_n} rows on {config.num_warps} warps for {n_out} outputs"
    if config.split_k > 1 and gated:
        return "split-K with an activation"
    if qweight.stride(1) * qweight.element_size() != -(-k_dim // 2) or not qweight.is_contiguous():
        return "codes not contiguous"
    return None


def grouped_gemm_wna16_gluon(a: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                             group: int, k_dim: int, layout: AlignResult, out_3d: torch.Tensor, config: GemmConfig,
                             *, num_rows: int, a_row_div: int, n_out: int, weights_N: torch.Tensor | None,
                             activation: Activation | None, bias_EN: torch.Tensor | None = None,
                             e2m1: bool = False) -> None:
    """Launch (``grouped_gemm_wna16`` validated the arguments and ``gluon_unsupported`` returned None): ``words``
    [E, n_b, K / 8] int32, ``out_3d`` [splits, rows, n_out]; ``e2m1``: mxfp4 codes, ``scales`` their e8m0 bytes."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gated = activation is not None and activation.is_gated
    tiles = GluonTiles(config, layout, k_dim, gated, e2m1)
    pieces = gather_pieces(a, layout, num_rows=num_rows, a_row_div=a_row_div, block_m=tiles.bm)
    num_experts, n_b = words.shape[:2]
    w_desc = TensorDescriptor.from_tensor(
        words.view(num_experts * n_b, words.shape[2]), [tiles.out_n, tiles.bk // 8],
        gl.NVMMASharedLayout.get_default_for([tiles.out_n, tiles.bk // 8], gl.int32))
    a_desc = TensorDescriptor.from_tensor(
        pieces, [tiles.bk // 32, tiles.bm, 32], gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=16,
                                                                     rank=3))
    z = zeros if zeros is not None else scales  # never read without zero points
    grid = (layout.expert_ids.numel() * (n_out // tiles.out_n), config.split_k)
    _kernel()[grid](
        w_desc, a_desc, scales, z, out_3d, bias_EN if bias_EN is not None else scales,
        weights_N if weights_N is not None else scales,
        layout.sorted_ids, layout.expert_ids, layout.num_padded,
        num_rows, n_b, n_out if gated else 0, tiles.k_per_split, min(group, k_dim) if group > 0 else k_dim,
        scales.stride(0), scales.stride(1), z.stride(0), z.stride(1), out_3d.stride(0), out_3d.stride(1),
        bias_EN.stride(0) if bias_EN is not None else 0,
        activation.alpha if activation is not None else 0.0,
        activation.limit if activation is not None and activation.limit is not None else 0.0,
        K=k_dim, BM=tiles.bm, OUT_N=tiles.out_n, BK=tiles.bk, S=tiles.stages, WG=tiles.wg, GATED=gated,
        ACTIVATION=activation_code(activation), HAS_ZEROS=zeros is not None, HAS_BIAS=bias_EN is not None,
        HAS_WEIGHTS=weights_N is not None, ROW_PER_BLOCK=layout.row_per_block, FP16=a.dtype == torch.float16,
        E2M1=e2m1, num_warps=4 * tiles.wg,
    )
