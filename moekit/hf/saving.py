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


@dataclass(frozen=True)
class SavedAs:
    """How the ``HFMoE`` tensor ``name`` is saved: as the block's tensors ``sources`` (names relative to the block),
    ``to_source(t) -> tuple`` of them; ``from_source(*tensors)`` gives ``t`` back."""

    name: str
    sources: tuple[str, ...]
    to_source: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    from_source: Callable[..., torch.Tensor]


def split_rows(
    name: str, sources: tuple[str, str], *, dim: int, half_shape: tuple[int, ...], source_shape: tuple[int, ...]
) -> SavedAs:
    """``name`` is the concatenation along ``dim`` of two source tensors of ``source_shape``, each seen as
    ``half_shape`` (a shared MLP's gate_proj | up_proj; DBRX's w1 | v1 [E*I, H] seen as [E, I, H])."""

    def to_source(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [half.reshape(source_shape) for half in t.chunk(2, dim=dim)]
        # Halves still sharing t's storage are cloned: safetensors refuses tensors that alias each other.
        storage = t.untyped_storage().data_ptr()
        return tuple(p.clone() if p.untyped_storage().data_ptr() == storage else p for p in parts)

    def from_source(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return torch.cat((first.reshape(half_shape), second.reshape(half_shape)), dim=dim)

    return SavedAs(name, sources, to_source, from_source)


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
        return SavedAs(name, (source,), lambda t: (t,), lambda s: s)
    if _is_view(lambda: tensor.view(source_shape), value):
        return SavedAs(name, (source,), lambda t: (t.reshape(source_shape),), lambda s: s.reshape(shape))
    if tensor.dim() == 3 and _is_view(lambda: tensor.transpose(1, 2).view(source_shape), value):
        stored = (shape[0], shape[2], shape[1])
        return SavedAs(
            name,
            (source,),
            lambda t: (t.transpose(1, 2).reshape(source_shape),),
            lambda s: s.reshape(stored).transpose(1, 2),
        )
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
