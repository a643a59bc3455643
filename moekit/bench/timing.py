"""Timing as MEASURING.md prescribes: medians, warm-up first, CUDA-graph replays for decode-sized calls.

On CPU the variants of one point are timed together, in interleaved rounds (``time_cpu``): a CPU shared with
other processes slows every call of a stretch of time alike, so calls of each variant taken in the same rounds
see the same machine, and their ratio holds where absolute times do not (a T = 1 call was seen at 6.6 ms in one
run and 128 ms in the next). Each variant reports its median, its minimum and the spread of its rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

# A spread (interquartile range / median) above this means the machine was not quiet during the rounds.
NOISY_SPREAD = 0.10
CPU_BUDGET_S = 2.0  # time one point's rounds may take, all variants together (after warm-up)
CPU_MIN_ROUNDS = 5  # taken even past the budget: fewer samples have no meaningful spread
CPU_MAX_ROUNDS = 50


@dataclass(frozen=True)
class Timing:
    """One variant's latency over ``rounds`` calls, in microseconds. ``spread`` is the interquartile range over
    the median (0.1: the middle half of the calls lies within 10% of the median's size)."""

    median_us: float
    min_us: float
    spread: float
    rounds: int


def time_us(fn: Callable[[], object], device: torch.device, *, graph: bool) -> float:
    """Median latency of ``fn`` in microseconds. ``graph``: capture once, time the replays (CUDA only)."""
    if device.type != "cuda":
        return time_cpu({"fn": fn})["fn"].median_us
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


def time_cpu(
    fns: Mapping[str, Callable[[], object]],
    *,
    budget_s: float = CPU_BUDGET_S,
    min_rounds: int = CPU_MIN_ROUNDS,
    max_rounds: int = CPU_MAX_ROUNDS,
) -> dict[str, Timing]:
    """Time each of ``fns`` on the CPU: one warm-up call each, then rounds that call every one once, in turn,
    until ``budget_s`` has passed (at least ``min_rounds``, at most ``max_rounds``)."""
    if not fns:
        raise ValueError("fns: expected at least one function to time, got none")
    if not 1 <= min_rounds <= max_rounds:
        raise ValueError(f"min_rounds, max_rounds: expected 1 <= min_rounds <= max_rounds, got {min_rounds}, "
                         f"{max_rounds}")
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() < deadline):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: _summary(ts) for name, ts in samples.items()}


def _summary(seconds: list[float]) -> Timing:
    us = [s * 1e6 for s in seconds]
    median = statistics.median(us)
    if len(us) > 1:
        q1, _, q3 = statistics.quantiles(us, n=4, method="inclusive")
        spread = (q3 - q1) / median if median > 0 else 0.0
    else:
        spread = 0.0
    return Timing(median_us=median, min_us=min(us), spread=spread, rounds=len(us))
