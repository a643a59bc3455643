"""moekit.checkpoint: which shard file holds each key."""

from __future__ import annotations

import re

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from moekit.checkpoint import Checkpoint  # noqa: E402


def test_directory_without_index_maps_each_key_to_its_shard(tmp_path):
    safetensors_torch.save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    safetensors_torch.save_file({"b": torch.ones(3)}, tmp_path / "model-00002-of-00002.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert sorted(ckpt.keys()) == ["a", "b"] and ckpt.shape("b") == (3,)
    assert torch.equal(ckpt.get("b"), torch.ones(3))


def test_key_in_two_shards_without_index_is_refused(tmp_path):
    # Without an index nothing says which copy is the model's: the sorted-last shard used to win silently.
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(2), "x": torch.zeros(1)}, first)
    safetensors_torch.save_file({"w": torch.ones(2)}, second)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint key 'w': stored in two shards, {first} and {second}")):
        Checkpoint(tmp_path)
