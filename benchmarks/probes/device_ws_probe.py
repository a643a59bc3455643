"""On a GPU: does Triton's Hopper warp specialization (TMA loads) beat the pointer-gather grouped GEMM?

    PYTHONPATH=. python3 benchmarks/probes/device_ws_probe.py             # every variant, each in a subprocess
    PYTHONPATH=. python3 benchmarks/probes/device_ws_probe.py --one NAME  # one variant (what the driver runs)

Problems: a plain 8192^3 bf16 matmul, and the GEMM1 / GEMM2 stages of mixtral-8x7b T=1024 and qwen3-30b-a3b
T=4096 on a real routing's padded layout. Variants:
  ours      the committed kernel (A rows gathered by pointer, B by pointer), heuristic config
  tma       A and B through device-side tensor descriptors (A pre-sorted into the padded layout: the GEMM2 case
            if GEMM1 wrote its output in slot order), no warp specialization
  tma_ws    the same with warp_specialize=True on the K loop
  gA_ws     A gathered by pointer, B through a descriptor, warp_specialize=True
  gA        the same without warp specialization
Each variant runs in a subprocess with a time limit: a compile hang costs only that variant. GEMMs here write
no activation (GEMM1 outputs the 2I pre-activation columns) so every variant does the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import triton
import triton.language as tl

TILES = {  # variant suffix: (BM, BN, BK, stages, warps)
    "": (128, 256, 64, 3, 8),
    "_n128": (128, 128, 64, 4, 8),
    "_s3": (128, 256, 64, 3, 8),
    "_s4": (128, 256, 64, 4, 8),
    "_n128s6": (128, 128, 64, 6, 8),
}
CELLS = {  # name: (E, H, I, K, T)
    "mixtral-1024": (8, 4096, 14336, 2, 1024),
    "qwen3-4096": (128, 2048, 768, 8, 4096),
}


@triton.jit
def _mm_kernel(p_a, p_b, p_c, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               WS: tl.constexpr):
    a_desc = tl.make_tensor_descriptor(p_a, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(p_b, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = 8 * num_n
    first_m = (pid // group) * 8
    gm = min(num_m - first_m, 8)
    i_m = first_m + (pid % group) % gm
    i_n = (pid % group) // gm
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), warp_specialize=WS):
        a = a_desc.load([i_m * BM, k * BK])
        b = b_desc.load([i_n * BN, k * BK])
        acc = tl.dot(a, b.T, acc)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    tl.store(p_c + o_m[:, None].to(tl.int64) * N + o_n[None, :], acc.to(tl.bfloat16))


@triton.jit
def _gmm_kernel(p_a, p_b, p_c, p_sorted, p_experts, P, N, K, E, num_rows, a_row_div,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GATHER: tl.constexpr, WS: tl.constexpr):
    """C[slot] = A[slot or gathered row] @ B[e].T over the padded layout; C in slot order [P, N]."""
    b_desc = tl.make_tensor_descriptor(p_b, shape=[E * N, K], strides=[K, 1], block_shape=[BN, BK])
    pid = tl.program_id(0)
    num_m = P // BM
    num_n = tl.cdiv(N, BN)
    group = 8 * num_n
    first_m = (pid // group) * 8
    gm = min(num_m - first_m, 8)
    i_m = first_m + (pid % group) % gm
    i_n = (pid % group) // gm
    i_e = tl.maximum(tl.load(p_experts + i_m), 0)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if GATHER:
        rows = tl.load(p_sorted + i_m * BM + tl.arange(0, BM))
        m_rows = rows < num_rows
        p_a_tile = p_a + ((rows // a_row_div).to(tl.int64) * K)[:, None] + tl.arange(0, BK)[None, :]
        for k in tl.range(0, tl.cdiv(K, BK), warp_specialize=WS):
            a = tl.load(p_a_tile + k * BK, mask=m_rows[:, None], other=0.0)
            b = b_desc.load([i_e * N + i_n * BN, k * BK])
            acc = tl.dot(a, b.T, acc)
    else:
        a_desc = tl.make_tensor_descriptor(p_a, shape=[P, K], strides=[K, 1], block_shape=[BM, BK])
        for k in tl.range(0, tl.cdiv(K, BK), warp_specialize=WS):
            a = a_desc.load([i_m * BM, k * BK])
            b = b_desc.load([i_e * N + i_n * BN, k * BK])
            acc = tl.dot(a, b.T, acc)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    tl.store(p_c + o_m[:, None].to(tl.int64) * N + o_n[None, :], acc.to(tl.bfloat16), mask=(o_n < N)[None, :])


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def run_one(name: str) -> dict:
    from moekit.ops.align import align
    from moekit.ops.grouped_gemm import grouped_gemm
    from moekit.ops.heuristics import GemmConfig, MoEShape, heuristic_config
    from moekit.router import select_experts

    triton.set_allocator(_alloc)
    base, suffix = (name.split("@") + [""])[:2]
    BM, BN, BK, stages, warps = TILES[suffix]
    torch.manual_seed(0)
    res = {}
    # Plain matmul (descriptor variants only).
    if base in ("tma", "tma_ws"):
        n = 8192
        a = torch.randn(n, n, device="cuda").bfloat16()
        b = torch.randn(n, n, device="cuda").bfloat16()
        c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        grid = (triton.cdiv(n, BM) * triton.cdiv(n, BN),)
        f = lambda: _mm_kernel[grid](a, b, c, n, n, n, BM=BM, BN=BN, BK=BK, WS=base == "tma_ws",  
                                     num_stages=stages, num_warps=warps)
        f()
        ref = a.float() @ b.float().T
        err = float((c.float() - ref).norm() / ref.norm())
        us = triton.testing.do_bench(f, return_mode="median") * 1e3
        res["matmul8192"] = dict(us=us, tflops=2 * n**3 / us / 1e6, err=err)
        del a, b, c, ref
    if base == "cublas":
        n = 8192
        a = torch.randn(n, n, device="cuda").bfloat16()
        b = torch.randn(n, n, device="cuda").bfloat16()
        us = triton.testing.do_bench(lambda: a @ b.T, return_mode="median") * 1e3
        res["matmul8192"] = dict(us=us, tflops=2 * n**3 / us / 1e6, err=0.0)
        return res
    if base == "vendor":
        return run_vendor()
    for cell, (E, H, I, K, T) in CELLS.items():
        x = torch.randn(T, H, device="cuda").bfloat16()
        w13 = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).bfloat16()
        w2 = (torch.randn(E, H, I, device="cuda") * I**-0.5).bfloat16()
        _, ids = select_experts(torch.randn(T, E, device="cuda"), K, renormalize=True)
        N = T * K
        shape = MoEShape(num_tokens=T, top_k=K, num_experts=E, hidden=H, inter=I,
                         num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
        cfg = heuristic_config(shape)
        lay = align(ids, E, cfg.block_m)
        P = int(lay.num_padded.item())
        # BM of the TMA tile must equal the layout's block: use the layout's block_m.
        bm = cfg.block_m
        sorted_ids = lay.sorted_ids[:P].long()
        h1 = torch.randn(N, I, device="cuda").bfloat16()  # GEMM2's input rows (routed-row order)
        for gemm, (A_rows, B, div) in {"g1": (x, w13, K), "g2": (h1, w2, 1)}.items():
            n_out, k_dim = B.shape[1], B.shape[2]
            valid = sorted_ids < N
            A_sorted = torch.zeros(P, k_dim, device="cuda", dtype=torch.bfloat16)
            A_sorted[valid] = A_rows[sorted_ids[valid] // div]
            ref_blk = 0
            e0 = int(lay.expert_ids[ref_blk])
            ref = A_sorted[:bm].float() @ B[e0].float().T
            full_ref = None
            if base != "ours":  # every block: schedules that walk tiles differently must still cover them all
                eids = lay.expert_ids[: P // bm].tolist()
                full_ref = torch.cat([A_sorted[i * bm:(i + 1) * bm] @ B[e].T for i, e in enumerate(eids)])
            key = f"{cell}:{gemm}"
            if base == "ours":
                gc = cfg.gemm1 if gemm == "g1" else cfg.gemm2
                gc = GemmConfig(**{**gc.__dict__, "split_k": 1})
                out = torch.empty(N, n_out, device="cuda", dtype=torch.bfloat16)
                f = lambda A_rows=A_rows, B=B, out=out, gc=gc, div=div, lay=lay, N=N: grouped_gemm(
                    A_rows, B, lay, out, gc, num_rows=N, a_row_div=div)
                f()
                rows0 = sorted_ids[:bm]
                got = torch.zeros(bm, n_out, device="cuda")
                got[rows0 < N] = out[rows0[rows0 < N]].float()
                ref = ref * (rows0 < N)[:, None]
                res_cfg = gc.__dict__
            elif base in ("gluonp", "gluonh"):
                from gluon_gemm_probe import gluon_gmm_halves_kernel, gluon_gmm_persistent_kernel

                kern = gluon_gmm_halves_kernel if base == "gluonh" else gluon_gmm_persistent_kernel
                nw = 4 if base == "gluonh" else 8

                c = torch.empty(P, n_out, device="cuda", dtype=torch.bfloat16)
                sms = torch.cuda.get_device_properties(0).multi_processor_count
                tiles = P // bm * triton.cdiv(n_out, BN)
                progs = min(sms, tiles)
                f = lambda A_rows=A_rows, B=B, c=c, div=div, n_out=n_out, k_dim=k_dim, lay=lay, P=P, N=N, E=E, bm=bm, \
                    progs=progs, kern=kern, nw=nw: kern[
                    (progs,)](A_rows, B, c, lay.sorted_ids, lay.expert_ids, P // bm, N, div, n_out, k_dim, n_out, E,
                              A_rows.stride(0), progs, BM=bm, BN=BN, BK=BK, S=stages, LAG=stages - 2, GROUP_M=8,
                              num_warps=nw, maxnreg=168)
                f()
                torch.cuda.synchronize()
                got = c[:bm].float()
                res_cfg = dict(BM=bm, BN=BN, BK=BK, stages=stages, warps=warps, persistent=progs)
            elif base in ("gluon", "gluonsplit"):
                from gluon_gemm_probe import gluon_gmm_kernel

                c = torch.empty(P, n_out, device="cuda", dtype=torch.bfloat16)
                grid = (P // bm * triton.cdiv(n_out, BN),)
                f = lambda A_rows=A_rows, B=B, c=c, div=div, n_out=n_out, k_dim=k_dim, lay=lay, P=P, N=N, E=E, bm=bm, \
                    grid=grid: gluon_gmm_kernel[grid](
                    A_rows, B, c, lay.sorted_ids, lay.expert_ids, P // bm, N, div, n_out, k_dim, n_out, E,
                    A_rows.stride(0), BM=bm, BN=BN, BK=BK, S=stages, LAG=stages - 2, GROUP_M=8,
                    SPLIT_B=base == "gluonsplit", num_warps=8,
                    maxnreg=168)
                f()
                torch.cuda.synchronize()
                got = c[:bm].float()
                res_cfg = dict(BM=bm, BN=BN, BK=BK, stages=stages, warps=warps)
            else:
                c = torch.empty(P, n_out, device="cuda", dtype=torch.bfloat16)
                gather = base.startswith("gA")
                ws = base.endswith("_ws")
                grid = (P // bm * triton.cdiv(n_out, BN),)
                f = lambda A_rows=A_rows, A_sorted=A_sorted, B=B, c=c, div=div, gather=gather, ws=ws, \
                    n_out=n_out, k_dim=k_dim, lay=lay, P=P, N=N, E=E, bm=bm, grid=grid: _gmm_kernel[grid](
                        A_rows if gather else A_sorted, B, c, lay.sorted_ids, lay.expert_ids, P, n_out, k_dim, E,
                        N, div, BM=bm, BN=BN, BK=BK, GATHER=gather, WS=ws, num_stages=stages, num_warps=warps)
                f()
                got = c[:bm].float()
                res_cfg = dict(BM=bm, BN=BN, BK=BK, stages=stages, warps=warps)
            m0 = (sorted_ids[:bm] < N)[:, None]
            err = float(((got - ref) * m0).norm() / (ref * m0).norm().clamp_min(1e-6))
            if full_ref is not None:
                vm = sorted_ids < N  # padding slots may be left unwritten
                err = max(err, float((c[vm].float() - full_ref[vm].float()).norm() / full_ref[vm].float().norm()))
            us = triton.testing.do_bench(f, return_mode="median") * 1e3
            flops = 2 * N * n_out * k_dim
            res[key] = dict(us=us, tflops=flops / us / 1e6, err=err, cfg=res_cfg, padded=P / N)
            print(name, key, f"{us:.1f} us {flops / us / 1e6:.0f} TF/s err {err:.1e}", flush=True)
        # What pre-sorting A costs (the gather a slot-order layout would add for GEMM1).
        if base == "ours":
            src = sorted_ids.clamp_max(N - 1) // K
            us_g = triton.testing.do_bench(lambda x=x, src=src: x.index_select(0, src), return_mode="median") * 1e3
            res[f"{cell}:gather_x"] = dict(us=us_g, tflops=0.0, err=0.0)
        del x, w13, w2, h1
        torch.cuda.empty_cache()
    return res


def run_vendor() -> dict:
    """The same two GEMMs through cuBLAS / CUTLASS: ``torch.bmm`` with every expert given exactly N/E rows (perfect
    balance, no padding: the best case any grouped kernel could see) and ``torch._grouped_mm`` on the real routing's
    per-expert row counts (rows pre-sorted, no gather)."""
    from moekit.router import select_experts

    torch.manual_seed(0)
    res = {}
    for cell, (E, H, I, K, T) in CELLS.items():
        N = T * K
        w13 = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).bfloat16()
        w2 = (torch.randn(E, H, I, device="cuda") * I**-0.5).bfloat16()
        _, ids = select_experts(torch.randn(T, E, device="cuda"), K, renormalize=True)
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        for gemm, B in (("g1", w13), ("g2", w2)):
            n_out, k_dim = B.shape[1], B.shape[2]
            flops = 2 * N * n_out * k_dim
            a_bal = torch.randn(E, N // E, k_dim, device="cuda").bfloat16()
            bt = B.transpose(1, 2)
            us = triton.testing.do_bench(lambda a_bal=a_bal, bt=bt: torch.bmm(a_bal, bt), return_mode="median") * 1e3
            res[f"{cell}:{gemm}:bmm"] = dict(us=us, tflops=flops / us / 1e6, err=0.0)
            a = torch.randn(N, k_dim, device="cuda").bfloat16()
            try:
                us = triton.testing.do_bench(lambda a=a, bt=bt, offs=offs: torch._grouped_mm(a, bt, offs=offs),
                                             return_mode="median") * 1e3
                res[f"{cell}:{gemm}:gmm"] = dict(us=us, tflops=flops / us / 1e6, err=0.0)
            except Exception as exc:  # noqa: BLE001
                print("grouped_mm failed", cell, gemm, exc, flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", default="")
    ap.add_argument("--variants", default="ours,gluon@_s4,gluonp@_s4,gluonh@_s3")
    ap.add_argument("--timeout", type=int, default=150)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one)), flush=True)
        return
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    table = {}
    for v in args.variants.split(","):
        try:
            p = subprocess.run([sys.executable, __file__, "--one", v], capture_output=True, text=True,
                               timeout=args.timeout, env=os.environ)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                table[v] = json.loads(lines[-1][7:])
            else:
                table[v] = {"error": (p.stderr or p.stdout)[-600:]}
        except subprocess.TimeoutExpired:
            table[v] = {"error": f"timeout {args.timeout}s"}
        print(v, json.dumps(table[v])[:400], flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "ws_probe.json"), "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(), table=table), f, indent=1)
    keys = sorted({k for r in table.values() for k in r if k != "error"})
    print("\nvariant        " + " ".join(f"{k:>18s}" for k in keys))
    for v, r in table.items():
        if "error" in r:
            print(f"{v:14s} ERROR {r['error'][-200:]!r}")
            continue
        print(f"{v:14s} " + " ".join(f"{r[k]['us']:9.1f}us {r[k]['tflops']:4.0f}T" if k in r else " " * 18
                                     for k in keys))


if __name__ == "__main__":
    main()
