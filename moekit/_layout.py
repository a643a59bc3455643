"""Gate/up row orders of fused expert weights, shared by the checkpoint loader and the transformers integration.

moekit's w13 [E, 2I, H] holds the gate rows, then the up rows. gpt-oss stores them interleaved:

    concatenated  [g0, g1, ..., g(I-1), u0, u1, ..., u(I-1)]      moekit, most checkpoints
    interleaved   [g0, u0, g1, u1, ..., g(I-1), u(I-1)]            gpt-oss

``deinterleave`` and ``interleave`` convert between the two along one dim; each returns a new tensor.
"""

from __future__ import annotations

import torch

from moekit._checks import check_tensor


def deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows ``[g0, u0, g1, u1, ...]`` along ``dim`` -> ``[g0, g1, ..., u0, u1, ...]`` (gate rows, then up rows)."""
    _check_pairs(t, dim)
    index = torch.arange(t.shape[dim], device=t.device)
    return t.index_select(dim, torch.cat((index[0::2], index[1::2])))


def interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows ``[g0, g1, ..., u0, u1, ...]`` along ``dim`` -> ``[g0, u0, g1, u1, ...]``; undoes ``deinterleave``."""
    _check_pairs(t, dim)
    gate, up = t.chunk(2, dim=dim)
    dim = dim % t.dim()
    return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)


def _check_pairs(t: torch.Tensor, dim: int) -> None:
    check_tensor("t", t)
    if t.shape[dim] % 2:
        raise ValueError(f"t: expected an even size along dim {dim} (gate/up pairs), got shape {tuple(t.shape)}")
