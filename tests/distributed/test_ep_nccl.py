"""The expert-parallel cases of test_ep_layer.py on NCCL, one rank per GPU (2 to 4 GPUs): every rank's output
equals the single-process layer on its GPU, the collective count is the documented one, and a layer captured
in a CUDA graph replays to the eager result."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.test_ep_layer import CASES, _free_port, _worker

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    found = torch.cuda.device_count()
    if found < 2:
        pytest.skip(f"needs 2 GPUs, found {found}")
    world = 4 if found >= 4 else 2  # the cases' TP 2 layouts need an even world
    out_dir = tmp_path_factory.mktemp("ep_nccl")
    mp.spawn(_worker, args=(world, _free_port(), str(out_dir), "nccl"), nprocs=world)
    return {r: json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)}


@pytest.mark.parametrize("case", [*CASES, "collective_counts", "cuda_graph"])
def test_expert_parallel_nccl(results, case):
    failures = {rank: res.get(case, "not run") for rank, res in results.items() if res.get(case, "not run")}
    assert not failures, "\n".join(f"rank {r}:\n{err}" for r, err in failures.items())
