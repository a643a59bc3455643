"""RoutedExperts: the routed expert weights of one MoE layer, their quant method and their weight loader.

Parameters (unquantized; E = local experts):
    w13       [E, 2I, H]   gate rows [0, I) then up rows [I, 2I)   ([E, I, H] for non-gated relu2)
    w2        [E, H, I]
    w13_bias  [E, 2I]      optional
    w2_bias   [E, H]       optional
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn

from moekit._checks import (
    ACT_DTYPES,
    check_bool,
    check_choice,
    check_expert_map_values,
    check_layer_dtype,
    check_ndim,
    check_positive,
    check_signed_int_dtype,
    check_tensor,
)
from moekit.config import BACKENDS
from moekit.kernel import ModularKernel, PrepareFinalize, cpu_packed, make_kernel
from moekit.ops.activation import Activation, resolve_activation
from moekit.quant.base import INDEX_SUFFIXES, MoEQuantMethod, loaded_dtype_refusal, refusal_error
from moekit.quant.unquantized import UnquantizedMoEMethod

SHARD_IDS = ("w1", "w2", "w3")


class RoutedExperts(nn.Module):
    """The routed experts. ``forward(x_TH, topk_weights_TK, topk_ids_TK)`` returns ``[T, H]``.

    Args:
        num_experts: experts held by this module (global count when ``expert_map`` is None).
        expert_map: optional [E_global] int tensor mapping a global expert id to a local one (-1: elsewhere);
            ``topk_ids`` and ``weight_loader``'s ``expert_id`` are then global ids.
        backend: ``auto`` | ``torch`` | ``triton``; resolved per call from the input's device.
        prepare_finalize: the dispatch around the experts (None: local, one rank); an expert-parallel one comes
            from ``moekit.distributed`` (``MoE(config, parallel=...)`` builds it).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str | Activation = "silu",
        bias: bool = False,
        apply_router_weight_on_input: bool = False,
        quant_method: MoEQuantMethod | None = None,
        expert_map: torch.Tensor | None = None,
        backend: str = "auto",
        prepare_finalize: PrepareFinalize | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size)):
            check_positive(name, value)
        check_positive("intermediate_size", intermediate_size)
        check_choice("backend", backend, BACKENDS)
        check_bool("bias", bias)
        check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
        check_layer_dtype(dtype)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = resolve_activation(activation)
        self.has_bias = bias
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.backend = backend
        if prepare_finalize is not None and not isinstance(prepare_finalize, PrepareFinalize):
            raise TypeError(f"prepare_finalize: expected a moekit.PrepareFinalize or None, got "
                            f"{type(prepare_finalize).__name__}")
        self.prepare_finalize = prepare_finalize
        if expert_map is not None:
            check_ndim("expert_map", expert_map, 1, "[E_global]")
            check_signed_int_dtype("expert_map", expert_map)
            check_expert_map_values(expert_map, num_experts)
            local = int((expert_map >= 0).sum())
            if local != num_experts:
                raise ValueError(f"expert_map: expected {num_experts} local experts (entries >= 0), got {local}")
            expert_map = expert_map.to(device=device, dtype=torch.int32)
        self.register_buffer("expert_map", expert_map, persistent=False)
        # EPLB (redundant experts): the logical (checkpoint) expert each local slot holds; None when slots are
        # experts. A plain tuple, not a buffer: it must not travel with the weights in a rearrangement.
        self._slot_experts: tuple[int, ...] | None = None
        self._num_logical: int | None = None
        # (parameter, expert, shard) written through weight_loader under the current quant method since the last
        # process_weights_after_loading: what it checks against the method's companions (codes loaded without
        # their scales). Writes under another method (float weights later quantized by moekit.quantize) don't count.
        self._loaded_shards: set[tuple[str, int, str]] = set()
        self._loaded_under: object | None = None
        self.quant_method = quant_method if quant_method is not None else UnquantizedMoEMethod()
        # The activation dtype the layer expects; quantized weights may be stored in another (see params_dtype).
        self._params_dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.quant_method.create_weights(
            self,
            num_experts=num_experts,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            params_dtype=self._params_dtype,
            device=torch.device(device) if device is not None else None,
        )

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        try:
            return self._apply_keeping_codes(fn, recurse)
        finally:  # a move or cast: the CPU packs of the old weights must not outlive them
            self.weights_changed()

    def _apply_keeping_codes(self, fn, recurse):  # noqa: ANN001, ANN202
        stored = [n for n in self.quant_method.stored_params if self._parameters.get(n) is not None]
        if not stored:
            return super()._apply(fn, recurse)
        # A cast of a quantized layer is a cast of its activations: the codes and their scales keep their dtypes
        # and only follow the device; the biases and the layer's activation dtype follow the cast.
        order = list(self._parameters)
        kept = {n: self._parameters.pop(n) for n in stored}
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.empty(0, dtype=self._params_dtype, device=kept[stored[0]].device))
            for param in kept.values():
                param.data = param.data.to(probe.device)
        finally:
            params = {n: kept[n] if n in kept else self._parameters[n] for n in order}
            self._parameters.clear()
            self._parameters.update(params)
        if probe.dtype in ACT_DTYPES:
            self._params_dtype = probe.dtype
        return self

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # copy.deepcopy and pickle rebuild a Parameter from its tensor alone, dropping ``weight_loader``: attach the
        # loaders of this (new) layer again, so a copied layer still loads checkpoints into its own weights (with
        # the quant method's own loader where it has one: GPTQ's split axis is not the layer's).
        for name, param in self.named_parameters(recurse=False):
            own = self.quant_method.weight_loader_for(self, name)
            param.weight_loader = self.weight_loader if own is None else own

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              unexpected_keys, error_msgs) -> None:
        # nn.Module copies any dtype into any other: another scheme's codes with equal keys and shapes (fp8 into
        # int8, int8 into uint8) became other numbers. The stored tensors load as through weight_loader: codes from
        # their own dtype, scales only where they are held exactly. A refusal leaves this layer untouched.
        refused = []
        stored = self.quant_method.stored_params
        for name, param in self._parameters.items():
            source = state_dict.get(prefix + name)
            if param is None or not isinstance(source, torch.Tensor):
                continue  # missing or not a tensor: nn.Module's own reports
            if name in stored:
                refusal = loaded_dtype_refusal(param.dtype, source, index=name.endswith(INDEX_SUFFIXES))
                if refusal is not None:
                    refused.append(str(refusal_error(refusal, f"state_dict[{prefix + name!r}]", "the tensor", name,
                                                     param.dtype, source.dtype, self.quant_method.name)))
            elif param.is_floating_point() and (not source.is_floating_point() or source.element_size() == 1):
                # Float weights load from any other float dtype, as through weight_loader; 8-bit codes (another
                # layer's quantized state) mean nothing without their scales.
                refused.append(f"state_dict[{prefix + name!r}]: expected float values for {name} (quant method "
                               f"{self.quant_method.name!r}), got {str(source.dtype).removeprefix('torch.')} (codes "
                               "of a quantized layer? build this layer with its quant method)")
        if refused:
            error_msgs.extend(refused)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # A state dict writes whole tensors, scales with their codes: the weight_loader record no longer applies.
        self._loaded_shards.difference_update({r for r in self._loaded_shards if prefix + r[0] in state_dict})

    @property
    def params_dtype(self) -> torch.dtype:
        """The activation dtype the layer expects.

        Unquantized weights are stored in it, so it is read from them: a dtype fixed at construction went stale
        after ``layer.to(torch.bfloat16)``/``.half()`` (or a cast of shared parameters) and the layer then
        rejected every input. A quantized method stores its weights in another dtype and keeps the given one.
        """
        if not self.quant_method.quant_params(self).is_quantized:
            return self.w13.dtype
        return self._params_dtype

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, activation={self.activation.name}, "
            f"bias={self.has_bias}, quant={self.quant_method.name}, backend={self.backend}"
        )

    def kernel_for(self, x: torch.Tensor, backend: str | None = None) -> ModularKernel:
        """The modular kernel for ``x``: ``backend`` (default: the layer's) inside the layer's prepare/finalize."""
        kernel = make_kernel(self.backend if backend is None else backend, x.device)
        if self.prepare_finalize is None:
            return kernel
        return ModularKernel(self.prepare_finalize, kernel.experts)  # stateless and cheap: built per call

    def forward(
        self,
        x_TH: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        *,
        shared_experts: nn.Module | None = None,
        shared_experts_input: torch.Tensor | None = None,
        check_ids: bool = True,
    ) -> torch.Tensor:
        check_bool("check_ids", check_ids)
        if x_TH.device.type == "cpu" and not torch.compiler.is_compiling():
            # The torch backend may run these weights packed (moekit.kernel.cpu_packed); a compiled graph keeps
            # to what eager calls marked.
            cpu_packed.track(self.w13, self.w2)
        return self.quant_method.apply(
            self, x_TH, topk_weights_TK, topk_ids_TK, shared_experts, shared_experts_input, check_ids=check_ids
        )

    def record_loaded(self, name: str, expert_id: int, shard_id: str) -> None:
        """Note that ``weight_loader`` (or a quant method's own loader) wrote shard ``shard_id`` of ``expert_id``
        into parameter ``name`` (``process_weights_after_loading`` checks the method's companions)."""
        if self._loaded_under is not self.quant_method:
            self._loaded_shards.clear()
            self._loaded_under = self.quant_method
        self._loaded_shards.add((name, expert_id, shard_id))

    def process_weights_after_loading(self) -> None:
        if self._loaded_under is not self.quant_method:
            self._loaded_shards.clear()
        loaded = self._loaded_shards
        companions = self.quant_method.companions
        # Both ways: codes without their scales, or scales (zero points) without their codes.
        missing = sorted({(c, e, s) for n, e, s in loaded for c in companions.get(n, ()) if (c, e, s) not in loaded}
                         | {(n, e, s) for n, cs in companions.items() for c, e, s in loaded
                            if c in cs and (n, e, s) not in loaded})
        if missing:
            name, expert, shard = missing[0]
            raise ValueError(f"{name}: expert {expert} shard {shard}: not loaded through weight_loader while the "
                             f"tensors it goes with were ({len(missing)} such (parameter, expert, shard) in all); "
                             f"{self.quant_method.name} codes and their scales (zero points) load together, or the "
                             "missing one computes with its initial values. Load every tensor its "
                             "checkpoint_tensors() names (expert_params_mapping(..., tensors=...))")
        self.quant_method.process_weights_after_loading(self)
        loaded.clear()
        self.weights_changed()

    def weights_changed(self) -> None:
        """Say that the expert weights were written in a way their version counter does not see (through
        ``.data``, a ``torch.distributed`` collective, numpy): what the CPU path packed from them is dropped
        (``moekit.kernel.cpu_packed``). moekit's own loaders call it; in-place writes under ``torch.no_grad``
        and ``load_state_dict`` need no call."""
        cpu_packed.forget(*self.parameters(recurse=False))

    @torch.no_grad()
    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str, expert_id: int
    ) -> None:
        """Copy one expert's checkpoint tensor into ``param`` (``w13``, ``w2``, their biases or, for quantized
        methods, their scales ``w13_scale``/``w2_scale``).

        ``shard_id``: ``w1`` (gate, rows [0, I) of w13), ``w3`` (up, rows [I, 2I)), ``w2`` (down). For the
        non-gated ``relu2`` activation ``w1`` fills all I rows of w13 and ``w3`` does not exist. ``expert_id``
        is global; an expert that ``expert_map`` places on another rank is skipped. With redundant experts
        (``set_slot_experts``) it is the logical expert, copied into every local slot that holds it.
        """
        check_choice("shard_id", shard_id, SHARD_IDS)
        check_tensor("loaded_weight", loaded_weight)
        slots = self._local_slots(expert_id)
        if not slots:
            return
        # w13, w2, their biases and a quant method's scales (w13_scale, w2_scale): grouped by name.
        name = next((n for n, p in self.named_parameters(recurse=False) if p is param), None)
        is_w13, is_w2 = name is not None and name.startswith("w13"), name is not None and name.startswith("w2")
        if not (is_w13 or is_w2):
            names = [n for n, _ in self.named_parameters(recurse=False)]
            raise ValueError(f"param: expected one of this layer's parameters {names}")
        if (shard_id == "w2") != is_w2:
            raise ValueError(f"shard_id: {shard_id!r} does not load into {name!r} (w1/w3 -> w13*, w2 -> w2*)")
        own = getattr(param, "weight_loader", None)
        delegate = own is not None and own != self.weight_loader
        if not delegate and (param.dim() == 0 or (is_w13 and self.activation.is_gated and param.dim() == 1)):
            # A per-tensor scale reduced over shards (or over experts): there is no expert's shard to write.
            raise ValueError(f"{name}: {tuple(param.shape)} was merged by process_weights_after_loading (or "
                             "moekit.quantize) and takes no per-expert shard; load into a freshly built layer")
        try:
            if delegate:
                # The quant method's loader for this parameter (its split axis, its dtype checks): both entry
                # points must refuse the same inputs, or a float written through this one would become codes.
                own(param, loaded_weight, shard_id, expert_id)
                return
            for local_id in slots:  # every replica of the expert on this rank gets its own copy
                self._load_into(name, param.data[local_id], loaded_weight, shard_id, expert_id, is_w13)
            self.record_loaded(name, expert_id, shard_id)
        finally:  # writes through .data: the version counter does not see them
            self.weights_changed()

    def _load_into(self, name: str, dest: torch.Tensor, loaded_weight: torch.Tensor,
                   shard_id: str, expert_id: int, is_w13: bool) -> None:
        if is_w13 and self.activation.is_gated:
            # Gate rows first, then up rows, in every w13* parameter (I rows, ⌈I/128⌉ block-scale rows, ...).
            half = dest.shape[0] // 2
            dest = dest[:half] if shard_id == "w1" else dest[half:]
        elif shard_id == "w3":
            raise ValueError(f"shard_id: 'w3' (up) does not exist for the non-gated activation {self.activation.name!r}")
        if dest.numel() == 1 == loaded_weight.numel():
            loaded_weight = loaded_weight.reshape(dest.shape)  # a per-tensor scale: [1] in some formats, [] in others
        if tuple(loaded_weight.shape) != tuple(dest.shape):
            raise ValueError(
                f"loaded_weight: expected shape {tuple(dest.shape)} for {name}[{expert_id}] shard {shard_id!r}, "
                f"got {tuple(loaded_weight.shape)}"
            )
        if name in self.quant_method.stored_params:
            refusal = loaded_dtype_refusal(dest.dtype, loaded_weight, index=name.endswith(INDEX_SUFFIXES))
            if refusal is not None:
                raise refusal_error(refusal, "loaded_weight", f"{name}[{expert_id}] shard {shard_id!r}", name,
                                    dest.dtype, loaded_weight.dtype, self.quant_method.name)
        elif not loaded_weight.is_floating_point() or loaded_weight.element_size() == 1:
            # Float weights (and biases) load from any float dtype, rounded as a Linear's would be; 8-bit codes
            # mean nothing without their scales.
            dtype = str(loaded_weight.dtype).removeprefix("torch.")
            raise TypeError(f"loaded_weight: expected dtype {str(dest.dtype).removeprefix('torch.')} for {name} "
                            f"(or another float dtype, rounded into it; quant method {self.quant_method.name!r}), "
                            f"got {dtype}")
        dest.copy_(loaded_weight)

    def set_slot_experts(self, slot_experts: Sequence[int] | None, num_logical: int | None = None) -> None:
        """EPLB: the logical expert held by each local slot (``[num_experts]`` ids in ``[0, num_logical)``), so
        that ``weight_loader`` and ``held_experts`` speak of logical (checkpoint) experts while ``expert_map``
        and ``topk_ids`` speak of physical slots. None restores slots = experts. ``MoE`` sets it at construction
        and after each rearrangement."""
        if slot_experts is None:
            self._slot_experts = self._num_logical = None
            return
        check_positive("num_logical", num_logical)
        ids = tuple(int(e) for e in slot_experts)
        if len(ids) != self.num_experts:
            raise ValueError(f"slot_experts: expected {self.num_experts} ids (one per local slot), got {len(ids)}")
        if ids and not all(0 <= e < num_logical for e in ids):
            raise ValueError(f"slot_experts: expected ids in [0, num_logical={num_logical}), got {list(ids)}")
        self._slot_experts, self._num_logical = ids, num_logical

    def held_experts(self) -> tuple[int, list[int] | None]:
        """``(E, held)``: the number of logical (checkpoint) experts and the one each local slot holds, in local
        order (a replica appears once per slot), or None when every expert is local in order: what a loader
        reads for this layer."""
        if self._slot_experts is not None:
            return self._num_logical, list(self._slot_experts)
        if self.expert_map is None:
            return self.num_experts, None
        held = (self.expert_map >= 0).nonzero().flatten()
        return self.expert_map.shape[0], held[torch.argsort(self.expert_map[held])].tolist()

    def _local_slots(self, expert_id: int) -> list[int]:
        """The local slots that hold logical expert ``expert_id`` (none: it lives on another rank)."""
        # An int, numpy int or 0-d integer tensor; a bool would index param.data[True] (a new leading dim).
        try:
            if isinstance(expert_id, bool):
                raise TypeError
            expert_id = operator.index(expert_id)
        except TypeError:
            raise TypeError(f"expert_id: expected an int, got {type(expert_id).__name__}") from None
        num_global, held = self.held_experts()
        if not 0 <= expert_id < num_global:
            raise ValueError(f"expert_id: expected in [0, {num_global}), got {expert_id}")
        if held is None:
            return [expert_id]
        return [slot for slot, e in enumerate(held) if e == expert_id]
