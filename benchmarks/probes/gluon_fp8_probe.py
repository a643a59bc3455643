"""Probe: fp8 block-scaled grouped GEMM in Gluon, with the per-K-tile scaling overlapped with the tensor cores.

    python3 benchmarks/probes/gluon_fp8_probe.py --compile-only   # anywhere with triton 3.6: compile for sm_90
    PYTHONPATH=. python3 benchmarks/probes/gluon_fp8_probe.py     # on an sm_90 GPU: check + time beside Triton

Why: block scales (DeepSeek-V3's 128 x 128) are applied to each 128-wide K tile's product before it is added in
fp32. In the Triton kernel (``grouped_gemm_w8a8``) that product is a fresh accumulator waited on (wgmma wait 0)
right after it is issued, so a program's tensor cores idle during its scaling FMAs; Triton 3.6 never leaves one
wgmma in flight across them (checked in the PTX of a 2x-unrolled loop: two wait-0s). Here each consumer
warpgroup issues step k's wgmma, waits with one group outstanding and scales step k - 1's product meanwhile
(DEFER = U > 0: in groups of U steps, ``_steps_deferred``); and the two consumer warpgroups are separate
partitions (64 rows of the tile each) that drift apart by up to the ring depth, so one's FMAs can overlap the
other's MMAs either way. Results: docs/perf/NOTES.md ("fp8 block scaling in Gluon").

Partitions of a persistent program (one per SM; tiles = BM-row blocks x BN weight rows of one expert):
  loader (4 warps): cp.async gather of the A rows (fp8) and TMA of the weight tile per K step into an S-deep ring.
  consumer 0 / 1 (4 warps each): rows [0, 64) / [64, 128) of the tile; per K step the wgmma, the scale factor
      a_s[row, kb] * b_s[e, nb, kb] (loaded a step ahead) and one FMA an element; consumer 1 skips its MMAs when
      its rows are all padding. Epilogue: bf16 C in slot order (no activation: the main loop is what is measured).
"""

from __future__ import annotations

import argparse
import os
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gluon_gemm_probe import _p_loader, _ring, _tile_coords  # noqa: E402  (the bf16 probe's; EB = 1 here)


