"""Expert-parallel prepare/finalize on torch.distributed (gloo on CPUs, NCCL on GPUs).

Every rank holds the router, the shared experts and its own experts (``RoutedExperts`` with an ``expert_map``);
``topk_ids`` stay global ids throughout. W ranks, rank r with T_r tokens, T_max = max_r T_r:

    allgather_reducescatter (AllGatherReduceScatter; vLLM's default, SGLang's "standard")
        counts   all_gather [T_r] -> [W]                                            (host sync: T_max, padding)
        dispatch all_gather of one byte row per token: x (or its 8-bit codes), per-row scales, weights, ids,
                 padded to T_max rows per rank  -> every rank sees every token
        experts  local experts only (remote ids -> zero rows), summed over K per token
        combine  reduce_scatter (sum) of [W·T_max, H] in the layer's dtype -> each rank its own T_r rows

    all_to_all (AllToAll; torchtitan's token dispatch)
        each routed (token, k) row goes to the rank owning expert ids[t, k], sorted by destination
        counts   all_to_all_single of per-destination row counts                    (host sync: split sizes)
        dispatch all_to_all_single with splits of one byte row per routed row: x[t] (x[t]·w[t, k] with weights
                 on the input; or its 8-bit codes) + per-row scales + the global id
        experts  one row per received (token, k), weight 1, written in the layer's dtype
        combine  all_to_all_single back with the splits reversed; at home out[t] = Σ_k w[t, k] · y[t, k] in fp32,
                 rounded once

Collectives per layer call: 3 for both (allgather_reducescatter: 1 when no rank has a token), and one host sync
for the counts. Sync-free (``sync_free``; by default while a CUDA graph is being captured) every rank must call
with the same token count T: allgather_reducescatter then skips the counts (2 collectives, 0 when T = 0);
all_to_all skips them too and sends N = T·K slots to every rank, real rows in the first ones and zero rows
routed to one of that rank's experts after them (2 collectives; each rank computes W·N rows, cheap at decode
sizes).

8-bit activations travel as their codes (uint8 views) with per-row scales, so fewer bytes move, whenever the
quantization is per row (token, group) or uses a static scale. A dynamic per-tensor scale cannot be computed
per sender: those rows travel unquantized and are quantized where the experts run (all_to_all: the scale is then
the max over the rows a rank received, not over one rank's tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit._checks import check_choice, check_positive
from moekit.config import DISPATCHES, PLACEMENTS
from moekit.distributed.placement import check_group, expert_owners, local_experts
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
        # Each rank's first expert: the id padding rows of a sync-free all-to-all carry (any of its experts would do).
        self._first = torch.stack([local_experts(ep_size, r, num_experts, placement)[0] for r in range(ep_size)])
        self._tables_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_experts={self.num_experts}, ep_size={self.ep_size}, "
                f"ep_rank={self.ep_rank}, placement={self.placement!r})")

    def __deepcopy__(self, memo: dict) -> ExpertParallelPrepareFinalize:
        return self  # stateless past its construction and bound to a process group: a copied layer shares it

    def _sync_free(self, device: torch.device) -> bool:
        if self.sync_free is not None:
            return self.sync_free
        return device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(owners int64 [E], first int32 [W])`` on ``device`` (copied there once): the rank of each global
        expert and each rank's first expert."""
        tables = self._tables_on.get(device)
        if tables is None:
            tables = self._tables_on[device] = (self._owners.to(device), self._first.to(device, torch.int32))
        return tables


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
        num_tokens, top_k = topk_ids_TK.shape
        device = hidden_states_TH.device
        if self._sync_free(device):
            counts_list = [num_tokens] * self.ep_size  # the caller's promise: every rank has as many tokens
        else:
            counts = torch.empty(self.ep_size, dtype=torch.int64, device=device)
            _all_gather(counts, torch.tensor([num_tokens], dtype=torch.int64, device=device), self.group)
            counts_list = counts.tolist()  # the host sync: padding and the rows to keep depend on every count
        max_tokens = max(counts_list)
        # Prepared where the tokens are (codes + per-row scales travel) unless a row's result depends on other rows
        # (a dynamic per-tensor scale) or K rows per token would travel instead of one (weights on the input, K > 1).
        early = _rowwise_quant(quant) and not (apply_router_weight_on_input and top_k > 1)
        static_scale = None
        if early:
            own = _LOCAL.prepare(hidden_states_TH, topk_weights_TK, topk_ids_TK,
                                 apply_router_weight_on_input=apply_router_weight_on_input, quant=quant)
            rows = [own.hidden_states, own.topk_weights.float(), own.topk_ids.to(torch.int32)]
            if own.hidden_scale is not None and own.hidden_scale.dim() == 2:
                rows.append(own.hidden_scale)
            else:
                static_scale = own.hidden_scale  # None, or the static scale every rank holds
        else:
            rows = [hidden_states_TH, topk_weights_TK.float(), topk_ids_TK.to(torch.int32)]
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
        if early:
            x, weights, ids = gathered[:3]
            scale = gathered[3] if len(gathered) > 3 else static_scale
            local = PrepareResult(hidden_states=x, hidden_scale=scale, topk_weights=weights, topk_ids=ids,
                                  weights_applied=apply_router_weight_on_input, num_tokens=x.shape[0])
        else:
            x, weights, ids = gathered
            local = _LOCAL.prepare(x, weights, ids, apply_router_weight_on_input=apply_router_weight_on_input,
                                   quant=quant)
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
    order: torch.Tensor  # int64 [N]: routed row (t·K + k) of each sent row, sorted by destination rank
    send_splits: list[int] | None  # rows sent to each rank (None: sync-free, N padded rows to each)
    recv_splits: list[int] | None  # rows received from each rank
    slots: torch.Tensor | None  # sync-free: int64 [N], each sorted row's place among the W·N padded rows
    weights: torch.Tensor | None  # float32 [T, K] applied at home; None when already multiplied into x
    top_k: int
    dtype: torch.dtype  # the layer's dtype


