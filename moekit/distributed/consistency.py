"""That every rank of a parallel layer built the same layer: one all-gather of a fingerprint, at its first call.

The dispatch and the tensor-parallel all-reduce only agree on shapes. Ranks that built the layer differently --
another placement, another top-k or activation, one rank quantized and another not -- exchange tensors of the
right sizes and return wrong outputs, no error (or hang on a count one rank never sends). So the layer checks
once, collectively: each rank hashes each field it was built with (CRC-32 of its ``repr``: stable across
processes, unlike ``hash``), the ranks all-gather the hashes, and a field that differs is named with this rank's
value and which ranks hold which value.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping

import torch
import torch.distributed as dist


def flatten_fields(prefix: str, value: object) -> dict[str, object]:
    """``value``'s leaves under dotted names (a dataclass field by field, recursively; anything else is a leaf), so
    a difference is named down to the leaf (``config.routing.scoring_func``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, object] = {}
        for f in dataclasses.fields(value):
            out.update(flatten_fields(f"{prefix}.{f.name}", getattr(value, f.name)))
        return out
    return {prefix: value}


def stable_repr(value: object) -> str:
    """A text of ``value`` equal across processes for equal values: ``repr``, except for functions, methods and
    classes, whose repr holds an address (a routing callback is compared by its qualified name)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return repr(value)


def field_hashes(fields: Mapping[str, object]) -> torch.Tensor:
    """int64 [F]: CRC-32 of ``stable_repr`` of each value, in ``fields``' order."""
    return torch.tensor([zlib.crc32(stable_repr(v).encode()) for v in fields.values()], dtype=torch.int64)


def check_ranks_agree(fields: Mapping[str, object], group: dist.ProcessGroup | None, device: torch.device,
                      *, what: str, hint: str) -> None:
    """Raise ValueError unless every rank of ``group`` passed equal ``fields`` (collective: every rank calls it):
    ``what``, the fields that differ, then ``hint``.

    ``device``: where the hashes travel (the device the group's collectives take: the layer's input's).
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
        details.append(f"{names[i]} (this rank, {rank} of the group: {stable_repr(fields[names[i]])}; ranks with "
                       f"equal values: {ranks})")
    raise ValueError(f"{what}: " + "; ".join(details) + f". {hint}")


def tokens_digest(x: torch.Tensor) -> dict[str, object]:
    """What identifies a batch of tokens across ranks without moving it: its shape and the int64 sum of its bytes
    (exact, so equal inputs give equal sums on any device)."""
    return {"shape": tuple(x.shape), "byte sum": int(x.detach().reshape(-1).view(torch.uint8).sum(dtype=torch.int64))}


class RankCheck:
    """The groups a layer's ranks span and whether they were found to agree (``MoE`` keeps one): ``group`` (all
    of the layer's ranks) on how they built it, ``same_tokens`` (a tensor-parallel group, whose ranks hold slices
    of the same experts and sum their outputs) on the tokens of the first call too.

    A copy (``copy.deepcopy`` of the layer) shares the groups, which cannot be copied, and the finding; a pickled
    one (``torch.save``) is checked again where it is loaded."""

    def __init__(self, group: dist.ProcessGroup | None, same_tokens: dist.ProcessGroup | None = None,
                 *, tensor_parallel: bool = False) -> None:
        self.group, self.same_tokens, self.tensor_parallel = group, same_tokens, tensor_parallel
        self.done = False

    def __deepcopy__(self, memo: dict) -> RankCheck:
        other = RankCheck(self.group, self.same_tokens, tensor_parallel=self.tensor_parallel)
        other.done = self.done
        return other

    def __getstate__(self) -> dict:
        return {**self.__dict__, "done": False}

    def run(self, fields: Mapping[str, object], x: torch.Tensor, *, what: str) -> None:
        """``check_ranks_agree`` over ``group`` and (tensor parallelism) on ``x``'s digest over ``same_tokens``,
        once; the hashes travel on ``x``'s device, as the dispatch's own collectives do."""
        check_ranks_agree(fields, self.group, x.device, what=f"{what}: the ranks of its process group were built "
                          "differently", hint="Every rank must build it with the same config, parallel sizes, "
                          "placement, dispatch, dtype and quantization")
        if self.tensor_parallel:
            check_ranks_agree(tokens_digest(x), self.same_tokens, x.device,
                              what="hidden_states: the ranks got different tokens at the layer's first call",
                              hint="The ranks of a tensor-parallel group hold slices of the same experts and sum "
                              "their outputs: each must be called with the same tokens")
        self.done = True

