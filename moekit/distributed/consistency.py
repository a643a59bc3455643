"""That every rank of a parallel layer built the same layer: one all-gather of a fingerprint, at its first call.

The dispatch and the tensor-parallel all-reduce only agree on shapes. Ranks that built the layer differently --
another placement, another top-k or activation, one rank quantized and another not -- exchange tensors of the
right sizes and return wrong outputs, no error (or hang on a count one rank never sends). So the layer checks
once, collectively: each rank hashes each field it was built with (CRC-32 of its ``repr``: stable across
processes, unlike ``hash``), the ranks all-gather the hashes, and a field that differs is named with this rank's
value and which ranks hold which value.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch
import torch.distributed as dist


def field_hashes(fields: Mapping[str, object]) -> torch.Tensor:
    """int64 [F]: CRC-32 of ``repr`` of each value, in ``fields``' order."""
    return torch.tensor([zlib.crc32(repr(v).encode()) for v in fields.values()], dtype=torch.int64)


def check_ranks_agree(fields: Mapping[str, object], group: dist.ProcessGroup | None, device: torch.device,
                      *, what: str = "the layer") -> None:
    """Raise ValueError unless every rank of ``group`` passed equal ``fields`` (collective: every rank calls it).

    ``device``: where the hashes travel (a CUDA device for NCCL, the CPU for gloo).
    """
    mine = field_hashes(fields).to(device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()  # [ranks, F]
    differ = [i for i in range(table.shape[1]) if bool((table[:, i] != table[0, i]).any())]
    if not differ:
        return
    rank = dist.get_rank(group)
    names = list(fields)
    details = []
    for i in differ:
        by_value: dict[int, list[int]] = {}
        for r in range(world):
            by_value.setdefault(int(table[r, i]), []).append(r)
        ranks = " / ".join(str(rs) for rs in by_value.values())
        details.append(f"{names[i]} (this rank, {rank}: {fields[names[i]]!r}; ranks with equal values: {ranks})")
    raise ValueError(f"{what}: the ranks of its process group were built differently: " + "; ".join(details)
                     + ". Every rank must build it with the same config, parallel sizes, placement, dispatch, dtype "
                     "and quantization")


class RankCheck:
    """The groups a layer's ranks span and whether they were found to agree (``MoE`` keeps one).

    A copy (``copy.deepcopy`` of the layer) shares the groups, which cannot be copied, and the finding."""

    def __init__(self, groups: list[dist.ProcessGroup | None]) -> None:
        self.groups = groups
        self.done = False

    def __deepcopy__(self, memo: dict) -> RankCheck:
        other = RankCheck(self.groups)
        other.done = self.done
        return other

    def run(self, fields: Mapping[str, object], device: torch.device, *, what: str) -> None:
        """``check_ranks_agree`` over each group (the hashes on ``device`` for NCCL groups, else the CPU), once."""
        for group in self.groups:
            on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
            check_ranks_agree(fields, group, on, what=what)
        self.done = True