class AllToAll(ExpertParallelPrepareFinalize):
    """Each routed (token, k) row travels only to the rank owning its expert and its result comes back (see the
    module docstring). A token whose K experts share a rank travels once per expert."""

    def prepare(self, hidden_states_TH: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, *,
                apply_router_weight_on_input: bool, quant: QuantParams) -> PrepareResult:
        check_act_dtype(quant)
        num_tokens, top_k = topk_ids_TK.shape
        x, device = hidden_states_TH, hidden_states_TH.device
        num_rows, world = num_tokens * top_k, self.ep_size
        owners, first = self.tables(device)
        ids_N = topk_ids_TK.reshape(-1)
        dest_N = owners[ids_N.long()]
        order = torch.sort(dest_N, stable=True).indices  # stable: a rank's rows stay in routed-row order
        send_splits = recv_splits = slots = None
        if self._sync_free(device):
            # N slots per destination (all N rows may go to one rank), so no count travels and the host never
            # waits; row i of destination r, in sorted order, takes slot r·N + i. Every rank has N rows too.
            counts = torch.zeros(world, dtype=torch.int64, device=device).index_add_(0, dest_N, torch.ones_like(dest_N))
            dest_sorted = dest_N[order]
            starts = torch.cumsum(counts, 0) - counts
            slots = dest_sorted * num_rows + torch.arange(num_rows, device=device) - starts[dest_sorted]
        else:
            send_counts = torch.bincount(dest_N, minlength=world)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            # The one host sync: the payload's split sizes.
            send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        token_N = order // top_k
        if apply_router_weight_on_input:
            # Each row scaled by its own expert's weight, rounded to the layer's dtype as the local path does.
            w_N = topk_weights_TK.reshape(-1)[order].float().unsqueeze(1)
            x_rows = (x[token_N].float() * w_N).to(x.dtype)
        else:
            x_rows = x[token_N]
        early = _rowwise_quant(quant)
        static_scale = None
        rows = [x_rows]
        if early and quant.act_dtype is not None:
            codes, scale = quantize_input(x_rows, quant)
            rows = [codes]
            if scale.dim() == 2:
                rows.append(scale)
            else:
                static_scale = scale
        ids_rows = ids_N[order].to(torch.int32).unsqueeze(1)
        layout = _row_layout([*rows, ids_rows])
        send = _pack(rows)
        if slots is not None:
            # Padding rows are zero bytes routed to an expert of their destination; their results are never read.
            # (Padded as bytes: index_copy_ has no 8-bit float kernel on every device.)
            send = send.new_zeros(world * num_rows, send.shape[1]).index_copy_(0, slots, send)
            ids_rows = first.repeat_interleave(num_rows).unsqueeze(1).index_copy_(0, slots, ids_rows)
        send = torch.cat([send, _pack([ids_rows])], dim=1)
        recv = send.new_empty(send.shape[0] if slots is not None else sum(recv_splits), send.shape[1])
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        got = _unpack(recv, layout)
        x_n, ids_n1 = got[0], got[-1]
        scale_n = got[1] if len(got) == 3 else static_scale
        if not early:
            x_n, scale_n = quantize_input(x_n, quant)
        weights = None if apply_router_weight_on_input else topk_weights_TK.float()
        return PrepareResult(
            hidden_states=x_n, hidden_scale=scale_n,
            topk_weights=torch.ones(x_n.shape[0], 1, dtype=torch.float32, device=device), topk_ids=ids_n1,
            weights_applied=apply_router_weight_on_input, num_tokens=num_tokens, experts_out_dtype=x.dtype,
            handle=_AllToAllHandle(order, send_splits, recv_splits, slots, weights, top_k, x.dtype),
        )

    def finalize(self, output_TH: torch.Tensor, prep: PrepareResult) -> torch.Tensor:
        handle: _AllToAllHandle = prep.handle
        hidden = output_TH.shape[1]
        rows = len(handle.order) if handle.slots is None else output_TH.shape[0]
        back = output_TH.new_empty(rows, hidden)
        dist.all_to_all_single(back, output_TH.contiguous(), handle.send_splits, handle.recv_splits, group=self.group)
        if handle.slots is not None:
            back = back.index_select(0, handle.slots)
        y_N = torch.empty_like(back).index_copy_(0, handle.order, back).float()
        y_TKH = y_N.view(prep.num_tokens, handle.top_k, hidden)
        if handle.weights is not None:
            y_TKH = y_TKH * handle.weights.unsqueeze(-1)
        return y_TKH.sum(dim=1).to(handle.dtype)  # in a fixed order, rounded once


_DISPATCHES = {"allgather_reducescatter": AllGatherReduceScatter, "all_to_all": AllToAll}


def make_prepare_finalize(dispatch: str, *, num_experts: int, ep_size: int, ep_rank: int,
                          placement: str = "linear", group: dist.ProcessGroup | None = None) -> PrepareFinalize:
    """The expert-parallel ``PrepareFinalize`` named ``dispatch`` (``ParallelConfig.dispatch``)."""
    check_choice("dispatch", dispatch, DISPATCHES)
    return _DISPATCHES[dispatch](num_experts=num_experts, ep_size=ep_size, ep_rank=ep_rank, placement=placement,
                                 group=group)
