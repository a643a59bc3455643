"""The multi-process harness of the distributed tests: start each world once per test module, run every case
inside the ranks, and report per case back to pytest (process start dominates on 2 cores: cases are cheap,
spawns are not)."""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def init_rank(rank: int, world: int, port: int, backend: str, timeout_s: int) -> str:
    """Join the group (gloo on the CPU, or NCCL on GPU ``rank``); returns the rank's device."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    # A rank that fails between collectives leaves the others waiting: a short timeout turns that into an error.
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def run_cases(cases: Iterable[tuple[str, Callable[[], None]]], rank: int, out_dir: str) -> None:
    """Run each case, record its traceback (or None), keep the ranks in step with a barrier after each, write
    ``rank<r>.json`` and leave the group. Every case ends collectively, so a failing one does not desync."""
    results: dict[str, str | None] = {}
    try:
        for name, case in cases:
            try:
                case()
                results[name] = None
            except Exception:  # reported per case
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def spawn(worker: Callable, world: int, out_dir: Path, *args) -> dict[int, dict[str, str | None]]:
    """``worker(rank, world, port, str(out_dir), *args)`` on ``world`` processes; each rank's results."""
    mp.spawn(worker, args=(world, free_port(), str(out_dir), *args), nprocs=world)
    return {r: json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)}


def failures(results: dict[int, dict[str, str | None]], case: str) -> str:
    """The tracebacks of ``case`` on every rank where it failed or did not run ('' when it passed everywhere)."""
    failed = {rank: res.get(case, "not run") for rank, res in results.items() if res.get(case, "not run")}
    return "\n".join(f"rank {r}:\n{err}" for r, err in failed.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
