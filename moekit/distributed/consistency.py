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
    if what == "hidden_states":
        raise ValueError("hidden_states: the ranks got different tokens at the layer's first call: "
                         + "; ".join(details))
    raise ValueError(f"{what}: the ranks of its process group were built differently: " + "; ".join(details)
                     + ". Every rank must build it with the same config, parallel sizes, placement, dispatch, dtype "
                     "and quantization")


def tokens_digest(x: torch.Tensor) -> dict[str, object]:
    """What identifies a batch of tokens across ranks without moving it: its shape and the int64 sum of its bytes
    (exact, so equal inputs give equal sums on any device)."""
    flat = x.detach().contiguous().view(torch.uint8) if x.numel() else x.new_zeros(0, dtype=torch.uint8)
    return {"shape": tuple(x.shape), "byte sum": int(flat.sum(dtype=torch.int64)) if flat.numel() else 0}


class RankCheck:
    """The groups a layer's ranks span and whether they were found to agree (``MoE`` keeps one): ``group`` (all
    of the layer's ranks) on how they built it, ``same_tokens`` (a tensor-parallel group, whose ranks hold slices
    of the same experts and sum their outputs) on the tokens of the first call too.

    A copy (``copy.deepcopy`` of the layer) shares the groups, which cannot be copied, and the finding."""

    def __init__(self, group: dist.ProcessGroup | None, same_tokens: dist.ProcessGroup | None = None,
                 *, tensor_parallel: bool = False) -> None:
        self.group, self.same_tokens, self.tensor_parallel = group, same_tokens, tensor_parallel
        self.done = False

    def __deepcopy__(self, memo: dict) -> RankCheck:
        other = RankCheck(self.group, self.same_tokens, tensor_parallel=self.tensor_parallel)
        other.done = self.done
        return other

    def run(self, fields: Mapping[str, object], x: torch.Tensor, *, what: str) -> None:
        """``check_ranks_agree`` over ``group`` and (tensor parallelism) on ``x``'s digest over ``same_tokens``,
        once; the hashes travel on ``x``'s device for NCCL groups, else on the CPU."""
        check_ranks_agree(fields, self.group, _device(self.group, x), what=what)
        if self.tensor_parallel:
            try:
                check_ranks_agree(tokens_digest(x), self.same_tokens, _device(self.same_tokens, x),
                                  what="hidden_states")
            except ValueError as err:
                raise ValueError(f"{err} (the ranks of a tensor-parallel group hold slices of the same experts and "
                                 "sum their outputs: each must be called with the same tokens)") from None
        self.done = True


def _device(group: dist.ProcessGroup | None, x: torch.Tensor) -> torch.device:
    return x.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
