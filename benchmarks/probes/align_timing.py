"""Probe: the align launch at decode sizes on one GPU, for warp counts and one-hot tile sizes.

    python3 benchmarks/probes/align_timing.py

A single program does the whole job at decode sizes (SINGLE); with many experts its [BLOCK_R, BLOCK_E] one-hot
tiles are large for one program of 4 warps. Prints µs (CUDA-graph replays, median) per (E, N, M) and variant,
after checking each variant against align_ref. Not a unit test; findings go to moekit/ops/align.py.
"""

import torch
from triton.testing import do_bench

from moekit.ops import align as align_mod
from moekit.ops.align import align, align_ref

CASES = [(128, 128, 16), (128, 512, 16), (128, 2048, 32), (64, 128, 16), (256, 128, 16), (256, 512, 16),
         (256, 2048, 16), (8, 128, 32), (8, 512, 64)]
VARIANTS = {f"w{w}_oh{oh}": (w, oh) for w in (4, 8, 16) for oh in (4096, 8192, 16384)}

print(f"card: {torch.cuda.get_device_name()}")
real_warps, real_oh = align_mod._scatter_warps, align_mod._ONEHOT_ELEMS
print(f"{'E':>4s} {'N':>5s} {'M':>3s} " + " ".join(f"{n:>11s}" for n in VARIANTS))
for e, n, m in CASES:
    ids = torch.stack([torch.randperm(e, device="cuda")[: min(8, e)] for _ in range(-(-n // min(8, e)))])
    ids = ids.reshape(-1)[:n].reshape(-1, 1).int()
    want = align_ref(ids.cpu(), e, m)
    row = []
    for name, (w, oh) in VARIANTS.items():
        align_mod._scatter_warps = lambda single, block_e, _w=w: _w
        align_mod._ONEHOT_ELEMS = oh
        got = align(ids, e, m)
        ok = (torch.equal(got.sorted_ids.cpu(), want.sorted_ids) and torch.equal(got.expert_ids.cpu(), want.expert_ids)
              and torch.equal(got.num_padded.cpu(), want.num_padded))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(10):
                align(ids, e, m)
        us = do_bench(g.replay, warmup=25, rep=100, return_mode="median") * 1e3 / 10
        row.append(f"{us:10.1f}{'' if ok else '!'}")
    align_mod._scatter_warps, align_mod._ONEHOT_ELEMS = real_warps, real_oh
    print(f"{e:4d} {n:5d} {m:3d} " + " ".join(row), flush=True)
