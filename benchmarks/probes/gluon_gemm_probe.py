"""Probe: a warp-specialized Gluon grouped GEMM (gather producer + TMA weights + wgmma consumer) on sm_90.

    PYTHONPATH=. python3 benchmarks/probes/gluon_gemm_probe.py   # on the GPU: check + time beside the Triton kernel
    python3 benchmarks/probes/gluon_gemm_probe.py --compile-only # anywhere with triton 3.6: compile for sm_90

Partitions of one program (one BLOCK_M row block x one BLOCK_N tile of one expert):
  loader (4 warps): per K step, waits for a free stage, issues the weight tile by TMA (expect-tx on the stage's
      ready barrier) and the BLOCK_M gathered activation rows by cp.async; it keeps LAG cp.async groups in flight and
      arrives on a stage's ready barrier once that stage's rows have landed (wait_group + proxy fence).
  consumer (default, 8 warps = 2 warpgroups): waits for ready, issues an async wgmma, retires the previous one and
      frees its stage.
The epilogue (default warps) stores C in slot order. No activation: this measures the main loop only.
"""

from __future__ import annotations

import argparse
import sys

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)


@gluon.jit
def _b_loader(p_a, b_desc, p_sorted, a_bufs, b_bufs, ready, empty, i_m, b_row0, num_rows, a_row_div, stride_am,
              num_k, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, LAG: gl.constexpr,
              WITH_B: gl.constexpr):
    """Weight tiles only (one warp): runs ahead of the gather as far as free stages allow."""
    for i in range(num_k):
        s = i % S
        mbarrier.wait(empty.index(s), ((i // S) & 1) ^ 1)
        mbarrier.expect(ready.index(s), BN * BK * 2)
        tma.async_copy_global_to_shared(b_desc, [b_row0, i * BK], ready.index(s), b_bufs.index(s))


@gluon.jit
def _loader(p_a, b_desc, p_sorted, a_bufs, b_bufs, ready, empty, i_m, b_row0, num_rows, a_row_div, stride_am,
            num_k, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, LAG: gl.constexpr,
            WITH_B: gl.constexpr):
    # 16-byte vectors: 8 threads cover one 64-wide bf16 row, a warp 4 rows, 4 warps 16 rows per pass.
    a_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    rows = gl.load(p_sorted + i_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, a_layout)))
    m_rows = rows < num_rows
    # Rows start 16-byte aligned (the caller checks stride and base) so cp.async moves 16-byte vectors.
    o_rows = gl.multiple_of((rows // a_row_div).to(gl.int64) * stride_am, 8)
    o_k = gl.max_contiguous(gl.multiple_of(gl.arange(0, BK, layout=gl.SliceLayout(0, a_layout)), 8), 8)
    p_tile = p_a + o_rows[:, None] + o_k[None, :]
    mask = m_rows[:, None]
    for i in range(num_k):
        s = i % S
        mbarrier.wait(empty.index(s), ((i // S) & 1) ^ 1)
        if WITH_B:
            mbarrier.expect(ready.index(s), BN * BK * 2)
            tma.async_copy_global_to_shared(b_desc, [b_row0, i * BK], ready.index(s), b_bufs.index(s))
        async_copy.async_copy_global_to_shared(a_bufs.index(s), p_tile + i * BK, mask=mask)
        async_copy.commit_group()
        if i >= LAG:
            async_copy.wait_group(LAG)
            fence_async_shared()
            mbarrier.arrive(ready.index((i - LAG) % S), count=1)
    async_copy.wait_group(0)
    fence_async_shared()
    for j in range(gl.maximum(num_k - LAG, 0), num_k):
        mbarrier.arrive(ready.index(j % S), count=1)


@gluon.jit
def _consumer(a_bufs, b_bufs, ready, empty, num_k, BM: gl.constexpr, BN: gl.constexpr, S: gl.constexpr,
              mma_layout: gl.constexpr):
    acc = gl.zeros([BM, BN], gl.float32, layout=mma_layout)
    for i in range(num_k):
        s = i % S
        mbarrier.wait(ready.index(s), (i // S) & 1)
        acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        if i > 0:
            mbarrier.arrive(empty.index((i - 1) % S), count=1)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    return (acc,)  # warp_specialize flattens the default partition's results: a tuple


@gluon.jit
def _tile_coords(t, num_blocks, num_n, GROUP_M: gl.constexpr):
    in_group = GROUP_M * num_n
    first_m = (t // in_group) * GROUP_M
    gm = gl.minimum(num_blocks - first_m, GROUP_M)
    return first_m + (t % in_group) % gm, (t % in_group) // gm


@gluon.jit
def _ring(p_b, num_experts, n_b, k_dim, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr,
          EMPTY_ARRIVALS: gl.constexpr):
    """The weight descriptor, S stages of A and B tiles, and each stage's barriers: ``ready`` completes on the
    loader's arrival plus the TMA bytes, ``empty`` on EMPTY_ARRIVALS consumer arrivals. Tiles of the weights'
    element type (A's is the same: bf16, or fp8 in gluon_fp8_probe.py)."""
    DTYPE: gl.constexpr = p_b.dtype.element_ty
    a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], DTYPE)
    b_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], DTYPE)
    b_desc = tma.make_tensor_descriptor(p_b, shape=[num_experts * n_b, k_dim], strides=[k_dim, 1],
                                        block_shape=[BN, BK], layout=b_sl)
    a_bufs = gl.allocate_shared_memory(DTYPE, [S, BM, BK], a_sl)
    b_bufs = gl.allocate_shared_memory(DTYPE, [S, BN, BK], b_sl)
    ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(S):
        mbarrier.init(ready.index(s), count=2)
        mbarrier.init(empty.index(s), count=EMPTY_ARRIVALS)
    return b_desc, a_bufs, b_bufs, ready, empty


@gluon.jit
def gluon_gmm_kernel(p_a, p_b, p_c, p_sorted, p_experts, num_blocks, num_rows, a_row_div, n_out, k_dim, n_b,
                     num_experts, stride_am,
                     BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, LAG: gl.constexpr,
                     GROUP_M: gl.constexpr, SPLIT_B: gl.constexpr, num_warps: gl.constexpr):
    i_m, i_n = _tile_coords(gl.program_id(0), num_blocks, gl.cdiv(n_out, BN), GROUP_M)
    i_e = gl.maximum(gl.load(p_experts + i_m), 0)

    b_desc, a_bufs, b_bufs, ready, empty = _ring(p_b, num_experts, n_b, k_dim, BM, BN, BK, S, 1)
    num_k = gl.cdiv(k_dim, BK)
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BN, 16])
    b_row0 = i_e * n_b + i_n * BN
    if SPLIT_B:
        (acc,) = gl.warp_specialize([
            (_consumer, (a_bufs, b_bufs, ready, empty, num_k, BM, BN, S, mma_layout)),
            (_loader, (p_a, b_desc, p_sorted, a_bufs, b_bufs, ready, empty, i_m, b_row0, num_rows, a_row_div,
                       stride_am, num_k, BM, BN, BK, S, LAG, False)),
            (_b_loader, (p_a, b_desc, p_sorted, a_bufs, b_bufs, ready, empty, i_m, b_row0, num_rows, a_row_div,
                         stride_am, num_k, BM, BN, BK, S, LAG, False)),
        ], [2, 1], [80, 24])
    else:
        (acc,) = gl.warp_specialize([
            (_consumer, (a_bufs, b_bufs, ready, empty, num_k, BM, BN, S, mma_layout)),
            (_loader, (p_a, b_desc, p_sorted, a_bufs, b_bufs, ready, empty, i_m, b_row0, num_rows, a_row_div,
                       stride_am, num_k, BM, BN, BK, S, LAG, True)),
        ], [4], [80])
    o_m = i_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, mma_layout))
    o_n = i_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
    gl.store(p_c + o_m.to(gl.int64)[:, None] * n_out + o_n[None, :], acc.to(gl.bfloat16),
             mask=(o_n < n_out)[None, :])


@gluon.jit
def _p_loader(p_a, b_desc, p_sorted, p_experts, a_bufs, b_bufs, ready, empty, num_blocks, num_n, num_rows,
              a_row_div, stride_am, n_b, num_k, num_tiles, num_progs,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, LAG: gl.constexpr,
              GROUP_M: gl.constexpr, EB: gl.constexpr):
    """Persistent loader: the stage ring and the cp.async lag run on across tiles, so the next tile's loads
    start while the consumer is still in this tile's epilogue. EB: bytes an element (2: bf16, 1: fp8)."""
    VEC: gl.constexpr = 16 // EB  # 16-byte vectors; 8 threads cover a row of BK = 8·VEC elements
    a_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [4, 8], [gl.num_warps(), 1], [1, 0])
    o_k = gl.max_contiguous(gl.multiple_of(gl.arange(0, BK, layout=gl.SliceLayout(0, a_layout)), VEC), VEC)
    it = 0
    for t in range(gl.program_id(0), num_tiles, num_progs):
        i_m, i_n = _tile_coords(t, num_blocks, num_n, GROUP_M)
        i_e = gl.maximum(gl.load(p_experts + i_m), 0)
        rows = gl.load(p_sorted + i_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, a_layout)))
        o_rows = gl.multiple_of((rows // a_row_div).to(gl.int64) * stride_am, VEC)
        p_tile = p_a + o_rows[:, None] + o_k[None, :]
        mask = (rows < num_rows)[:, None]
        b_row0 = i_e * n_b + i_n * BN
        for kk in range(num_k):
            s = it % S
            mbarrier.wait(empty.index(s), ((it // S) & 1) ^ 1)
            mbarrier.expect(ready.index(s), BN * BK * EB)
            tma.async_copy_global_to_shared(b_desc, [b_row0, kk * BK], ready.index(s), b_bufs.index(s))
            async_copy.async_copy_global_to_shared(a_bufs.index(s), p_tile + kk * BK, mask=mask)
            async_copy.commit_group()
            if it >= LAG:
                async_copy.wait_group(LAG)
                fence_async_shared()
                mbarrier.arrive(ready.index((it - LAG) % S), count=1)
            it += 1
    async_copy.wait_group(0)
    fence_async_shared()
    for j in range(gl.maximum(it - LAG, 0), it):
        mbarrier.arrive(ready.index(j % S), count=1)


@gluon.jit
def _p_consumer(p_c, a_bufs, b_bufs, ready, empty, num_blocks, num_n, n_out, num_k, num_tiles, num_progs,
                BM: gl.constexpr, BN: gl.constexpr, S: gl.constexpr, GROUP_M: gl.constexpr,
                mma_layout: gl.constexpr):
    it = 0
    for t in range(gl.program_id(0), num_tiles, num_progs):
        i_m, i_n = _tile_coords(t, num_blocks, num_n, GROUP_M)
        acc = gl.zeros([BM, BN], gl.float32, layout=mma_layout)
        for kk in range(num_k):
            s = it % S
            mbarrier.wait(ready.index(s), (it // S) & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if kk > 0:
                mbarrier.arrive(empty.index((it - 1) % S), count=1)
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((it - 1) % S), count=1)
        o_m = i_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, mma_layout))
        o_n = i_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
        gl.store(p_c + o_m.to(gl.int64)[:, None] * n_out + o_n[None, :], acc.to(gl.bfloat16),
                 mask=(o_n < n_out)[None, :])


@gluon.jit
def gluon_gmm_persistent_kernel(p_a, p_b, p_c, p_sorted, p_experts, num_blocks, num_rows, a_row_div, n_out, k_dim,
                                n_b, num_experts, stride_am, num_progs,
                                BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr,
                                LAG: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
    b_desc, a_bufs, b_bufs, ready, empty = _ring(p_b, num_experts, n_b, k_dim, BM, BN, BK, S, 1)
    num_k = gl.cdiv(k_dim, BK)
    num_n = gl.cdiv(n_out, BN)
    num_tiles = num_blocks * num_n
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BN, 16])
    gl.warp_specialize([
        (_p_consumer, (p_c, a_bufs, b_bufs, ready, empty, num_blocks, num_n, n_out, num_k, num_tiles, num_progs,
                       BM, BN, S, GROUP_M, mma_layout)),
        (_p_loader, (p_a, b_desc, p_sorted, p_experts, a_bufs, b_bufs, ready, empty, num_blocks, num_n, num_rows,
                     a_row_div, stride_am, n_b, num_k, num_tiles, num_progs, BM, BN, BK, S, LAG, GROUP_M, 2)),
    ], [4], [80])


@gluon.jit
def _h_consumer(p_c, p_sorted, a_bufs, b_bufs, ready, empty, num_blocks, num_n, n_out, num_rows, num_k, num_tiles,
                num_progs, BM: gl.constexpr, BN: gl.constexpr, S: gl.constexpr, GROUP_M: gl.constexpr,
                HALF: gl.constexpr):
    """One warpgroup owning rows [HALF·BM/2, (HALF+1)·BM/2) of every tile. The upper half skips its MMAs when its
    rows are all padding (align puts an expert's padding last), so a tail block costs half the tensor work."""
    HM: gl.constexpr = BM // 2
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
    it = 0
    for t in range(gl.program_id(0), num_tiles, num_progs):
        i_m, i_n = _tile_coords(t, num_blocks, num_n, GROUP_M)
        busy = True
        if HALF == 1:
            busy = gl.load(p_sorted + i_m * BM + HM) < num_rows
        acc = gl.zeros([HM, BN], gl.float32, layout=mma_layout)
        for kk in range(num_k):
            s = it % S
            mbarrier.wait(ready.index(s), (it // S) & 1)
            if busy:
                acc = warpgroup_mma(a_bufs.index(s).slice(HALF * HM, HM), b_bufs.index(s).permute((1, 0)), acc,
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if kk > 0:
                mbarrier.arrive(empty.index((it - 1) % S), count=1)
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((it - 1) % S), count=1)
        if busy:
            o_m = i_m * BM + HALF * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, mma_layout))
            o_n = i_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
            gl.store(p_c + o_m.to(gl.int64)[:, None] * n_out + o_n[None, :], acc.to(gl.bfloat16),
                     mask=(o_n < n_out)[None, :])


@gluon.jit
def gluon_gmm_halves_kernel(p_a, p_b, p_c, p_sorted, p_experts, num_blocks, num_rows, a_row_div, n_out, k_dim,
                            n_b, num_experts, stride_am, num_progs,
                            BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr,
                            LAG: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
    """Persistent, with the two consumer warpgroups as separate partitions (see ``_h_consumer``)."""
    # Both consumer warpgroups free a stage.
    b_desc, a_bufs, b_bufs, ready, empty = _ring(p_b, num_experts, n_b, k_dim, BM, BN, BK, S, 2)
    num_k = gl.cdiv(k_dim, BK)
    num_n = gl.cdiv(n_out, BN)
    num_tiles = num_blocks * num_n
    gl.warp_specialize([
        (_h_consumer, (p_c, p_sorted, a_bufs, b_bufs, ready, empty, num_blocks, num_n, n_out, num_rows, num_k,
                       num_tiles, num_progs, BM, BN, S, GROUP_M, 0)),
        (_h_consumer, (p_c, p_sorted, a_bufs, b_bufs, ready, empty, num_blocks, num_n, n_out, num_rows, num_k,
                       num_tiles, num_progs, BM, BN, S, GROUP_M, 1)),
        (_p_loader, (p_a, b_desc, p_sorted, p_experts, a_bufs, b_bufs, ready, empty, num_blocks, num_n, num_rows,
                     a_row_div, stride_am, n_b, num_k, num_tiles, num_progs, BM, BN, BK, S, LAG, GROUP_M, 2)),
    ], [4, 4], [232, 56])


def compile_only() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {"p_a": "*bf16", "p_b": "*bf16", "p_c": "*bf16", "p_sorted": "*i32", "p_experts": "*i32",
           "num_blocks": "i32", "num_rows": "i32", "a_row_div": "i32", "n_out": "i32", "k_dim": "i32", "n_b": "i32",
           "num_experts": "i32", "stride_am": "i32",
           "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "S": "constexpr", "LAG": "constexpr",
           "GROUP_M": "constexpr", "SPLIT_B": "constexpr", "num_warps": "constexpr"}
    for BN, S, split in ((256, 4, False), (256, 3, False), (128, 4, False), (256, 4, True)):
        const = {"BM": 128, "BN": BN, "BK": 64, "S": S, "LAG": S - 2, "GROUP_M": 8, "SPLIT_B": split,
                 "num_warps": 8}
        # What the JIT sees at run time: 16-byte aligned pointers, strides divisible by 16.
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 12)}
        src = GluonASTSource(gluon_gmm_kernel, signature=sig, constexprs=const, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, maxnreg=168))
        print(f"BN={BN} S={S} split_b={split}: compiled, shared {k.metadata.shared} B, ptx {len(k.asm['ptx'])} chars")
    psig = {k: v for k, v in sig.items() if k not in ("SPLIT_B",)}
    psig = {**{k: v for k, v in psig.items() if v != "constexpr"}, "num_progs": "i32",
            **{k: v for k, v in psig.items() if v == "constexpr"}}
    for BN, S in ((256, 4), (256, 3)):
        const = {"BM": 128, "BN": BN, "BK": 64, "S": S, "LAG": S - 2, "GROUP_M": 8, "num_warps": 8}
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 12)}
        src = GluonASTSource(gluon_gmm_persistent_kernel, signature=psig, constexprs=const, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, maxnreg=168))
        print(f"persistent BN={BN} S={S}: compiled, shared {k.metadata.shared} B")
        src = GluonASTSource(gluon_gmm_halves_kernel, signature=psig, constexprs={**const, "num_warps": 4},
                             attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
        print(f"halves BN={BN} S={S}: compiled, shared {k.metadata.shared} B")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    args = ap.parse_args()
    if args.compile_only:
        compile_only()
        return
    sys.exit("GPU mode is in benchmarks/probes/device_ws_probe.py (variant 'gluon')")


if __name__ == "__main__":
    main()
