"""Probe: 4-bit weights re-laid at load into "planes" so the codes reach Hopper's wgmma as a register operand without
a shared-memory round trip of the dequantized tile, against moekit's grouped_gemm_wna16 and its bf16 GEMM, op level.

    python3 benchmarks/probes/wna16_planes.py            (GPU; prints a table, the last lines a summary)
    python3 benchmarks/probes/wna16_planes.py --compile  (no GPU: compiles the probe kernel for sm_90, counts SASS)

Layouts (a sub-tile of SUB_K columns of one weight row, P = SUB_K / 8 int32 words):
- planes: word j holds columns t·P + j in nibble t (t = 0..7): piece t of the sub-tile is "nibble t of every word",
  an elementwise function of the loaded word tile, multiplied by the contiguous columns [t·P, (t+1)·P) of A. Every
  op between the word load and the dot is elementwise, so Triton converts the *word* tile into the MMA operand
  layout (the codes cross shared memory once, 4 bits a weight) and dequantizes in registers.
- pairs: as planes, but word (g, jj) holds pieces 4g + r (r = 0..3) of columns 2jj and 2jj + 1 in nibbles r and
  r + 4: one shift and one and-or (``lop3``) give the bf16 pair a thread holds in the operand layout.
Single expert, M rows (1, 16, 512, 4096), C = A @ W^T, symmetric codes (zero point 8), bf16 group-128 scales,
split-K partials in fp32, "fma" / "nodq" diagnostic modes. Timing: CUDA-graph replays (median). Not a test: what
it found is in docs/perf/NOTES.md ("Packed pairs"); the variant kept, ``grouped_gemm_wna16``'s "dequant_pairs",
needs no re-layout (the checkpoint's own word order pairs nibbles r and r + 4).
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

GROUP = 128


@triton.jit
def _pair_bits(b_x, SHIFT: tl.constexpr):
    # Two int32 inputs (the same word twice) -> one register holding two bf16: nibbles SHIFT/4 and SHIFT/4 + 4 of
    # the word, each OR-ed into the mantissa of 128.0 (one and-or: lop3 0xea = (a & b) | c).
    return tl.inline_asm_elementwise(
        f"{{ .reg .b32 t; shr.u32 t, $1, {SHIFT}; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea; }}",
        "=r,r,r", [b_x], dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def planes_kernel(p_a, p_w, p_s, p_c, M, N, K, k_per_split, stride_am, stride_wn, stride_sn, stride_cs, stride_cm,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, MODE: tl.constexpr,
                  SWAP: tl.constexpr = True, PREFETCH_S: tl.constexpr = False):
    P: tl.constexpr = SUB_K // 8
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    i_m = tl.program_id(2)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    k_start = i_s * k_per_split
    k_end = min(k_start + k_per_split, K)
    o_n64 = o_n.to(tl.int64)
    W: tl.constexpr = P if MODE == 0 else P // 2  # words a tile load (pairs: two loads, one per half)
    p_w_t = p_w + o_n64[:, None] * stride_wn + (k_start // 8 + tl.arange(0, W))[None, :]
    p_a_t = p_a + o_m[:, None] * stride_am + (k_start + tl.arange(0, P))[None, :]
    p_s_n = p_s + o_n64 * stride_sn
    acc_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(k_start, k_end, SUB_K):
        b_w0 = tl.load(p_w_t)
        b_w1 = tl.load(p_w_t + W)  # pairs: pieces 4-7 (planes: unused, the next sub-tile's words)
        for t in tl.static_range(8):
            if PREFETCH_S:  # one group per two pieces (SUB_K = 512): loaded once
                if t % 2 == 0:
                    b_sc = tl.load(p_s_n + (k + t * P) // 128).to(tl.bfloat16)[:, None]
            else:
                b_sc = tl.load(p_s_n + (k + t * P) // 128).to(tl.bfloat16)[:, None]  # piece t's group
            if MODE == 0:
                b_q = (((b_w0 >> (4 * t)) & 15) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            else:
                b_src = b_w0 if t < 4 else b_w1
                b_x = tl.reshape(tl.join(b_src, b_src), [BLOCK_N, P])  # word jj at columns 2jj and 2jj + 1
                b_q = _pair_bits(b_x, 0 if MODE == 3 else 4 * (t % 4))
            if MODE == 2:  # diagnostic: one FMA (not bit-exact: 136·s is rounded first)
                b_f = b_q * b_sc - 136.0 * b_sc
            elif MODE == 3:  # diagnostic: no dequantization (wrong values; the structure's own cost)
                b_f = b_q
            else:
                b_f = (b_q - 136.0) * b_sc
            b_a = tl.load(p_a_t + t * P, mask=m_m[:, None], other=0.0)
            if SWAP:
                acc_t = tl.dot(b_f, tl.trans(b_a), acc_t)
            else:
                acc = tl.dot(b_a, tl.trans(b_f), acc)
        p_w_t += P
        p_a_t += SUB_K
    if SWAP:
        acc = tl.trans(acc_t)
    tl.store(p_c + i_s * stride_cs + o_m[:, None] * stride_cm + o_n[None, :], acc, mask=m_m[:, None])


def relayout(codes: torch.Tensor, sub_k: int, mode: int) -> torch.Tensor:
    """int32 words [N, K/8] of 4-bit codes [N, K] (values 0..15) in the planes (0) or pairs (1) order."""
    n, k = codes.shape
    p = sub_k // 8
    c = codes.to(torch.int64).reshape(n, k // sub_k, 8, p)  # column t·P + j of each sub-tile
    if mode == 0:
        shifts = 4 * torch.arange(8, device=codes.device)
        words = (c.permute(0, 1, 3, 2) << shifts).sum(-1)  # [n, tiles, P]: nibble t = column t·P + j
    else:
        c = c.reshape(n, k // sub_k, 2, 4, p // 2, 2)  # g, r, jj, h
        shifts = 4 * torch.arange(4, device=codes.device)[:, None] + 16 * torch.arange(2, device=codes.device)
        words = (c.permute(0, 1, 2, 4, 3, 5) << shifts).sum((-1, -2))  # [n, tiles, 2, P/2]
    words = words.reshape(n, k // 8)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def run_planes(a, words, scales, out, mode, block_n, sub_k, split, warps, stages, block_m=16, swap=True,
               prefetch_s=False):
    m, k = a.shape
    n = words.shape[0]
    k_per_split = -(-k // (split * sub_k)) * sub_k
    grid = (n // block_n, split, -(-m // block_m))
    planes_kernel[grid](a, words, scales, out, m, n, k, k_per_split, a.stride(0), words.stride(0),
                        scales.stride(0), out.stride(0), out.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, SUB_K=sub_k,
                        MODE=mode, SWAP=swap, PREFETCH_S=prefetch_s, num_warps=warps, num_stages=stages)


def compile_only() -> None:
    """Compile for sm_90 without a GPU (``triton.compile`` on an ASTSource) and count the loop's SASS."""
    import collections
    import re
    import subprocess
    from pathlib import Path

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"p_a": "*bf16", "p_w": "*i32", "p_s": "*bf16", "p_c": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "k_per_split": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_cs": "i32",
           "stride_cm": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "SUB_K": "constexpr",
           "MODE": "constexpr"}
    names = list(sig)
    attrs = {(names.index(x),): [["tt.divisibility", 16]] for x, t in sig.items() if t != "constexpr" and x != "M"}
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    for mode in (0, 1):
        for block_n, sub_k in ((64, 256), (128, 256)):
            src = ASTSource(planes_kernel, sig, {"BLOCK_M": 16, "BLOCK_N": block_n, "SUB_K": sub_k, "MODE": mode},
                            attrs)
            out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
            Path("/tmp/planes.cubin").write_bytes(out.asm["cubin"])
            sass = subprocess.run([str(cuobjdump), "-sass", "/tmp/planes.cubin"], capture_output=True,
                                  text=True).stdout
            ins = [(int(a, 16), b) for a, b in re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", sass)]
            loop = max(((int(re.search(r"BRA 0x([0-9a-f]+)", b).group(1), 16), a) for a, b in ins
                        if re.search(r"BRA 0x", b)), key=lambda r: r[1] - r[0])
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0]
                                      for a, b in ins if loop[0] <= a <= loop[1])
            per = sum(ops.values()) / (block_n * sub_k / 128)
            print(f"mode {mode} {block_n}x{sub_k}: loop {sum(ops.values())} instr, {per:.2f} a weight a thread; "
                  f"dot_op loads {out.asm['ttgir'].count('local_load')}, {ops.most_common(10)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if args.compile:
        compile_only()
        return
    from moekit.ops.align import align
    from moekit.ops.grouped_gemm import grouped_gemm
    from moekit.ops.grouped_gemm_wna16 import grouped_gemm_wna16
    from moekit.ops.heuristics import GemmConfig
    from moekit.ops.quantize_wna16 import WNA16Weight

    dev = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    rows = []

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3

    for gname, n, k, split in (("g1", 28672, 4096, 1), ("g2", 4096, 14336, 4)):
        torch.manual_seed(0)
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
        scales = (torch.rand(n, k // GROUP, device=dev) * 2e-3 + 1e-3).to(torch.bfloat16)
        w_deq = ((codes.float() - 8) * scales.float().repeat_interleave(GROUP, 1)).to(torch.bfloat16)
        qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        wb = (n * k // 2 + scales.numel() * 2)
        for m in (1, 16, 512, 4096):
            a = (torch.randn(m, k, device=dev) / 10).to(torch.bfloat16)
            ref = a.float() @ w_deq.float().t()
            sp = split if m <= 16 else 1
            out = torch.zeros(sp, m, n, device=dev)

            def report(name, us, got):
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                rows.append((gname, m, name, us, wb / us / 1e3, err))
                print(f"{gname} M={m:3d} {name:34s} {us:8.1f} us {wb / us / 1e3:7.0f} GB/s  err {err:.2e}", flush=True)

            if m <= 16:
                cands = [(1, 64, 512, 4, 3, 16, True, False), (1, 64, 512, 4, 3, 16, True, True),
                         (1, 64, 512, 4, 4, 16, True, True), (1, 64, 512, 8, 3, 16, True, True),
                         (1, 32, 512, 2, 3, 16, True, True), (1, 32, 512, 2, 4, 16, True, True),
                         (1, 64, 512, 4, 3, 16, False, True)]
            else:
                cands = [(1, 128, 256, 8, 3, 128, False, False), (1, 128, 512, 8, 3, 128, False, True),
                         (1, 256, 256, 8, 3, 128, False, False), (1, 128, 256, 4, 3, 64, False, False),
                         (1, 128, 512, 8, 3, 128, True, True)]
            for mode, block_n, sub_k, warps, stages, block_m, swap, pre in cands:
                words = relayout(codes, sub_k, min(mode, 1))
                name = (f"{['planes', 'pairs', 'pairs fma', 'pairs nodq'][mode]}{'' if swap else ' noswap'}"
                        f"{' pre' if pre else ''} m{block_m} n{block_n} k{sub_k} w{warps} s{stages}")
                try:
                    fn = lambda: run_planes(a, words, scales, out, mode, block_n, sub_k, sp, warps, stages, block_m,
                                            swap, pre)
                    us = bench(fn)
                    report(name, us, out.sum(0))
                except Exception as e:
                    print(f"{gname} M={m} {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            # moekit today: one expert, all rows routed to it
            ids = torch.zeros(m, 1, dtype=torch.int32, device=dev)
            w = WNA16Weight(qweight[None], scales[None], None, 4, GROUP, k)
            block_m = 16 if m <= 16 else 128
            mk = ((("dequant_split", 64, 256, 4, 4), ("dequant_split", 128, 256, 4, 4)) if m <= 16
                  else (("dequant", 128, 64, 8, 3),))
            for variant, block_n, bk, warps, stages in mk:
                lay = align(ids, 1, block_m)
                y = torch.zeros(sp, m, n, device=dev, dtype=torch.float32)
                cfg = GemmConfig(block_n=block_n, block_k=bk, split_k=sp, num_warps=warps, num_stages=stages,
                                 variant=variant)
                fn = lambda: grouped_gemm_wna16(a, w, lay, y if sp > 1 else y[0], cfg, num_rows=m)
                try:
                    report(f"moekit {variant} n{block_n}", bench(fn), y.sum(0))
                except Exception as e:
                    print(f"moekit {variant}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            lay = align(ids, 1, block_m)
            y = torch.zeros(sp, m, n, device=dev, dtype=torch.float32)
            cfg = (GemmConfig(block_n=64, block_k=128, split_k=sp, num_warps=4, num_stages=4) if m <= 16 else
                   GemmConfig(block_n=256, block_k=64, num_warps=8, num_stages=3))
            fn = lambda: grouped_gemm(a, w_deq[None], lay, y if sp > 1 else y[0], cfg, num_rows=m)
            us = bench(fn)
            report("moekit bf16 (4x the bytes)", us, y.sum(0))
    print("\nsummary (GB/s of 4-bit codes + scales; bf16 row: its own bytes are 4x)")
    for g, m, name, us, gbs, err in rows:
        print(f"{g} M={m:3d} {name:34s} {us:8.1f} {gbs:7.0f} {err:.1e}")


if __name__ == "__main__":
    sys.exit(main())
