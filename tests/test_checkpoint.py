"""moekit.checkpoint: which shard file holds each key."""

from __future__ import annotations

import json
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


def test_model_safetensors_wins_over_a_stale_index(tmp_path):
    # transformers reads model.safetensors before an index: save_pretrained(d, max_shard_size=...) and then
    # save_pretrained(d) leaves the old index and shards beside the new single file.
    safetensors_torch.save_file({"w": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    safetensors_torch.save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    assert torch.equal(Checkpoint(tmp_path).get("w"), torch.ones(2))


def _indexed(tmp_path, weight_map):
    safetensors_torch.save_file({"a": torch.zeros(2)}, tmp_path / "a.safetensors")
    safetensors_torch.save_file({"b": torch.zeros(2)}, tmp_path / "b.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path / "model.safetensors.index.json"


@pytest.mark.parametrize("entry", [3, None, ""])
def test_index_entry_that_is_no_file_name_is_refused(tmp_path, entry):
    index = _indexed(tmp_path, {"a": "a.safetensors", "b": entry})
    with pytest.raises(ValueError, match=re.escape(f"checkpoint index {index}: weight_map['b']: expected a shard "
                                                   f"file name, got {entry!r}")):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("entry", ["../a.safetensors", "/etc/a.safetensors", "sub/../../a.safetensors"])
def test_index_entry_outside_the_checkpoint_is_refused(tmp_path, entry):
    root = tmp_path / "ckpt"
    root.mkdir()
    index = _indexed(root, {"a": entry, "b": "b.safetensors"})
    with pytest.raises(ValueError, match=re.escape(f"weight_map['a']: expected a shard file in {root}, got "
                                                   f"{entry!r}")):
        Checkpoint(root)


def test_index_shards_may_be_symlinks_out_of_the_checkpoint(tmp_path):
    # The Hugging Face cache: snapshots/<rev>/model-*.safetensors are symlinks into ../../blobs.
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    safetensors_torch.save_file({"a": torch.ones(2)}, blobs / "h1")
    (snap / "a.safetensors").symlink_to(blobs / "h1")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "a.safetensors"}}))
    assert torch.equal(Checkpoint(snap).get("a"), torch.ones(2))


def test_index_pointing_at_the_wrong_shard_names_key_shard_and_index(tmp_path):
    index = _indexed(tmp_path, {"a": "a.safetensors", "b": "a.safetensors"})  # b lives in b.safetensors
    ckpt = Checkpoint(tmp_path)
    where = re.escape(f"checkpoint key 'b' (shard {tmp_path / 'a.safetensors'}, named by {index}): ")
    for read in (ckpt.get, ckpt.shape, ckpt.dtype):
        with pytest.raises(ValueError, match=where):
            read("b")
    (tmp_path / "a.safetensors").unlink()  # a shard the index names that is gone
    with pytest.raises(FileNotFoundError, match=where + "checkpoint file .*: not found"):
        Checkpoint(tmp_path).get("b")
