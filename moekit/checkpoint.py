"""Safetensors checkpoints read lazily, one tensor at a time: a file, or a directory of shards (with or without
``model.safetensors.index.json``). ``moekit.loading.load_moe`` reads MoE blocks through it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from moekit.families import read_json

# Stored dtypes that are quantization codes, not values: they load only into codes of their own dtype.
CODE_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "I8": torch.int8}


class Checkpoint:
    """Lazy, read-only view of a safetensors checkpoint: a file, or a directory of ``*.safetensors`` shards.

    A directory is read in transformers' order (``from_pretrained``): its ``model.safetensors`` when there is one
    (a ``model.safetensors.index.json`` beside it is then a stale leftover: ``save_pretrained`` into a directory
    that held a sharded save keeps the old index), else the shards its ``model.safetensors.index.json``
    (``weight_map``: key -> shard file) names, else every ``*.safetensors`` shard, whose headers are read (a key
    stored in two shards is then refused). Tensors are read one at a time with ``get``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._index: Path | None = None  # the index that named each key's shard, for error messages
        single = self.path / "model.safetensors"
        index = self.path / "model.safetensors.index.json"
        if self.path.is_file():
            self._files = {k: self.path for k in _header_keys(self.path)}
        elif single.is_file():
            self._files = {k: single for k in _header_keys(single)}
        elif index.is_file():
            self._index = index
            self._files = _index_map(index)
        elif self.path.is_dir():
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"path: no *.safetensors files in {self.path}")
            self._files = _shard_map(shards)
        else:
            raise FileNotFoundError(f"path: {self.path} is neither a .safetensors file nor a directory")
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._read(key, lambda f: f.get_slice(key).get_shape()))

    def dtype(self, key: str) -> str:
        """The safetensors dtype name of ``key`` from its header (``BF16``, ``F32``, ``F8_E4M3``, ``I8``, ...)."""
        return self._read(key, lambda f: f.get_slice(key).get_dtype())

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key`` (read from disk now)."""
        return self._read(key, lambda f: f.get_tensor(key))

    def _read(self, key: str, read: Callable):
        """``read(handle)`` on the shard holding ``key``; its errors name the key, the shard and the index that
        pointed there (a stale index names a shard that is gone or lacks the key)."""
        if key not in self._files:
            raise KeyError(f"checkpoint key {key!r} not found in {self.path}")
        file = self._files[key]
        where = f"checkpoint key {key!r} (shard {file}" + (f", named by {self._index})" if self._index else ")")
        try:
            if file not in self._handles:
                self._handles[file] = _open(file)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None
        from safetensors import SafetensorError  # (importable: _open succeeded)

        try:
            return read(self._handles[file])
        except SafetensorError as err:  # e.g. "File does not contain tensor ...": the index points elsewhere
            raise ValueError(f"{where}: {err}") from None

    def model_types(self) -> set[str]:
        """``model_type`` (and ``text_config.model_type``) of the ``config.json`` beside the checkpoint; empty
        when there is none."""
        config = (self.path if self.path.is_dir() else self.path.parent) / "config.json"
        if not config.is_file():
            return set()
        data = read_json(config)
        text = data.get("text_config")
        found = {data.get("model_type"), text.get("model_type") if isinstance(text, dict) else None}
        return {t for t in found if isinstance(t, str)}

    def moe_prefixes(self) -> list[str]:
        """Prefixes ``P`` under which ``P.experts.`` holds expert weights, in checkpoint order."""
        found: dict[str, None] = {}
        for key in self._files:
            head, sep, _ = key.partition(".experts.")
            if sep:
                found.setdefault(head)
        return list(found)


def _open(file: Path):
    """``safe_open`` whose errors name the file (safetensors' own say only "incomplete metadata")."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as err:  # an optional dependency: say which extra brings it
        raise ImportError("moekit.loading reads safetensors checkpoints: pip install 'moekit[hf]'") from err

    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file}: not found")
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint file {file}: not a readable safetensors file (truncated?): {err}") from None


def _index_map(index: Path) -> dict[str, Path]:
    """key -> shard file from ``model.safetensors.index.json``, every entry checked to be a file name."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"checkpoint index {index}: expected a JSON object with a 'weight_map' object")
    root = os.path.normpath(index.parent)
    for key, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise ValueError(f"checkpoint index {index}: weight_map[{key!r}]: expected a shard file name, got "
                             f"{file!r}")
        # Shards live under the index's directory: an absolute or ../ entry would read a file outside the
        # checkpoint. Checked on the path as written, not resolved: the Hugging Face cache's shards are symlinks
        # into a blobs directory beside the snapshot.
        if not os.path.normpath(os.path.join(root, file)).startswith(root + os.sep):
            raise ValueError(f"checkpoint index {index}: weight_map[{key!r}]: expected a shard file in "
                             f"{index.parent}, got {file!r}")
    return {k: index.parent / f for k, f in weight_map.items()}


def _shard_map(shards: list[Path]) -> dict[str, Path]:
    """key -> shard file of a directory without an index; a key stored in two shards is refused, since nothing says
    which copy is the model's (reading the last one would load whichever file sorts last)."""
    files: dict[str, Path] = {}
    for file in shards:
        for key in _header_keys(file):
            if key in files:
                raise ValueError(f"checkpoint key {key!r}: stored in two shards, {files[key]} and {file}, and no "
                                 "model.safetensors.index.json says which one to read; remove the stale copy or "
                                 "add an index")
            files[key] = file
    return files


def _header_keys(file: Path) -> list[str]:
    with _open(file) as f:
        return list(f.keys())
