"""The expert-parallel cases of test_ep_layer.py on NCCL, one rank per GPU (2 to 4 GPUs): every rank's output
equals the single-process layer on its GPU, the collective count is the documented one, and a layer captured
in a CUDA graph replays to the eager result."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.ranks import failures, spawn
from tests.distributed.test_ep_layer import CASES, _worker

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    found = torch.cuda.device_count()
    if found < 2:
        pytest.skip(f"needs 2 GPUs, found {found}")
    world = 4 if found >= 4 else 2  # the cases' TP 2 layouts need an even world
    return spawn(_worker, world, tmp_path_factory.mktemp("ep_nccl"), "nccl")


@pytest.mark.parametrize("case", [*CASES, "collective_counts", "all_to_all_traffic", "cuda_graph"])
def test_expert_parallel_nccl(results, case):
    failed = failures(results, case)
    assert not failed, failed
