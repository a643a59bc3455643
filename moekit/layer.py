"""The MoE layer.

    out = routed_experts(x, select_experts(gate(x))) + shared_experts(x)

``forward`` does exactly that: the router Linear gives logits [T, E]; ``select_experts`` turns them into
top-k weights and ids; ``RoutedExperts`` runs the modular kernel, which receives the shared experts on the call
and adds their output.

Shape legend (used across moekit): T tokens, H hidden, I intermediate per expert, E experts, K top-k,
N = T·K routed rows. ``x_TH`` is [T, H], ``w13_E2IH`` is [E, 2I, H].
"""

from __future__ import annotations

from contextlib import nullcontext

from dataclasses import dataclass, fields

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moekit._checks import (
    check_layer_dtype,
    check_ndim,
    check_shape,
    check_tensor,
    values_checkable,
)
from moekit.config import MoEConfig, ParallelConfig
from moekit.distributed import (
    ExpertLoadRecorder,
    TensorParallel,
    check_phy2log,
    check_phy2log_covers,
    check_rearrangeable,
    determine_expert_map,
    logical_to_physical,
    make_prepare_finalize,
    parallel_groups,
    rearrange_expert_weights,
)
from moekit.distributed.consistency import RankCheck, flatten_fields
from moekit.kernel import LocalPrepareFinalize
from moekit.quant.base import MoEQuantMethod
from moekit.routed_experts import RoutedExperts
from moekit.router import route, select_experts
from moekit.shared_experts import SharedExperts


# The state-dict key of an EPLB layer's placement (phy2log): which logical expert each saved slot holds.
PLAN_KEY = "eplb_phy2log"


