"""A converted block saves and loads under its source block's names and layouts.

``convert`` puts an ``HFMoE`` where a transformers block was; its own tensor names (``routed_experts.w13``,
``shared_experts.gate_up_proj.weight``) mean nothing to transformers, which would re-initialise the experts of a
checkpoint saved with them. ``install`` adds two hooks to the ``HFMoE``, so that every path through
``state_dict`` (``save_pretrained``, ``torch.save(model.state_dict())``) and ``load_state_dict`` speaks the block's
language:

    state_dict post-hook       moekit tensor  --to_source-->  the block's tensor(s), under the block's names
    load_state_dict pre-hook   the block's tensor(s)  --from_source-->  moekit tensor

Each tensor of the ``HFMoE`` is described by one ``SavedAs``. Tensors shared with the block, or views of them
(reshaped, transposed), are matched to the block's tensors by storage and checked to be exactly that view; the
copies conversion makes (interleaved or split gate/up rows, a shared MLP's concatenated gate/up) are described
by the readers that make them. A block tensor or an ``HFMoE`` tensor left undescribed raises at conversion, so a
converted model never saves under moekit's names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moekit._layout import deinterleave, interleave


@dataclass(frozen=True)
class SavedAs:
    """How the ``HFMoE`` tensor ``name`` is saved: as the block's tensors ``sources`` (names relative to the block).

    ``kind`` names the relation (plain data, so a converted model still pickles):
        same                   the source itself
        reshape                the source seen as ``shape`` (``source_shape`` on disk)
        transpose              the source [E, a, b] seen transposed, [E, b, a]
        split_rows             the concatenation along ``dim`` of two sources of ``source_shape``, each seen as
                               ``half_shape`` (a shared MLP's gate_proj | up_proj; DBRX's w1 | v1)
        interleave             the source's gate/up rows along dim 1 interleaved (gpt-oss), ours gate then up
        interleave_transposed  the same with the source stored transposed ([E, H, 2I]: interleaved columns)
    """

    name: str
    sources: tuple[str, ...]
    kind: str
    shape: tuple[int, ...] = ()
    source_shape: tuple[int, ...] = ()
    half_shape: tuple[int, ...] = ()
    dim: int = 0

    def to_source(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.kind == "same":
            return (t,)
        if self.kind == "reshape":
            return (t.reshape(self.source_shape),)
        if self.kind == "transpose":
            return (t.transpose(1, 2).reshape(self.source_shape),)
        if self.kind == "interleave":
            return (interleave(t, dim=1),)
        if self.kind == "interleave_transposed":
            return (interleave(t.transpose(1, 2), dim=2),)
        parts = [half.reshape(self.source_shape) for half in t.chunk(2, dim=self.dim)]  # split_rows
        # Halves still sharing t's storage are cloned: safetensors refuses tensors that alias each other.
        storage = t.untyped_storage().data_ptr()
        return tuple(p.clone() if p.untyped_storage().data_ptr() == storage else p for p in parts)

    def from_source(self, *sources: torch.Tensor) -> torch.Tensor:
        (first, *rest) = sources
        if self.kind == "same":
            return first
        if self.kind == "reshape":
            return first.reshape(self.shape)
        if self.kind == "transpose":
            return first.reshape(self.shape[0], self.shape[2], self.shape[1]).transpose(1, 2)
        if self.kind == "interleave":
            return deinterleave(first, dim=1)
        if self.kind == "interleave_transposed":
            return deinterleave(first.transpose(1, 2), dim=1)
        return torch.cat((first.reshape(self.half_shape), rest[0].reshape(self.half_shape)), dim=self.dim)


def split_rows(
    name: str, sources: tuple[str, str], *, dim: int, half_shape: tuple[int, ...], source_shape: tuple[int, ...]
) -> SavedAs:
    """``name`` is the concatenation along ``dim`` of two source tensors of ``source_shape``, each seen as
    ``half_shape`` (a shared MLP's gate_proj | up_proj; DBRX's w1 | v1 [E*I, H] seen as [E, I, H])."""
    return SavedAs(name, sources, "split_rows", source_shape=tuple(source_shape), half_shape=tuple(half_shape),
                   dim=dim)


def interleaved(name: str, source: str, *, transposed: bool) -> SavedAs:
    """gpt-oss: the source interleaves gate/up rows (columns when stored transposed, [E, H, 2I])."""
    return SavedAs(name, (source,), "interleave_transposed" if transposed else "interleave")


def views(block: nn.Module, moe: nn.Module, declared: list[SavedAs]) -> list[SavedAs]:
    """``declared`` plus a ``SavedAs`` for every tensor of ``moe`` that is a view of one of ``block``'s.

    Raises:
        NotImplementedError: a tensor of ``block`` or of ``moe`` that no ``SavedAs`` covers (named).
    """
    block_state = block.state_dict(keep_vars=True)
    moe_state = moe.state_dict(keep_vars=True)
    entries = list(declared)
    covered = {s for e in entries for s in e.sources}
    done = {e.name for e in entries}
    for name, tensor in moe_state.items():
        if name in done:
            continue
        for source, value in block_state.items():
            entry = None if source in covered else _view_entry(name, tensor, source, value)
            if entry is not None:
                entries.append(entry)
                covered.add(source)
                done.add(name)
                break
    left = [f"block {k}" for k in block_state if k not in covered] + [f"moekit {k}" for k in moe_state if k not in done]
    if left:
        raise NotImplementedError(f"tensors with no name in the block's checkpoint layout: {left}")
    return entries


def _view_entry(name: str, tensor: torch.Tensor, source: str, value: torch.Tensor) -> SavedAs | None:
    """A ``SavedAs`` when ``tensor`` is exactly ``value`` seen as itself, reshaped, or transposed (dims 1, 2)."""
    if tensor.dtype != value.dtype or tensor.numel() != value.numel() or tensor.data_ptr() != value.data_ptr():
        return None
    shape, source_shape = tuple(tensor.shape), tuple(value.shape)
    if shape == source_shape and tensor.stride() == value.stride():
        return SavedAs(name, (source,), "same")
    if _is_view(lambda: tensor.view(source_shape), value):
        return SavedAs(name, (source,), "reshape", shape=shape, source_shape=source_shape)
    if tensor.dim() == 3 and _is_view(lambda: tensor.transpose(1, 2).view(source_shape), value):
        return SavedAs(name, (source,), "transpose", shape=shape, source_shape=source_shape)
    return None


def _is_view(make: Callable[[], torch.Tensor], value: torch.Tensor) -> bool:
    try:
        view = make()
    except RuntimeError:  # not expressible as a view: not this relation
        return False
    return view.data_ptr() == value.data_ptr() and view.shape == value.shape and view.stride() == value.stride()


def install(moe: nn.Module, entries: list[SavedAs]) -> None:
    """Make ``moe``'s ``state_dict`` / ``load_state_dict`` use the names and layouts of ``entries``' sources."""
    moe._moekit_saved_as = tuple(entries)
    moe.register_state_dict_post_hook(_to_source)
    moe.register_load_state_dict_pre_hook(_from_source)


def _to_source(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for entry in module._moekit_saved_as:
        key = prefix + entry.name
        if key not in state_dict:
            continue
        values = entry.to_source(state_dict.pop(key))
        for source, value in zip(entry.sources, values, strict=True):
            state_dict[prefix + source] = value


def _from_source(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    # A state dict saved under moekit's own names (none is written since this hook exists) loads unchanged; one
    # missing some source tensor is left for load_state_dict to report.
    for entry in module._moekit_saved_as:
        keys = [prefix + s for s in entry.sources]
        if all(k in state_dict for k in keys):
            state_dict[prefix + entry.name] = entry.from_source(*(state_dict.pop(k) for k in keys))
