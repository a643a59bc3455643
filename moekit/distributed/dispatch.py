"""Expert-parallel prepare/finalize on torch.distributed (gloo on CPUs, NCCL on GPUs).

Every rank holds the router, the shared experts and its own experts (``RoutedExperts`` with an ``expert_map``);
``topk_ids`` stay global ids throughout. W ranks, rank r with T_r tokens, T_max = max_r T_r:

    allgather_reducescatter (AllGatherReduceScatter; vLLM's default, SGLang's "standard")
        counts   all_gather [T_r] -> [W]                                            (host sync: T_max, padding)
        dispatch all_gather of one byte row per token: x (or its 8-bit codes), per-row scales, weights, ids,
                 padded to T_max rows per rank  -> every rank sees every token
        experts  local experts only (remote ids -> zero rows), summed over K per token
        combine  reduce_scatter (sum) of [W·T_max, H] in the layer's dtype -> each rank its own T_r rows

    all_to_all (AllToAll; the token dispatch of DeepEP and vLLM's all-to-all backends, on all_to_all_single)
        each token travels once to each rank owning one of its K experts (D = min(K, W) ranks at most)
        counts   all_to_all_single of per-destination row counts                    (host sync: split sizes)
        dispatch all_to_all_single with splits of the same byte rows as above, sorted by destination
        experts  local experts only, summed over K per row (as above)
        combine  all_to_all_single back with the splits reversed: one partial row per (token, rank), in the
                 layer's dtype; at home a token's partials summed in fp32 in rank order, the sum rounded once

Collectives per layer call: 3 for both (allgather_reducescatter: 1 when no rank has a token), and one host sync
for the counts. Sync-free (``sync_free``; by default while a CUDA graph is being captured) every rank must call
with the same token count T and both skip the counts (2 collectives, 0 when T = 0): all_to_all then sends every
token to every rank, which is an all_gather (NCCL's is quicker than its send/recv at decode sizes), and a rank
that owns none of a token's experts returns a zero row (combine: all_to_all_single, T rows to each rank). Bytes a rank sends per call, e = element size, S = scale bytes:
allgather_reducescatter (W - 1)·T·(H·e + 8K + S) there and (W - 1)·T·H·e back; all_to_all H·e + 8K + S for
each of its tokens' destinations other than itself, and H·e back for each row it received from another rank:
fewer when W > D or a token's experts cluster on few ranks, the gather's bytes when every token reaches every rank.

8-bit activations travel as their codes (uint8 views) with per-row scales, so fewer bytes move, whenever the
quantization is per row (token, group) or uses a static scale. A dynamic per-tensor scale cannot be computed
per sender: those rows travel unquantized and are quantized where the experts run (the scale is then the max
over the rows a rank received, not over one rank's tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit._checks import check_choice, check_positive
from moekit.config import DISPATCHES, PLACEMENTS
from moekit.distributed.placement import check_group, expert_owners
from moekit.kernel.prepare_finalize import (
    LocalPrepareFinalize,
    PrepareFinalize,
    PrepareResult,
    check_act_dtype,
    quantize_input,
)
from moekit.quant.params import QuantParams

_LOCAL = LocalPrepareFinalize()


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    # all_gather_single replaces all_gather_into_tensor (deprecated in torch 2.13); older torch has only the latter.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)


def _pack(rows: list[torch.Tensor]) -> torch.Tensor:
    """One uint8 row per token holding every tensor's row bytes, so a single collective moves them all."""
    return torch.cat([t.contiguous().reshape(t.shape[0], math.prod(t.shape[1:])).view(torch.uint8) for t in rows],
                     dim=1)


