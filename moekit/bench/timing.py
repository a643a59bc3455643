"""Timing as MEASURING.md prescribes: medians, warm-up first, CUDA-graph replays for decode-sized calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_us(fn: Callable[[], object], device: torch.device, *, graph: bool) -> float:
    """Median latency of ``fn`` in microseconds. ``graph``: capture once, time the replays (CUDA only)."""
    if device.type != "cuda":
        return _cpu_median_us(fn)
    from triton.testing import do_bench

    if not graph:
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, workspace allocation) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=25, rep=100, return_mode="median") * 1e3


def _cpu_median_us(fn: Callable[[], object], budget_s: float = 0.5) -> float:
    fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6