def _save_plan(module: MoE, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if module.phy2log is not None:
        state_dict[prefix + PLAN_KEY] = module.phy2log.detach().clone()


class MoE(nn.Module):
    """A Mixture-of-Experts layer: router gate + ``RoutedExperts`` + optional ``SharedExperts``.

    ``parallel`` (a ``moekit.ParallelConfig``) spreads the routed experts over the ranks of ``process_group``
    (None: the default group, the ranks of ``torchrun``): each rank holds ``determine_expert_map``'s share and
    calls the layer on its own tokens, every rank on every call (the dispatch is collective), under
    ``torch.no_grad()``/``torch.inference_mode()``. With ``tp_size > 1`` each rank holds a slice of I of its
    experts (and of w13_bias and the 8-bit scales; w2_bias whole, added by tp_rank 0 only) and the ranks of a TP
    group (same tokens) sum their outputs with an all-reduce. With
    ``num_redundant_experts = r`` (EPLB) the EP ranks hold R = E + r physical slots, R / ep_size each (slot p:
    expert p % E at first); each routed (token, k) goes to one slot of its expert (``logical_to_physical``, maps
    ``log2phy``/``logcnt``), loaders fill every slot of an expert, and ``rearrange(new_phy2log)`` applies a
    ``rebalance_experts`` plan. At the first call (outside graph capture and compilation) the ranks check with
    one all-gather that they built the layer alike (``moekit.distributed.consistency``), and the ranks of a TP
    group that they got the same tokens, and raise naming what differs.

    ``forward(hidden_states [..., H], router_logits=None, *, topk_weights=None, topk_ids=None)`` returns
    the same shape and dtype. Give ``router_logits`` [T, E] to skip the gate, or ``topk_weights``/``topk_ids``
    [T, K] to skip routing altogether.
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        quant_method: MoEQuantMethod | None = None,
        parallel: ParallelConfig | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a moekit.MoEConfig, got {type(config).__name__}")
        check_layer_dtype(dtype)
        parallel = ParallelConfig() if parallel is None else parallel
        if not isinstance(parallel, ParallelConfig):
            raise TypeError(f"parallel: expected a moekit.ParallelConfig or None, got {type(parallel).__name__}")
        self.config = config
        self.parallel = parallel
        # Expert parallelism: this rank holds only its experts (global ids map to local ones through expert_map)
        # and the dispatch moves tokens to them; the router and the shared experts are replicated on every rank.
        # Tensor parallelism: each rank of a TP group holds a slice of I of its experts; an all-reduce sums them.
        num_local, inter, expert_map, prepare_finalize = config.num_experts, config.intermediate_size, None, None
        # EPLB: R = E + r physical slots, rank-major over the EP ranks; the dispatch and expert_map see slots, and
        # forward maps each routed logical id to one of its expert's slots (logical_to_physical).
        num_slots = config.num_experts + parallel.num_redundant_experts
        if num_slots % parallel.ep_size and parallel.num_redundant_experts:
            raise ValueError(f"parallel.num_redundant_experts: expected E + r divisible by ep_size="
                             f"{parallel.ep_size} (every rank holds as many slots), got E={config.num_experts} + "
                             f"r={parallel.num_redundant_experts} = {num_slots}")
        if parallel.tp_size > 1:
            _check_tensor_parallel(config, parallel, quant_method)
            inter //= parallel.tp_size
        if parallel.ep_size > 1 and getattr(quant_method, "static_input_scales", False):
            # Each rank would merge only its own experts' input scales into the layer's one, and a row quantized
            # on one rank would be read with another rank's scale (3.8x off in a 2-rank check).
            raise ValueError("quant_method: static activation scales (static_input_scales=True) with expert "
                             f"parallelism (parallel.ep_size={parallel.ep_size}) are not supported; use dynamic "
                             "activation scales or ep_size=1")
        if parallel.world_size > 1:
            ep_group, tp_group = parallel_groups(parallel, process_group)
            if parallel.ep_size > 1:
                prepare_finalize = make_prepare_finalize(
                    parallel.dispatch, num_experts=num_slots, ep_size=parallel.ep_size,
                    ep_rank=parallel.ep_rank, placement=parallel.placement, group=ep_group,
                )
                num_local, expert_map = determine_expert_map(
                    parallel.ep_size, parallel.ep_rank, num_slots, parallel.placement
                )
            if parallel.tp_size > 1:
                prepare_finalize = TensorParallel(prepare_finalize or LocalPrepareFinalize(), tp_size=parallel.tp_size,
                                                  tp_rank=parallel.tp_rank, group=tp_group)
        kw = {"dtype": dtype, "device": device}
        # router_fp32 (DeepSeek-V3): the checkpoint keeps the router fp32 (transformers'
        # _keep_in_fp32_modules_strict); a gate in the layer's dtype would round it and change routing.
        gate_dtype = torch.float32 if config.router_fp32 else dtype
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=config.router_bias, dtype=gate_dtype,
                              device=device)
        if config.routing.correction_bias:
            bias = torch.zeros(config.num_experts, dtype=torch.float32, device=device)
            self.register_buffer("e_score_correction_bias", bias)
        else:
            self.e_score_correction_bias = None
        self.routed_experts = RoutedExperts(
            num_local,
            config.hidden_size,
            inter,
            activation=config.activation,
            bias=config.bias,
            apply_router_weight_on_input=config.routing.apply_weights_on_input,
            quant_method=quant_method,
            expert_map=expert_map,
            backend=config.backend,
            prepare_finalize=prepare_finalize,
            **kw,
        )
        self._load_recorder: _RecorderHook | None = None
        # The ranks agree on how they built the layer: checked collectively at the first call (``_rank_fields``).
        self._rank_check = None
        if parallel.world_size > 1:
            self._rank_check = RankCheck(process_group, tp_group, tensor_parallel=parallel.tp_size > 1)
        for name in ("phy2log", "log2phy", "logcnt"):  # the EPLB maps (_set_plan), None without redundant experts
            self.register_buffer(name, None, persistent=False)
        if parallel.num_redundant_experts:
            # Refused here, not at the first rebalancing: a quant method whose per-expert state cannot move.
            check_rearrangeable(self.routed_experts)
            # vLLM's initial layout: slot p holds expert p for p < E, then replicas p % E.
            self._set_plan(torch.arange(num_slots) % config.num_experts)
            # The slots' weights are saved in the plan's order: the plan goes with them (_load_from_state_dict).
            self.register_state_dict_post_hook(_save_plan)
        self.shared_experts = None
        if config.has_shared_experts:
            self.shared_experts = SharedExperts(
                config.hidden_size,
                config.shared_intermediate_size,
                activation=config.activation,
                gate=config.shared_expert_gate,
                **kw,
            )

    def _rank_fields(self) -> dict[str, object]:
        """What every rank of a parallel layer must have built alike (``moekit.distributed.consistency``): the
        config (its backend aside: a per-rank choice of kernels, not of results), the parallel layout without the
        ranks, the experts' dtype and quantization (read now: ``moekit.quantize`` may have changed it)."""
        out: dict[str, object] = {}
        for f in fields(self.config):
            if f.name != "backend":
                out.update(flatten_fields(f"config.{f.name}", getattr(self.config, f.name)))
        for name in ("ep_size", "tp_size", "placement", "dispatch", "num_redundant_experts"):
            out[f"parallel.{name}"] = getattr(self.parallel, name)
        out["dtype"] = self.routed_experts.params_dtype
        method = self.routed_experts.quant_method
        out["quantization"] = method.quant_params(self.routed_experts).describe()
        out["quantization.static_input_scales"] = bool(getattr(method, "static_input_scales", False))
        if self.phy2log is not None:  # EPLB: a loaded plan routes to its slots (one sync, at the first call)
            out["eplb plan"] = tuple(self.phy2log.tolist())
        return out

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        layer: int | None = None,
        *,
        prefix: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
        parallel: ParallelConfig | None = None,
        process_group: dist.ProcessGroup | None = None,
        dequantize_act_order: bool = False,
    ) -> MoE:
        """One MoE block of a transformers checkpoint directory, built and loaded from it.

        The config comes from ``config.json`` (``MoEConfig.from_hf``), the quant method from its
        ``quantization_config`` when present (``moekit.quant.get_quant_method``); then ``moekit.loading.load_moe``
        reads the block's tensors only (8-bit codes with their scales, static ``input_scale``) and runs
        ``process_weights_after_loading``. The load is strict (a missing or unexpected tensor raises), so the
        routed experts' float weights are not randomly initialized first (``quant.base.weights_from_checkpoint``).

        Args:
            layer: which MoE block: its decoder layer index (``model.layers.<layer>.mlp``; a dense decoder layer,
                e.g. DeepSeek-V3's first three, is refused naming the sparse ones); optional when there is one.
            prefix: the block's checkpoint prefix instead (``model.layers.3.mlp``).
            dtype: the activation dtype; by default config.json's ``dtype``/``torch_dtype``.
            parallel, process_group: expert parallelism as in ``MoE(config, parallel=..., process_group=...)``;
                only this rank's experts are read from the full checkpoint.
            dequantize_act_order: load a GPTQ act-order checkpoint (``desc_act=True`` with groups, refused
                otherwise) with its experts dequantized to ``dtype`` (an unquantized layer; a warning says so).
        """
        if cls is not MoE:
            raise TypeError(f"from_pretrained builds a moekit.MoE, not a {cls.__name__}")
        # Imported here: moekit.pretrained builds on this module (loading sits above the modules, never below).
        from moekit.pretrained import from_pretrained

        return from_pretrained(path, layer, prefix=prefix, dtype=dtype, device=device, backend=backend,
                               parallel=parallel, process_group=process_group,
                               dequantize_act_order=dequantize_act_order)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to(dtype)/.half()/.bfloat16() cast every floating buffer, but the correction bias only ranks experts, by
        # differences far below bf16's resolution: keep its fp32 values (on the new device), as the constructor
        # and DeepSeek-V3/vLLM do. A cast to a wider dtype is left alone.
        # The same for an fp32 router (router_fp32: DeepSeek-V3 keeps it fp32; rounded to bf16 it routed ~1% of
        # tokens to other experts).
        # A cast to a dtype the layer cannot compute in (.double()) is refused before anything moves: accepted, it
        # left a layer that refused every input at its first call.
        probe = fn(torch.empty(0, dtype=torch.float32, device=self.gate.weight.device))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point() and probe.dtype != torch.float32:
            check_layer_dtype(probe.dtype)
        bias = self.e_score_correction_bias
        gate = [(p, p.detach()) for p in self.gate.parameters()] if self.config.router_fp32 else []
        result = super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if bias is not None and new is not None and new.is_floating_point() and torch.finfo(new.dtype).bits < 32:
            self.e_score_correction_bias = bias.float().to(new.device)
        for param, old in gate:
            if param.is_floating_point() and torch.finfo(param.dtype).bits < 32:
                param.data = old.float().to(param.device)
        return result

    def router_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] for ``x_TH``."""
        if self.config.router_fp32:
            bias = None if self.gate.bias is None else self.gate.bias.float()
            # Under torch.autocast F.linear would run (and round) in the autocast dtype: what router_fp32 avoids.
            # (Devices without autocast, the meta device among them, refuse the context.)
            device = x_TH.device.type
            off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
            with off:
                return F.linear(x_TH.float(), self.gate.weight.float(), bias)
        if self.gate.weight.dtype != x_TH.dtype:  # e.g. an fp32 router weight kept in a bf16 checkpoint
            return F.linear(x_TH.to(self.gate.weight.dtype), self.gate.weight, self.gate.bias)
        return self.gate(x_TH)

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor | None = None,
        *,
        topk_weights: torch.Tensor | None = None,
        topk_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        check = self._rank_check
        if check is not None and not check.done and isinstance(hidden_states, torch.Tensor):
            # Once, first (before a rank can refuse its input and leave the others in a collective), outside graph
            # capture (it syncs). A compiled layer is never checked: a rank falling back to eager later would run
            # the collective alone.
            if torch.compiler.is_compiling():
                check.done = True
            elif values_checkable():
                check.run(self._rank_fields(), hidden_states, what="MoE")
        check_tensor("hidden_states", hidden_states)
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != cfg.hidden_size:
            raise ValueError(f"hidden_states: expected shape [..., H={cfg.hidden_size}], got {tuple(hidden_states.shape)}")
        expected = self.routed_experts.params_dtype
        if hidden_states.dtype != expected:
            # Checked against the experts, not the router: an fp32 router (router_fp32) serves bf16 layers.
            raise TypeError(
                f"hidden_states: expected dtype {str(expected).removeprefix('torch.')} (the experts' dtype), "
                f"got {str(hidden_states.dtype).removeprefix('torch.')}"
            )
        x_TH = hidden_states.reshape(-1, cfg.hidden_size)
        num_tokens = x_TH.shape[0]
        precomputed = topk_weights is not None or topk_ids is not None
        if precomputed:
            weights, ids = select_experts(router_logits, cfg.top_k, topk_weights=topk_weights, topk_ids=topk_ids)
            check_shape("topk_ids", ids, (num_tokens, cfg.top_k), f"[T, K] (hidden_states has T={num_tokens})")
        else:
            if router_logits is None:
                router_logits = self.router_logits(x_TH)
            check_ndim("router_logits", router_logits, 2, "[T, E]")
            check_shape("router_logits", router_logits, (num_tokens, cfg.num_experts), "[T, E]")
            weights, ids = route(
                router_logits,
                cfg.top_k,
                cfg.routing,
                e_score_correction_bias=self.e_score_correction_bias,
                hidden_states=x_TH,
            )
        # Precomputed ids index the load recorder and the EPLB maps before the experts check them: check first
        # (routed ids are in range by construction).
        uses_ids = self._load_recorder is not None or self.log2phy is not None
        if precomputed and uses_ids and ids.numel() and values_checkable():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= cfg.num_experts:
                raise ValueError(f"topk_ids: expected values in [0, E={cfg.num_experts}), got values in "
                                 f"[{lo}, {hi}]")
        if self._load_recorder is not None:
            hook = self._load_recorder
            hook.recorder.record(hook.layer, ids)  # logical ids, this rank's tokens (device-side, no sync)
        if self.log2phy is not None:
            # Offset by the rank: at decode (a token or two per rank) every rank would otherwise hash the same
            # entry indices and send an expert's rows to the same replica. From shapes only: no sync, graph-safe.
            ids = logical_to_physical(ids, self.log2phy, self.logcnt, offset=self.parallel.ep_rank * ids.numel())
        out_TH = self.routed_experts(
            x_TH,
            weights,
            ids,
            shared_experts=self.shared_experts,
            shared_experts_input=x_TH,
            check_ids=precomputed,
        )
        return out_TH.view(hidden_states.shape)

    def record_load(self, recorder: ExpertLoadRecorder | None, layer: int = 0) -> None:
        """Count every call's routed logical ids into ``recorder``'s row ``layer`` (None: stop recording). Each
        rank records its own tokens; the caller sums the loads over the EP group before planning. A deep copy of
        the layer records into the same recorder (one model-wide counter, like the shared dispatch)."""
        if recorder is None:
            self._load_recorder = None
            return
        if not isinstance(recorder, ExpertLoadRecorder):
            raise TypeError(f"recorder: expected a moekit.distributed.ExpertLoadRecorder or None, got "
                            f"{type(recorder).__name__}")
        if recorder.num_experts != self.config.num_experts:
            raise ValueError(f"recorder: expected num_experts={self.config.num_experts} (the layer's logical "
                             f"experts), got {recorder.num_experts}")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < recorder.num_layers:
            raise ValueError(f"layer: expected an int in [0, {recorder.num_layers}), got {layer!r}")
        self._load_recorder = _RecorderHook(recorder, layer)

    def _set_plan(self, phy2log: torch.Tensor) -> None:
        """Install the placement ``phy2log`` [R]: the maps forward routes by, and which logical expert each local
        slot holds (for the loaders)."""
        phy2log = phy2log.to("cpu", torch.int64).clone()  # never the caller's tensor: it may reuse it for a plan
        num_experts = self.config.num_experts
        logcnt = torch.bincount(phy2log, minlength=num_experts)
        order = torch.argsort(phy2log, stable=True)  # slots grouped by expert, ascending within one
        experts = phy2log[order]
        replica = torch.arange(phy2log.numel()) - (torch.cumsum(logcnt, 0) - logcnt)[experts]
        # As wide as any plan can need (an expert in its own slot and every redundant one), so that a new plan is
        # written into the same storage: a CUDA graph captured through forward reads these buffers by address
        # and must route by the plan rearrange installed. Columns past an expert's logcnt are never read.
        log2phy = torch.full((num_experts, phy2log.numel() - num_experts + 1), -1, dtype=torch.int64)
        log2phy[experts, replica] = order
        # Non-persistent buffers: they follow .to(device) but a state dict stays the one without EPLB.
        for name, value in (("phy2log", phy2log), ("log2phy", log2phy), ("logcnt", logcnt)):
            held = getattr(self, name)
            if held is None:
                self.register_buffer(name, value.to(self.gate.weight.device), persistent=False)
            else:
                held.copy_(value)  # in place: same shapes by construction
        num_local = self.routed_experts.num_experts
        first = self.parallel.ep_rank * num_local
        self.routed_experts.set_slot_experts(phy2log[first:first + num_local].tolist(), num_experts)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              unexpected_keys, error_msgs) -> None:
        # An EPLB layer's state holds its slots in the plan they were saved under (rearrange moves them): install
        # that plan before the slots load, or a layer with another plan would route to the wrong weights. A state
        # without it (saved before plans were saved) keeps the layer's own plan.
        key = prefix + PLAN_KEY
        plan = state_dict.get(key)
        if plan is not None and self.phy2log is not None:
            try:  # rearrange's own checks of a plan: [R] ints, every logical expert in a slot
                plan = check_phy2log(key, plan, self.phy2log.numel())
                check_phy2log_covers(key, plan, self.config.num_experts)
            except (TypeError, ValueError) as err:
                error_msgs.append(str(err))
            else:
                self._set_plan(plan)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.phy2log is not None and key in unexpected_keys:
            unexpected_keys.remove(key)

    @torch.no_grad()
    def rearrange(self, new_phy2log: torch.Tensor) -> None:
        """Apply an EPLB placement: move the experts' weights so that physical slot p holds logical expert
        ``new_phy2log[p]`` (``rearrange_expert_weights``, collective: every rank of the EP group at once, with the
        same plan), then route by it. ``new_phy2log``: int [R], one layer of ``rebalance_experts``' phy2log; every
        logical expert in at least one slot. The output for the same logical ids is unchanged."""
        if self.phy2log is None:
            raise RuntimeError("rearrange: expected a layer built with parallel.num_redundant_experts > 0 (EPLB), "
                               f"got num_redundant_experts={self.parallel.num_redundant_experts}")
        # Every check of the plan runs inside rearrange_expert_weights' agreement step: a plan refused on one rank
        # alone raises on every rank instead of leaving the others in the collective.
        rearrange_expert_weights(self.routed_experts, self.phy2log, new_phy2log, ep_rank=self.parallel.ep_rank,
                                 ep_size=self.parallel.ep_size, process_group=self.routed_experts.prepare_finalize.group,
                                 num_logical=self.config.num_experts)
        self._set_plan(new_phy2log.detach().to("cpu", torch.int64))


def _check_tensor_parallel(config: MoEConfig, parallel: ParallelConfig, quant_method: MoEQuantMethod | None) -> None:
    if config.intermediate_size % parallel.tp_size:
        raise ValueError(f"parallel.tp_size: expected a divisor of intermediate_size={config.intermediate_size}, got "
                         f"{parallel.tp_size}")
    # Biases need nothing here: w13_bias is sliced with the w13 rows and w2_bias added once (TensorParallel). Each
    # quant method says which splits its tensors allow (blocks, groups, packed words) or refuses them all.
    if quant_method is not None:
        quant_method.check_tp_split(config.intermediate_size, parallel.tp_size)


@dataclass(frozen=True)
class _RecorderHook:
    """Where a layer records its loads. Deep copies share it: a copied model must not count into a private copy
    of the recorder that nothing reads."""

    recorder: ExpertLoadRecorder
    layer: int

    def __deepcopy__(self, memo: dict) -> _RecorderHook:
        return self
