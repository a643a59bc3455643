"""Probe: what a chain of dependent kernel launches costs on its own, timed the way ``moekit bench`` times a layer
(a CUDA graph of 4 calls replayed, per-call median), so a decode cell's fixed cost can be set beside its floor.

    PYTHONPATH=. python3 benchmarks/probes/launch_floor.py [--grid 132] [--max-chain 6]

Each "kernel" is a Triton program per grid slot that loads and stores one int32 (no work to speak of); a chain of n
launches is what a layer of n kernels pays before it moves a byte: launch gaps, ramps and tails. Prints µs per
call for chains of 1..max-chain kernels, with one program and with a full grid.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl


@triton.jit
def _touch(p):
    i = tl.program_id(0)
    tl.store(p + i, tl.load(p + i) + 1)


def _time_chain(n: int, grid: int, buf: torch.Tensor, calls: int = 4, reps: int = 200) -> float:
    def chain():
        for _ in range(n):
            _touch[(grid,)](buf)

    chain()  # compile, warm
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            chain()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=0, help="programs of the full-grid rows (default: the SM count)")
    ap.add_argument("--max-chain", type=int, default=6)
    args = ap.parse_args()
    grid = args.grid or torch.cuda.get_device_properties(0).multi_processor_count
    buf = torch.zeros(max(grid, 1), dtype=torch.int32, device="cuda")
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__} triton {triton.__version__}")
    print(f"{'kernels':>8s} {'1 program (us)':>15s} {f'{grid} programs (us)':>18s}")
    for n in range(1, args.max_chain + 1):
        print(f"{n:8d} {_time_chain(n, 1, buf):15.2f} {_time_chain(n, grid, buf):18.2f}", flush=True)


if __name__ == "__main__":
    main()
