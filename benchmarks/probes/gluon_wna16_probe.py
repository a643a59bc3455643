"""Probe: a Gluon 4-bit weight-only decode GEMM whose register-operand wgmmas stay in flight while the next piece is
dequantized, against moekit's ``grouped_gemm_wna16`` ("dequant_pairs"), op level.

    PYTHONPATH=. python3 benchmarks/probes/gluon_wna16_probe.py --compile-only   # anywhere with triton 3.6
    PYTHONPATH=. python3 benchmarks/probes/gluon_wna16_probe.py     # on an sm_90 GPU: check + time

Why: "dequant_pairs" (NOTES.md, "Packed pairs into wgmma's register operand") already brings a thread's int32 code
words into the layout of wgmma's register A operand, but Triton 3.6 waits for every wgmma whose A is in registers
(``wgmma.wait_group 0``) before it builds the next piece, so the tensor cores, the integer units and the loads
take turns. Here each wgmma is waited on with one group outstanding: piece p + 1 is dequantized while piece p
multiplies; and ("post", MODE 2) a group's pieces accumulate unscaled into their own product, scaled in fp32
once per group, instead of a bf16 multiply per weight pair.

Shape of the computation (swapped, as the Triton kernel at decode): acc^T[BN weight rows, BM tokens] =
W[BN, K] · A^T. A K step of 128 columns (one scale group) is four pieces r = 0..3; piece r is the weight columns
{8w + r, 8w + r + 4 : w = 0..15} -- nibbles r and r + 4 of the 16 words of each row, the two halves of a word, so
one shift and one ``lop3`` give a packed bf16 pair -- in (w, h) order. A's columns are permuted the same way once
per call (``permute_a``): piece r's activations are then the contiguous columns [32r, 32r + 32) of the step.

Registers: the words of a [BN, 16] step are loaded from shared memory in ``_word_layout`` (the library kernel's,
``moekit/ops/_kernels/gluon_wna16.py``, which grew out of this probe), which is by construction
the register layout of wgmma's A operand for the [BN, 32] bf16 piece with the pair (2w, 2w + 1) in one register;
the piece is built by an elementwise asm and handed to the wgmma with ``convert_layout(assert_trivial=True)``.
Shared memory: TMA stages of the words ([BN, BK / 8] int32) and of A ([BK / 32, BM, 32] bf16, rows past M
zero-filled), host descriptors. Scales: bf16 group-128, symmetric codes (zero point 8); split-K partials in fp32.
Single expert (not the grouped layer). Not a test: what it found is in docs/perf/NOTES.md ("4-bit decode in
Gluon"), raw numbers in docs/perf/h200-gluon-wna16-2026-11-29.txt.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from moekit.ops._kernels.gluon_wna16 import _word_layout  # noqa: E402  (the library's: same layout)

GROUP_SIZE = 128
GROUP = gl.constexpr(GROUP_SIZE)


@gluon.jit
def _piece(words, s2, R: gl.constexpr, BN: gl.constexpr, MODE: gl.constexpr):
    """Piece R of a step as bf16 [BN, 32]: element (n, 2w + h) from nibble R + 4h of word (n, w). Each asm call
    gets the word twice (h = 0 and 1, adjacent registers) and emits the packed pair: a shift and one and-or into
    the mantissa of 128.0 (``lop3`` 0xea = (a & b) | c), then 128 + 8 off (exact: small integers) and, MODE 0, the
    scale on the pair (bf16, rounded as the reference rounds w = (q - 8)·s)."""
    x = gl.reshape(gl.join(words, words), [BN, 32])
    s = gl.reshape(gl.join(s2, s2), [BN, 32])
    SH: gl.constexpr = f"shr.u32 t, $1, {4 * R}; " if R > 0 else "mov.b32 t, $1; "
    if MODE == 0:
        asm: gl.constexpr = ("{ .reg .b32 t, c; " + SH + "lop3.b32 t, t, 0x000F000F, 0x43004300, 0xea; "
                             "mov.b32 c, 0x43084308; sub.rn.bf16x2 t, t, c; mul.rn.bf16x2 $0, t, $3; }")
    elif MODE == 2:
        asm: gl.constexpr = ("{ .reg .b32 t, c; " + SH + "lop3.b32 t, t, 0x000F000F, 0x43004300, 0xea; "
                             "mov.b32 c, 0x43084308; sub.rn.bf16x2 $0, t, c; }")
    elif MODE == 4:  # 128 + q as is: the 136 comes off in the group epilogue (136 · Σa per slot and group)
        asm: gl.constexpr = "{ .reg .b32 t; " + SH + "lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea; }"
    else:  # diagnostic: no dequantization (wrong values; the structure's own cost)
        asm: gl.constexpr = "{ mov.b32 $0, $1; }"
    return gl.inline_asm_elementwise(asm, "=r,r,r,r,r", [x, s], dtype=gl.bfloat16, is_pure=True, pack=2)


@gluon.jit
def _refill(w_desc, a_desc, w_bufs, a_bufs, ready, j0, i, j_end, KS, BN: gl.constexpr, BK: gl.constexpr,
            STEP_BYTES: gl.constexpr):
    """The program's step i: flat step j = j0 + i (tile j // KS, K step j % KS), if j < j_end, into stage i % S
    (the program's own count: the consumer's phases follow it)."""
    j = j0 + i
    sp = i % w_bufs.shape[0]
    pred = j < j_end
    tile = j // KS
    kk = j % KS
    mbarrier.expect(ready.index(sp), STEP_BYTES, pred=pred)
    tma.async_copy_global_to_shared(w_desc, [tile * BN, kk * (BK // 8)], ready.index(sp), w_bufs.index(sp),
                                    pred=pred)
    tma.async_copy_global_to_shared(a_desc, [kk * (BK // 32), 0, 0], ready.index(sp), a_bufs.index(sp), pred=pred)


@gluon.jit
def wna16_decode_kernel(w_desc, a_desc, p_s, p_c, p_asum, M, N, K: gl.constexpr, k_per_split, stride_sn, stride_cs,
                        stride_cm,
                        BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, WG: gl.constexpr,
                        MODE: gl.constexpr, WAIT: gl.constexpr, STREAM: gl.constexpr, num_warps: gl.constexpr):
    """MODE 0: each piece scaled in bf16 before its wgmma (what "dequant_pairs" does). MODE 2: the pieces of a
    group accumulate unscaled (q - 8) into their own product, scaled into acc in fp32 once the group is done --
    one FMA per accumulator element a group instead of a bf16 multiply per weight; the FMAs of group g run while
    group g + 1's first wgmma multiplies. MODE 1: no dequantization (diagnostic). MODE 3: no MMA either, only the
    stage ring (diagnostic: what the loads alone take).
    Work: the flat sequence of (weight tile of BN rows, K step of BK) in tile-major order. STREAM = 0: a program
    per (tile, K split): grid (N / BN, splits), partials stored to out[split]. STREAM = 1: persistent, grid (P,),
    program p takes the equal share [p·total / P, (p + 1)·total / P) of the sequence, crossing tile boundaries
    without draining its ring; a tile's partial sums are atomically added to out[0] (zeroed by the caller). With
    a share of at least one tile's K steps, a tile has at most two contributors, and 0 + a + b = 0 + b + a in
    fp32: the result does not depend on their order.
    w_desc: the int32 code words [N, K / 8], blocks [BN, BK / 8]; a_desc: A as [K / 32, M, 32] (``permute_a``),
    blocks [BK / 32, BM, 32], so that a stage is one box and a piece's operand one whole [BM, 32] plane of it,
    never a slice inside a swizzle atom."""
    KS: gl.constexpr = K // BK
    if STREAM:
        total = (N // BN) * KS
        j0 = (gl.program_id(0).to(gl.int64) * total // gl.num_programs(0)).to(gl.int32)
        j_end = ((gl.program_id(0).to(gl.int64) + 1) * total // gl.num_programs(0)).to(gl.int32)
    else:
        j0 = gl.program_id(0) * KS + gl.program_id(1) * (k_per_split // BK)
        j_end = gl.minimum(j0 + k_per_split // BK, (gl.program_id(0) + 1) * KS)
    GS: gl.constexpr = BK // GROUP  # groups a stage

    w_bufs = gl.allocate_shared_memory(gl.int32, [S, BN, BK // 8], w_desc.layout)
    a_bufs = gl.allocate_shared_memory(gl.bfloat16, [S, BK // 32, BM, 32], a_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(S):
        mbarrier.init(ready.index(st), count=1)

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * WG, 1],
                                                         instr_shape=[16, BM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    wl: gl.constexpr = _word_layout(BN, WG)
    STEP_BYTES: gl.constexpr = BN * BK // 2 + BM * BK * 2

    for i in gl.static_range(S - 1):  # prologue: S - 1 stages in flight
        _refill(w_desc, a_desc, w_bufs, a_bufs, ready, j0, i, j_end, KS, BN, BK, STEP_BYTES)

    rows_w = gl.arange(0, BN, layout=gl.SliceLayout(1, wl))
    rows_c = gl.arange(0, BN, layout=gl.SliceLayout(1, mma_layout))
    o_m = gl.arange(0, BM, layout=gl.SliceLayout(0, mma_layout))
    acc = gl.zeros([BN, BM], gl.float32, layout=mma_layout)
    zero = gl.zeros([BN, BM], gl.float32, layout=mma_layout)
    s2 = gl.zeros([BN, 16], gl.int32, layout=wl)
    for i in range(j_end - j0):
        j = j0 + i
        tile = j // KS
        kk = j % KS
        s = i % S
        mbarrier.wait(ready.index(s), (i // S) & 1)
        if MODE == 3:
            gl.thread_barrier()
            _refill(w_desc, a_desc, w_bufs, a_bufs, ready, j0, i - 1 + S, j_end, KS, BN, BK, STEP_BYTES)
        for g in gl.static_range(GS if MODE != 3 else 0):
            if MODE == 0:  # the scales as bf16 pairs (the same scale in both halves)
                p_sg = p_s + (tile * BN + rows_w).to(gl.int64) * stride_sn + kk * GS + g
                sb = gl.load(p_sg).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
                s2 = gl.zeros([BN, 16], gl.int32, layout=wl) + (sb | (sb << 16))[:, None]
            else:
                s_g = gl.load(p_s + (tile * BN + rows_c).to(gl.int64) * stride_sn + kk * GS + g).to(gl.float32)
            if MODE == 4:  # Σa of each slot over this group's 128 columns ([K / 128, M] fp32)
                asum_g = gl.load(p_asum + (kk * GS + g) * M + o_m, mask=o_m < M, other=0.0)
            words = w_bufs.index(s).slice(16 * g, 16, dim=1).load(wl)
            for r in gl.static_range(4):
                b_q = gl.convert_layout(_piece(words, s2, r, BN, MODE), op_layout, assert_trivial=True)
                a_op = a_bufs.index(s).reshape([BK // 32 * BM, 32]).slice((4 * g + r) * BM, BM, dim=0)
                a_op = a_op.permute((1, 0))
                if MODE == 0:
                    acc = warpgroup_mma(b_q, a_op, acc, is_async=True)
                    acc, b_q = warpgroup_mma_wait(num_outstanding=WAIT, deps=(acc, b_q))
                else:
                    if r == 0:
                        prod = warpgroup_mma(b_q, a_op, zero, use_acc=False, is_async=True)
                    else:
                        prod = warpgroup_mma(b_q, a_op, prod, is_async=True)
                    if r == 0 and g > 0:
                        # The previous group's product is complete (only this wgmma is in flight): scale it in.
                        prod, prev, b_q = warpgroup_mma_wait(num_outstanding=WAIT, deps=(prod, prev, b_q))
                        acc += prev * s_prev[:, None]
                        if MODE == 4:
                            acc -= (136.0 * s_prev)[:, None] * asum_prev[None, :]
                    else:
                        prod, b_q = warpgroup_mma_wait(num_outstanding=WAIT, deps=(prod, b_q))
                if g == 0 and r == 0:
                    # Every wgmma of step j - 1 is done (at most one, this one, is in flight), and all warps are past
                    # their reads of its words: refill its stage with step i - 1 + S.
                    gl.thread_barrier()
                    _refill(w_desc, a_desc, w_bufs, a_bufs, ready, j0, i - 1 + S, j_end, KS, BN, BK, STEP_BYTES)
            if MODE == 1 or MODE == 2 or MODE == 4:
                prev = prod
                s_prev = s_g
            if MODE == 4:
                asum_prev = asum_g
        if MODE == 1 or MODE == 2 or MODE == 4:
            prev = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
            acc += prev * s_prev[:, None]
            if MODE == 4:
                acc -= (136.0 * s_prev)[:, None] * asum_prev[None, :]
        if (kk == KS - 1) | (i == j_end - j0 - 1):  # the tile's last step here: flush its partial sums
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            p_out = p_c + o_m[None, :] * stride_cm + (tile * BN + rows_c)[:, None]
            if STREAM:
                gl.atomic_add(p_out, acc, mask=(o_m < M)[None, :], sem="relaxed")
            else:
                gl.store(p_out + gl.program_id(1) * stride_cs, acc, mask=(o_m < M)[None, :])
            acc = gl.zeros([BN, BM], gl.float32, layout=mma_layout)


SIG = {"w_desc": None, "a_desc": None, "p_s": "*bf16", "p_c": "*fp32", "p_asum": "*fp32", "M": "i32", "N": "i32", "K": "constexpr",
       "k_per_split": "i32", "stride_sn": "i32", "stride_cs": "i32", "stride_cm": "i32",
       "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "S": "constexpr", "WG": "constexpr",
       "MODE": "constexpr", "WAIT": "constexpr", "STREAM": "constexpr", "num_warps": "constexpr"}

# (BM, BN, BK, S, WG, WAIT, STREAM); modes timed: post and the loads-only diagnostic
VARIANTS = ((8, 64, 256, 4, 1, 1, 0), (16, 64, 256, 4, 1, 1, 0), (8, 128, 256, 4, 2, 1, 0), (16, 128, 256, 4, 2, 1, 0),
            (8, 64, 256, 4, 1, 1, 1), (16, 64, 256, 4, 1, 1, 1), (8, 128, 256, 4, 2, 1, 1), (16, 128, 256, 4, 2, 1, 1),
            (8, 64, 256, 6, 1, 1, 1), (16, 64, 512, 3, 1, 1, 1), (16, 128, 512, 3, 2, 1, 1))
MODES = (2, 4, 3)


def compile_only() -> None:
    import collections
    import re
    import subprocess
    from pathlib import Path

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from triton.runtime.jit import mangle_type

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"

    names = list(SIG)
    attrs = {(names.index(x),): [["tt.divisibility", 16]] for x in ("p_s", "p_c", "N", "k_per_split",
                                                                      "stride_sn", "stride_cm")}
    for (bm, bn, bk, S, wg, wait, stream), mode in ((v, m) for v in VARIANTS[:4] for m in (0, 2, 4)):
        const = {"K": 4096, "BM": bm, "BN": bn, "BK": bk, "S": S, "WG": wg, "MODE": mode, "WAIT": wait,
                 "STREAM": stream, "num_warps": 4 * wg}
        w_desc, a_desc = descriptors(torch.zeros(bn, 4096 // 8, dtype=torch.int32),
                                     torch.zeros(4096 // 32, 1, 32, dtype=torch.bfloat16), bn, bk, bm)
        sig = dict(SIG, w_desc=mangle_type(w_desc), a_desc=mangle_type(a_desc))
        src = GluonASTSource(wna16_decode_kernel, signature=sig, constexprs=const, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4 * wg))
        ptx = k.asm["ptx"]
        Path("/tmp/gw.cubin").write_bytes(k.asm["cubin"])
        sass = subprocess.run([str(cuobjdump), "-sass", "/tmp/gw.cubin"], capture_output=True, text=True).stdout
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0]
                                  for b in re.findall(r"/\*[0-9a-f]{4}\*/\s+([^;]*);", sass))
        waits = sorted(set(re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx)))
        print(f"BM={bm} BN={bn} BK={bk} S={S} WG={wg} STREAM={stream} MODE={mode}: shared {k.metadata.shared} B, "
              f"wgmma {ptx.count('wgmma.mma_async')}, waits {waits}; "
              f"SASS {sum(ops.values())}: {ops.most_common(12)}", flush=True)


def descriptors(words, a_t, bn, bk, bm):
    """Host TMA descriptors of the code words [N, K / 8] and of ``permute_a``'s [K / 32, M, 32]."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    w_layout = gl.NVMMASharedLayout.get_default_for([bn, bk // 8], gl.int32)
    a_layout = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=16, rank=3)
    return (TensorDescriptor.from_tensor(words, [bn, bk // 8], w_layout),
            TensorDescriptor.from_tensor(a_t, [bk // 32, bm, 32], a_layout))


def permute_a(a):
    """A's columns in piece order, as [K / 32, M, 32]: element (p, m, c) is a[m, 128g + 8w + r + 4h] for the
    piece column 32p + c = 128g + 32r + 2w + h."""

    m, k = a.shape
    j = torch.arange(128, device=a.device)
    r, w, h = j // 32, (j % 32) // 2, j % 2
    src = 8 * w + r + 4 * h
    return a.reshape(m, k // 128, 128)[:, :, src].reshape(m, k // 32, 32).transpose(0, 1).contiguous()


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def run_gpu(rep: int) -> None:

    from moekit.ops.align import align
    from moekit.ops.grouped_gemm_wna16 import grouped_gemm_wna16
    from moekit.ops.heuristics import GemmConfig
    from moekit.ops.quantize_wna16 import WNA16Weight

    triton.set_allocator(_alloc)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__} triton {triton.__version__}", flush=True)

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3

    rows = []
    for gname, n, k, split in (("g1", 28672, 4096, 1), ("g2", 4096, 14336, 4), ("g2", 4096, 14336, 2)):
        torch.manual_seed(0)
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
        scales = (torch.rand(n, k // GROUP_SIZE, device=dev) * 2e-3 + 1e-3).to(torch.bfloat16)
        w_deq = ((codes.float() - 8) * scales.float().repeat_interleave(GROUP_SIZE, 1)).to(torch.bfloat16)
        c64 = codes.to(torch.int64).reshape(n, k // 8, 8)
        words64 = (c64 << (4 * torch.arange(8, device=dev))).sum(-1)
        words = torch.where(words64 >= 2**31, words64 - 2**32, words64).to(torch.int32).contiguous()
        qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # moekit's byte form of the same codes
        assert torch.equal(qweight.view(torch.int32), words)  # the kernel can read moekit's bytes as words
        wb = n * k // 2 + scales.numel() * 2
        for m in (1, 16):
            a = (torch.randn(m, k, device=dev) / 10).to(torch.bfloat16)
            a_p = permute_a(a)
            asum = a.float().reshape(m, k // GROUP_SIZE, GROUP_SIZE).sum(-1).t().contiguous()  # "fold": [K / 128, M]
            ref = a.float() @ w_deq.float().t()

            def report(name, us, got):
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                rows.append((gname, split, m, name, us, wb / us / 1e3, err))
                print(f"{gname} split {split} M={m:3d} {name:34s} {us:8.1f} us {wb / us / 1e3:7.0f} GB/s  err {err:.2e}",
                      flush=True)

            out = torch.zeros(split, m, n, device=dev)
            k_per = -(-k // split)
            for bm, bn, bk, S, wg, wait, stream in VARIANTS:
                if bm < m or k_per % bk or (stream and split > 1 and gname == "g2" and split != 4):
                    continue  # the persistent runs do not depend on the split: once per GEMM
                w_desc, a_desc = descriptors(words, a_p, bn, bk, bm)
                shared = S * (bn * bk // 2 + bm * bk * 2) + 1024
                progs = sms * max(1, min(4, (227 * 1024) // shared))
                grid = (progs,) if stream else (n // bn, split)
                for mode in MODES:
                    name = (f"gluon{['', ' nodq', ' post', ' loads', ' fold'][mode]}{' persist' if stream else ''} m{bm} n{bn} "
                            f"k{bk} s{S} wg{wg}")

                    def fn(mode=mode, stream=stream, grid=grid):
                        if stream:
                            out.zero_()  # timed: the partial sums are added into zeros
                        wna16_decode_kernel[grid](
                            w_desc, a_desc, scales, out, asum, m, n, k, k_per, scales.stride(0), out.stride(0),
                            out.stride(1), BM=bm, BN=bn, BK=bk, S=S, WG=wg, MODE=mode, WAIT=wait, STREAM=stream,
                            num_warps=4 * wg)

                    try:
                        us = bench(fn)
                        report(name, us, out[0] if stream else out.sum(0))
                        if stream and mode == 2:  # the same bits every call (at most two adds a tile)
                            first = out[0].clone()
                            for _ in range(5):
                                fn()
                            if not torch.equal(first, out[0]):
                                print(f"{name}: NOT DETERMINISTIC", flush=True)
                    except Exception as e:  # noqa: BLE001 -- a probe: report and go on
                        print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            ids = torch.zeros(m, 1, dtype=torch.int32, device=dev)
            w = WNA16Weight(qweight[None], scales[None], None, 4, GROUP_SIZE, k)
            lay = align(ids, 1, 16)
            y = torch.zeros(split, m, n, device=dev, dtype=torch.float32)
            for variant, block_n, warps, stages in (("dequant_pairs", 64, 4, 4), ("dequant_pairs", 128, 4, 4),
                                                    ("dequant_bytes", 64, 4, 4)):
                cfg = GemmConfig(block_n=block_n, block_k=256, split_k=split, num_warps=warps, num_stages=stages,
                                 variant=variant)
                fn = lambda: grouped_gemm_wna16(a, w, lay, y if split > 1 else y[0], cfg, num_rows=m)  # noqa: E731
                try:
                    report(f"moekit {variant} n{block_n}", bench(fn), y.sum(0))
                except Exception as e:  # noqa: BLE001
                    print(f"moekit {variant}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    print("\nsummary (GB/s of 4-bit codes + scales)")
    for g, sp, m, name, us, gbs, err in rows:
        print(f"{g} s{sp} M={m:3d} {name:40s} {us:8.1f} {gbs:7.0f} {err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--rep", type=int, default=50, help="do_bench_cudagraph rep (ms)")
    args = ap.parse_args()
    if args.compile_only:
        compile_only()
        return
    run_gpu(args.rep)


if __name__ == "__main__":
    sys.exit(main())