def _unpack(buf: torch.Tensor, like: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
    """Inverse of ``_pack``: ``like`` gives each tensor's dtype and per-row shape."""
    out, col = [], 0
    for dtype, shape in like:
        width = math.prod(shape) * dtype.itemsize
        out.append(buf[:, col:col + width].contiguous().view(dtype).view(buf.shape[0], *shape))
        col += width
    return out


def _row_layout(rows: list[torch.Tensor]) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    return [(t.dtype, tuple(t.shape[1:])) for t in rows]


def _rowwise_quant(quant: QuantParams) -> bool:
    """Whether a sender can quantize its own rows: per-row scales, or one static scale every rank shares."""
    return quant.act_dtype is None or quant.act_granularity != "tensor" or quant.a13_scale is not None


def _token_rows(x_TH: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, weights_on_input: bool,
                quant: QuantParams) -> tuple[list[torch.Tensor], bool, torch.Tensor | None]:
    """What travels for each token: ``(rows, early, static_scale)``. Prepared where the tokens are (8-bit codes +
    per-row scales travel: fewer bytes) unless a row's result depends on other rows (a dynamic per-tensor scale) or
    K rows per token would travel instead of one (weights on the input, K > 1); a static scale stays home."""
    early = _rowwise_quant(quant) and not (weights_on_input and ids_TK.shape[1] > 1)
    if not early:
        return [x_TH, weights_TK.float(), ids_TK.to(torch.int32)], False, None
    own = _LOCAL.prepare(x_TH, weights_TK, ids_TK, apply_router_weight_on_input=weights_on_input, quant=quant)
    rows = [own.hidden_states, own.topk_weights.float(), own.topk_ids.to(torch.int32)]
    if own.hidden_scale is not None and own.hidden_scale.dim() == 2:
        return [*rows, own.hidden_scale], True, None
    return rows, True, own.hidden_scale  # None, or the static scale every rank holds


def _received(got: list[torch.Tensor], early: bool, static_scale: torch.Tensor | None, weights_on_input: bool,
              quant: QuantParams) -> PrepareResult:
    """The local prepare of the rows a rank received (``_token_rows``' layout): its experts' input."""
    x, weights, ids = got[:3]
    if not early:
        return _LOCAL.prepare(x, weights, ids, apply_router_weight_on_input=weights_on_input, quant=quant)
    scale = got[3] if len(got) > 3 else static_scale
    return PrepareResult(hidden_states=x, hidden_scale=scale, topk_weights=weights, topk_ids=ids,
                         weights_applied=weights_on_input, num_tokens=x.shape[0])


class ExpertParallelPrepareFinalize(PrepareFinalize):
    """Shared set-up of the expert-parallel dispatches: the process group and which rank owns each expert.

    Args:
        num_experts: E, global routed experts.
        ep_size, ep_rank: this rank's place; must be the process group's size and this process's rank in it.
        placement: ``linear`` | ``round_robin`` (``moekit.distributed.determine_expert_map``).
        group: the process group (None: the default group, the ranks of ``torchrun``).

    ``sync_free``: None (default) runs the sync-free variant only while a CUDA graph is being captured, True
    always, False never. Sync-free, no count is exchanged and nothing waits for the host: every rank must then
    call with the same token count (a padded decode batch, as CUDA graphs have anyway). That is not checked (a
    check would be the very sync this variant avoids): different counts abort in gloo or, on NCCL, may return
    garbage rows silently.
    """

    collective = True
    sync_free: bool | None = None

    def __init__(self, *, num_experts: int, ep_size: int, ep_rank: int, placement: str = "linear",
                 group: dist.ProcessGroup | None = None) -> None:
        check_positive("num_experts", num_experts)
        check_choice("placement", placement, PLACEMENTS)
        check_group(ep_size, ep_rank, group, building="an expert-parallel layer")
        if num_experts < ep_size:
            raise ValueError(f"num_experts: expected >= ep_size={ep_size} (every rank holds an expert), "
                             f"got {num_experts}")
        self.num_experts, self.ep_size, self.ep_rank = num_experts, ep_size, ep_rank
        self.placement, self.group = placement, group
        self._owners = expert_owners(ep_size, num_experts, placement)
        self._owners_on: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_experts={self.num_experts}, ep_size={self.ep_size}, "
                f"ep_rank={self.ep_rank}, placement={self.placement!r})")

    def __deepcopy__(self, memo: dict) -> ExpertParallelPrepareFinalize:
        return self  # stateless past its construction and bound to a process group: a copied layer shares it

    def _sync_free(self, device: torch.device) -> bool:
        if self.sync_free is not None:
            return self.sync_free
        return device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def destinations(self, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        """bool [W, T]: whether token t has one of its experts on rank r (where all_to_all sends it, once)."""
        dest_KT = self.owners(topk_ids_TK.device)[topk_ids_TK.long()].t()
        hit_WT = torch.zeros(self.ep_size, topk_ids_TK.shape[0], dtype=torch.bool, device=topk_ids_TK.device)
        return hit_WT.scatter_(0, dest_KT, True)

    def owners(self, device: torch.device) -> torch.Tensor:
        """The rank of each global expert, int64 [E], on ``device`` (copied there once)."""
        owners = self._owners_on.get(device)
        if owners is None:
            owners = self._owners_on[device] = self._owners.to(device)
        return owners


@dataclass(frozen=True)
class _GatherHandle:
    local: PrepareResult  # the local prepare of the gathered rows (finalize sums expanded K rows)
    num_tokens: int  # T_r, this rank's rows
    max_tokens: int  # T_max, rows per rank in the padded collectives
    valid: torch.Tensor | None  # int64 indices of the real rows among the W·T_max gathered ones (None: no padding)


class AllGatherReduceScatter(ExpertParallelPrepareFinalize):
    """Every rank gathers every token, runs its local experts, and a reduce-scatter sums the partial outputs back
    to the tokens' ranks (see the module docstring). Token counts may differ per rank (0 included): gloo needs
    equal chunks, so each rank's rows are padded to the largest count."""

    def prepare(self, hidden_states_TH: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, *,
                apply_router_weight_on_input: bool, quant: QuantParams) -> PrepareResult:
        check_act_dtype(quant)
        num_tokens, device = topk_ids_TK.shape[0], hidden_states_TH.device
        if self._sync_free(device):
            counts_list = [num_tokens] * self.ep_size  # the caller's promise: every rank has as many tokens
        else:
            counts = torch.empty(self.ep_size, dtype=torch.int64, device=device)
            _all_gather(counts, torch.tensor([num_tokens], dtype=torch.int64, device=device), self.group)
            counts_list = counts.tolist()  # the host sync: padding and the rows to keep depend on every count
        max_tokens = max(counts_list)
        rows, early, static_scale = _token_rows(hidden_states_TH, topk_weights_TK, topk_ids_TK,
                                                apply_router_weight_on_input, quant)
        layout = _row_layout(rows)
        if max_tokens == 0:  # every rank agrees (same counts): nothing to move
            gathered, valid = [t[:0] for t in rows], None
        else:
            send = _pack(rows)
            if num_tokens < max_tokens:
                send = torch.cat([send, send.new_zeros(max_tokens - num_tokens, send.shape[1])])
            recv = send.new_empty(self.ep_size * max_tokens, send.shape[1])
            _all_gather(recv, send, self.group)
            valid = None
            if min(counts_list) < max_tokens:
                valid = torch.cat([torch.arange(c, device=device) + r * max_tokens for r, c in enumerate(counts_list)])
                recv = recv.index_select(0, valid)
            gathered = _unpack(recv, layout)
        local = _received(gathered, early, static_scale, apply_router_weight_on_input, quant)
        return PrepareResult(
            hidden_states=local.hidden_states, hidden_scale=local.hidden_scale, topk_weights=local.topk_weights,
            topk_ids=local.topk_ids, weights_applied=apply_router_weight_on_input, num_tokens=num_tokens,
            experts_out_dtype=local.experts_out_dtype,
            handle=_GatherHandle(local, num_tokens, max_tokens, valid),
        )

    def finalize(self, output_TH: torch.Tensor, prep: PrepareResult) -> torch.Tensor:
        handle: _GatherHandle = prep.handle
        out = _LOCAL.finalize(output_TH, handle.local)  # [Σ T_r, H], summed over K, in the layer's dtype
        if handle.max_tokens == 0:
            return out
        if handle.valid is not None:
            padded = out.new_zeros(self.ep_size * handle.max_tokens, out.shape[1])
            out = padded.index_copy_(0, handle.valid, out)
        mine = out.new_empty(handle.max_tokens, out.shape[1])
        _reduce_scatter(mine, out.contiguous(), self.group)
        return mine[:handle.num_tokens]


@dataclass(frozen=True)
class _AllToAllHandle:
    local: PrepareResult  # the local prepare of the received rows (finalize sums expanded K rows)
    slots: torch.Tensor  # int64 [rows sent]: where each sent row's result lands at home, t·D + j (or the dump row)
    send_splits: list[int] | None  # rows sent to each rank (None: sync-free, T rows to each)
    recv_splits: list[int] | None  # rows received from each rank
    num_tokens: int  # T, this rank's tokens
    depth: int  # D = min(K, W): the most ranks one token's K experts can live on
    dtype: torch.dtype  # the layer's dtype


class AllToAll(ExpertParallelPrepareFinalize):
    """Each token travels once to every rank that owns one of its K experts, and that rank's partial result (its
    own experts' weighted sum) comes back (see the module docstring)."""

    def prepare(self, hidden_states_TH: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, *,
                apply_router_weight_on_input: bool, quant: QuantParams) -> PrepareResult:
        check_act_dtype(quant)
        num_tokens, top_k = topk_ids_TK.shape
        device, world = hidden_states_TH.device, self.ep_size
        depth = min(top_k, world)
        rows, early, static_scale = _token_rows(hidden_states_TH, topk_weights_TK, topk_ids_TK,
                                                apply_router_weight_on_input, quant)
        layout = _row_layout(rows)
        # hit[r, t]: one of token t's experts lives on rank r; slot[r, t] = t·D + (r's place among t's destinations):
        # the row of the home buffer its partial result lands in. Flattened, both are in (rank, token) order.
        hit_WT = self.destinations(topk_ids_TK)
        slot_WT = torch.cumsum(hit_WT, dim=0) + torch.arange(-1, num_tokens * depth - 1, depth, device=device)
        hit_n, slot_n = hit_WT.reshape(-1), slot_WT.reshape(-1)
        dump = num_tokens * depth  # home row taking the results nobody reads
        send_splits = recv_splits = None
        if self._sync_free(device):
            # Every token to every rank, no count to exchange: that is an all-gather (NCCL's is quicker than its
            # send/recv at decode sizes). A rank none of whose experts a token chose finds no local id among its K
            # and returns a zero row, which lands in the dump row.
            slots = torch.where(hit_n, slot_n, dump)
            send = _pack(rows)
            recv = send.new_empty(world * num_tokens, send.shape[1])
            if num_tokens:  # every rank has as many tokens: with none, every rank skips
                _all_gather(recv, send, self.group)
        else:
            send_counts = hit_WT.sum(dim=1)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            # The one host sync: the payload's split sizes.
            send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
            # The hit pairs in (rank, token) order without a second sync (a boolean mask would wait for its count):
            # pair i goes to place cumsum - 1, the others to one spare place past the end.
            sent = sum(send_splits)
            where = torch.where(hit_n, torch.cumsum(hit_n, dim=0) - 1, sent)
            pairs = torch.empty(sent + 1, dtype=torch.int64, device=device)
            pairs = pairs.scatter_(0, where, torch.arange(where.numel(), device=device))[:sent]
            slots = slot_n[pairs]
            send = _pack(rows)[pairs % max(num_tokens, 1)]  # pair r·T + t carries token t
            recv = send.new_empty(sum(recv_splits), send.shape[1])
            dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        got = _unpack(recv, layout)
        if not early and send_splits is None:
            # Quantized here, a dynamic per-tensor scale is the max over the rows this rank computes: rows that
            # came only because sync-free sends every token everywhere (eager never sends them) take no part.
            mine = (self.owners(device)[got[2].long()] == self.ep_rank).any(dim=1, keepdim=True)
            got[0] = torch.where(mine, got[0], got[0].new_zeros(()))
        local = _received(got, early, static_scale, apply_router_weight_on_input, quant)
        return PrepareResult(
            hidden_states=local.hidden_states, hidden_scale=local.hidden_scale, topk_weights=local.topk_weights,
            topk_ids=local.topk_ids, weights_applied=apply_router_weight_on_input, num_tokens=num_tokens,
            experts_out_dtype=local.experts_out_dtype,
            handle=_AllToAllHandle(local, slots, send_splits, recv_splits, num_tokens, depth,
                                   hidden_states_TH.dtype),
        )

    def finalize(self, output_TH: torch.Tensor, prep: PrepareResult) -> torch.Tensor:
        handle: _AllToAllHandle = prep.handle
        out = _LOCAL.finalize(output_TH, handle.local)  # [rows received, H]: each row's local experts, weighted
        hidden, depth, num_tokens = out.shape[1], handle.depth, handle.num_tokens
        back = out.new_empty(handle.slots.numel(), hidden)
        if handle.send_splits is not None or num_tokens:  # sync-free with no tokens: every rank skips
            dist.all_to_all_single(back, out.contiguous(), handle.send_splits, handle.recv_splits, group=self.group)
        home = out.new_zeros(num_tokens * depth + 1, hidden).index_copy_(0, handle.slots, back)
        # A token's partials (at most D, zeros in the unused rows) summed in fp32 in rank order, the sum rounded once.
        return home[:-1].view(num_tokens, depth, hidden).sum(dim=1, dtype=torch.float32).to(handle.dtype)


_DISPATCHES = {"allgather_reducescatter": AllGatherReduceScatter, "all_to_all": AllToAll}


def make_prepare_finalize(dispatch: str, *, num_experts: int, ep_size: int, ep_rank: int,
                          placement: str = "linear", group: dist.ProcessGroup | None = None) -> PrepareFinalize:
    """The expert-parallel ``PrepareFinalize`` named ``dispatch`` (``ParallelConfig.dispatch``)."""
    check_choice("dispatch", dispatch, DISPATCHES)
    return _DISPATCHES[dispatch](num_experts=num_experts, ep_size=ep_size, ep_rank=ep_rank, placement=placement,
                                 group=group)