@gluon.jit
def _steps_deferred(a_bufs, b_bufs, ready, empty, p_as_rows, p_bs_tile, m_rows, acc, zero, it, num_k,
                    HM: gl.constexpr, S: gl.constexpr, HALF: gl.constexpr, U: gl.constexpr):
    """K steps in groups of U (num_k % U == 0): each step issues its wgmma, waits until only that one is
    outstanding and adds the previous step's product, so U - 1 of every U scalings run while a wgmma multiplies.
    No product is in flight across the loop's back edge: the phi copies of an in-flight accumulator make ptxas
    serialize every wgmma (C7514)."""
    for kk in range(0, num_k, U):
        s = it % S
        f_prev = gl.load(p_as_rows + kk, mask=m_rows, other=0.0) * gl.load(p_bs_tile + kk)
        mbarrier.wait(ready.index(s), (it // S) & 1)
        tok = warpgroup_mma(a_bufs.index(s).slice(HALF * HM, HM), b_bufs.index(s).permute((1, 0)), zero,
                            use_acc=False, is_async=True)
        for j in gl.static_range(1, U):
            s_j = (it + j) % S
            f_j = gl.load(p_as_rows + kk + j, mask=m_rows, other=0.0) * gl.load(p_bs_tile + kk + j)
            mbarrier.wait(ready.index(s_j), ((it + j) // S) & 1)
            tok_j = warpgroup_mma(a_bufs.index(s_j).slice(HALF * HM, HM), b_bufs.index(s_j).permute((1, 0)), zero,
                                  use_acc=False, is_async=True)
            tok_j, done = warpgroup_mma_wait(num_outstanding=1, deps=(tok_j, tok))
            acc += done * f_prev[:, None]
            mbarrier.arrive(empty.index((it + j - 1) % S), count=1)
            tok = tok_j
            f_prev = f_j
        done = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
        acc += done * f_prev[:, None]
        mbarrier.arrive(empty.index((it + U - 1) % S), count=1)
        it += U
    return acc, it


@gluon.jit
def _consumer(p_c, p_sorted, p_experts, p_as, p_bs, a_bufs, b_bufs, ready, empty, num_blocks, num_n, n_out,
              num_rows, a_row_div, stride_asm, stride_bse, stride_bsn, num_k, num_tiles, num_progs,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, GROUP_M: gl.constexpr,
              HALF: gl.constexpr, DEFER: gl.constexpr):
    HM: gl.constexpr = BM // 2
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    it = 0
    for t in range(gl.program_id(0), num_tiles, num_progs):
        i_m, i_n = _tile_coords(t, num_blocks, num_n, GROUP_M)
        i_e = gl.maximum(gl.load(p_experts + i_m), 0)
        rows = gl.load(p_sorted + i_m * BM + HALF * HM + gl.arange(0, HM, layout=row_layout))
        m_rows = rows < num_rows
        busy = gl.max(m_rows.to(gl.int32), axis=0) > 0
        p_as_rows = p_as + (rows // a_row_div).to(gl.int64) * stride_asm
        p_bs_tile = p_bs + i_e * stride_bse + ((i_n * BN) // 128) * stride_bsn
        acc = gl.zeros([HM, BN], gl.float32, layout=mma_layout)
        zero = gl.zeros([HM, BN], gl.float32, layout=mma_layout)
        if DEFER > 0 and busy:
            acc, it = _steps_deferred(a_bufs, b_bufs, ready, empty, p_as_rows, p_bs_tile, m_rows, acc, zero, it,
                                      num_k, HM, S, HALF, DEFER)
        elif DEFER > 0:
            for kk in range(num_k):  # padding rows only: keep the ring's phases
                mbarrier.wait(ready.index(it % S), (it // S) & 1)
                mbarrier.arrive(empty.index(it % S), count=1)
                it += 1
        if DEFER == 0:
            f = gl.load(p_as_rows, mask=m_rows, other=0.0) * gl.load(p_bs_tile)
            for kk in range(num_k):
                s = it % S
                mbarrier.wait(ready.index(s), (it // S) & 1)
                # The next step's factor, loaded now so its latency hides under this step's MMA.
                kn = gl.minimum(kk + 1, num_k - 1)
                f_next = gl.load(p_as_rows + kn, mask=m_rows, other=0.0) * gl.load(p_bs_tile + kn)
                if busy:
                    d = warpgroup_mma(a_bufs.index(s).slice(HALF * HM, HM), b_bufs.index(s).permute((1, 0)), zero,
                                      use_acc=False, is_async=True)
                    d = warpgroup_mma_wait(num_outstanding=0, deps=(d,))
                    acc += d * f[:, None]
                mbarrier.arrive(empty.index(s), count=1)
                f = f_next
                it += 1
        if busy:
            o_m = i_m * BM + HALF * HM + gl.arange(0, HM, layout=row_layout)
            o_n = i_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
            gl.store(p_c + o_m.to(gl.int64)[:, None] * n_out + o_n[None, :], acc.to(gl.bfloat16),
                     mask=(o_n < n_out)[None, :])


@gluon.jit
def gluon_fp8_block_kernel(p_a, p_b, p_as, p_bs, p_c, p_sorted, p_experts, num_blocks, num_rows, a_row_div, n_out,
                           k_dim, n_b, num_experts, stride_am, stride_asm, stride_bse, stride_bsn, num_progs,
                           BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr,
                           LAG: gl.constexpr, GROUP_M: gl.constexpr, DEFER: gl.constexpr, num_warps: gl.constexpr):
    # fp8 tiles (p_b's type); a stage is free once both consumer warpgroups arrive.
    b_desc, a_bufs, b_bufs, ready, empty = _ring(p_b, num_experts, n_b, k_dim, BM, BN, BK, S, 2)
    num_k = gl.cdiv(k_dim, BK)
    num_n = gl.cdiv(n_out, BN)
    num_tiles = num_blocks * num_n
    gl.warp_specialize([
        (_consumer, (p_c, p_sorted, p_experts, p_as, p_bs, a_bufs, b_bufs, ready, empty, num_blocks, num_n, n_out,
                     num_rows, a_row_div, stride_asm, stride_bse, stride_bsn, num_k, num_tiles, num_progs,
                     BM, BN, BK, S, GROUP_M, 0, DEFER)),
        (_consumer, (p_c, p_sorted, p_experts, p_as, p_bs, a_bufs, b_bufs, ready, empty, num_blocks, num_n, n_out,
                     num_rows, a_row_div, stride_asm, stride_bse, stride_bsn, num_k, num_tiles, num_progs,
                     BM, BN, BK, S, GROUP_M, 1, DEFER)),
        (_p_loader, (p_a, b_desc, p_sorted, p_experts, a_bufs, b_bufs, ready, empty, num_blocks, num_n, num_rows,
                     a_row_div, stride_am, n_b, num_k, num_tiles, num_progs, BM, BN, BK, S, LAG, GROUP_M, 1)),
    ], [4, 4], [232, 40])


VARIANTS = ((4, 0), (4, 2), (6, 2), (3, 2))  # (stages, DEFER: 0 = each product waited on, else the group size U)

SIG = {"p_a": "*fp8e4nv", "p_b": "*fp8e4nv", "p_as": "*fp32", "p_bs": "*fp32", "p_c": "*bf16", "p_sorted": "*i32",
       "p_experts": "*i32", "num_blocks": "i32", "num_rows": "i32", "a_row_div": "i32", "n_out": "i32",
       "k_dim": "i32", "n_b": "i32", "num_experts": "i32", "stride_am": "i32", "stride_asm": "i32",
       "stride_bse": "i32", "stride_bsn": "i32", "num_progs": "i32",
       "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "S": "constexpr", "LAG": "constexpr",
       "GROUP_M": "constexpr", "DEFER": "constexpr", "num_warps": "constexpr"}


def compile_only() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    for S, defer in VARIANTS:
        const = {"BM": 128, "BN": 128, "BK": 128, "S": S, "LAG": S - 2, "GROUP_M": 8, "DEFER": defer, "num_warps": 4}
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 14)}
        src = GluonASTSource(gluon_fp8_block_kernel, signature=SIG, constexprs=const, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        ptx = k.asm["ptx"]
        print(f"S={S} defer={defer}: compiled, shared {k.metadata.shared} B, wgmma {ptx.count('wgmma.mma_async')}, "
              f"waits {sorted(set(ptx.split('wgmma.wait_group.sync.aligned')[i][:3] for i in range(1, ptx.count('wgmma.wait_group') + 1)))}")


def _alloc(size: int, alignment: int, stream):
    import torch
    return torch.empty(size, device="cuda", dtype=torch.int8)


def run_gpu(cells: list[str], repeats: int) -> None:
    import torch

    from moekit.ops.align import align
    from moekit.ops.grouped_gemm_w8a8 import grouped_gemm_w8a8
    from moekit.ops.heuristics import MoEShape, heuristic_config

    triton.set_allocator(_alloc)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__} triton {triton.__version__}", flush=True)
    shapes = {"deepseek-v3": (256, 7168, 2048, 8), "qwen3-30b-a3b": (128, 2048, 768, 8), "mixtral-8x7b": (8, 4096, 14336, 2)}
    rows_out = []
    for cell in cells:
        name, T = cell.split("@")
        T = int(T)
        E, H, I, K = shapes[name]  # noqa: E741
        ids = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)]).int()
        cfg = heuristic_config(MoEShape(num_tokens=T, top_k=K, num_experts=E, hidden=H, inter=I, weights="fp8_block",
                                        elem_bytes=1))
        for gemm, n_out, k_dim, div in (("gemm1", 2 * I, H, K), ("gemm2", H, I, 1)):
            num_rows = T * K
            a_rows = T if div == K else num_rows
            a = (torch.randn(a_rows, k_dim, device=dev) * 2).to(torch.float8_e4m3fn)
            a_s = torch.rand(a_rows, k_dim // 128, device=dev) + 0.5
            b = (torch.randn(E, n_out, k_dim, device=dev) * 2).to(torch.float8_e4m3fn)
            b_s = torch.rand(E, n_out // 128, k_dim // 128, device=dev) + 0.5
            flops = 2 * num_rows * n_out * k_dim
            # Triton (the heuristic's tiles for this scheme; GEMM 1 as a plain GEMM over the 2I rows).
            g = cfg.gemm1 if gemm == "gemm1" else cfg.gemm2
            lay_t = align(ids, E, cfg.block_m)
            out_t = torch.empty(num_rows, n_out, device=dev, dtype=torch.bfloat16)
            f_t = lambda: grouped_gemm_w8a8(a, a_s, b, b_s, lay_t, out_t, g, granularity="block",  # noqa: E731
                                            block_shape=(128, 128), num_rows=num_rows, a_row_div=div)
            f_t()
            us_t = triton.testing.do_bench(f_t, rep=repeats, return_mode="median") * 1e3
            rows_out.append((name, T, gemm, "triton", us_t, flops / us_t / 1e6, 0.0))
            # Gluon, 128-row blocks.
            lay = align(ids, E, 128)
            nb = int(lay.num_padded.item()) // 128
            num_k = k_dim // 128
            for S, defer in VARIANTS:
                if defer and num_k % defer:
                    continue
                c = torch.zeros(lay.sorted_ids.numel(), n_out, device=dev, dtype=torch.bfloat16)
                tiles = nb * triton.cdiv(n_out, 128)
                progs = min(sms, tiles)
                f_g = lambda c=c, S=S, defer=defer, progs=progs: gluon_fp8_block_kernel[(progs,)](  # noqa: E731
                    a, b, a_s, b_s, c, lay.sorted_ids, lay.expert_ids, nb, num_rows, div, n_out, k_dim, n_out, E,
                    a.stride(0), a_s.stride(0), b_s.stride(0), b_s.stride(1), progs,
                    BM=128, BN=128, BK=128, S=S, LAG=S - 2, GROUP_M=8, DEFER=defer, num_warps=4)
                sid = lay.sorted_ids[: nb * 128].long()
                ok = sid < num_rows
                want = out_t[sid[ok]]

                def check(c=c, when=""):
                    # Same products, same order of fp32 adds as the Triton kernel: equal bit for bit, or say where not.
                    got = c[: nb * 128][ok]
                    if not torch.equal(got, want):
                        bad = (got != want).nonzero()[0].tolist()
                        raise AssertionError(f"{name} {gemm} S={S} U={defer}{when}: differs from Triton first at "
                                             f"routed slot/column {bad}: {got[bad[0], bad[1]]} vs {want[bad[0], bad[1]]}")
                    return float((got.float() - want.float()).norm() / want.float().norm())

                c.zero_()
                f_g()
                torch.cuda.synchronize()
                err = check()
                us_g = triton.testing.do_bench(f_g, rep=repeats, return_mode="median") * 1e3
                check(when=" (after timing)")
                rows_out.append((name, T, gemm, f"gluon S={S} U={defer}", us_g, flops / us_g / 1e6, err))
                print(rows_out[-1], flush=True)
    print(f"\n{'cell':22s} {'gemm':6s} {'variant':22s} {'us':>9s} {'TFLOP/s':>8s} {'rel err':>8s}")
    for name, T, gemm, var, us, tf, err in rows_out:
        print(f"{name + '@' + str(T):22s} {gemm:6s} {var:22s} {us:9.1f} {tf:8.1f} {err:8.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--cells", default="deepseek-v3@4096,qwen3-30b-a3b@4096,mixtral-8x7b@4096")
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    args = ap.parse_args()
    if args.compile_only:
        compile_only()
        return
    run_gpu(args.cells.split(","), args.rep)


if __name__ == "__main__":
    sys.exit(main())
