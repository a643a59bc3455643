"""The modular kernel: prepare -> experts -> finalize, with shared experts passed in per call.

    x_TH, topk_weights_TK, topk_ids_TK
        │ PrepareFinalize.prepare     quantize / fold weights into x / (EP) dispatch to owning ranks
        ▼
    PrepareResult ──▶ Experts.apply   grouped GEMM 1 → activation → grouped GEMM 2 → weight → sum over K
        │ PrepareFinalize.finalize    (EP) combine rows back to their ranks
        ▼
    routed_TH  (+ shared_experts(shared_experts_input))   ──▶ out_TH

The kernel holds no per-layer state: weights, biases, quant scales and the shared-experts module all arrive as
arguments, so one kernel instance serves every layer of a model and it alone decides when the shared experts
run relative to the routed ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from moekit._checks import (
    ACT_DTYPES,
    check_bool,
    check_dtype,
    check_expert_map_values,
    check_int_dtype,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_signed_int_dtype,
    values_checkable,
)
from moekit.kernel.experts import Experts, needs_grad, requiring_grad
from moekit.kernel.prepare_finalize import PrepareFinalize
from moekit.ops.activation import Activation, resolve_activation
from moekit.ops.quantize import QDTYPES, expert_scale_shapes
from moekit.quant.params import UNQUANTIZED, QuantParams, check_group_weights

# Below this many tokens the routed experts are bandwidth-bound and leave SMs idle, so the shared experts
# run concurrently on a side stream; above it both saturate the GPU and overlapping only adds contention.
SHARED_OVERLAP_MAX_TOKENS = 1024


class ModularKernel:
    def __init__(
        self,
        prepare_finalize: PrepareFinalize,
        experts: Experts,
        *,
        shared_overlap_max_tokens: int = SHARED_OVERLAP_MAX_TOKENS,
    ) -> None:
        self.prepare_finalize = prepare_finalize
        self.experts = experts
        self.shared_overlap_max_tokens = shared_overlap_max_tokens

    def __repr__(self) -> str:
        return f"ModularKernel({type(self.prepare_finalize).__name__}, {type(self.experts).__name__})"

    def apply(
        self,
        hidden_states: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        activation: str | Activation = "silu",
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
        expert_map: torch.Tensor | None = None,
        apply_router_weight_on_input: bool = False,
        quant: QuantParams = UNQUANTIZED,
        shared_experts: Callable[[torch.Tensor], torch.Tensor] | None = None,
        shared_experts_input: torch.Tensor | None = None,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """Routed experts (+ shared experts) for ``hidden_states`` [T, H]; returns [T, H] in its dtype.

        ``shared_experts`` (any callable ``[T, H] -> [T, H]``) runs on ``shared_experts_input`` (default:
        ``hidden_states``) and its output is added. ``check_ids=False`` skips the value check of ``topk_ids``
        (a device-to-host sync), as do CUDA-graph capture and ``torch.compile`` (no sync is allowed there); ids
        from ``select_experts`` are always valid. Unchecked ids outside [0, E) are the caller's error: the torch
        backend drops their rows; the Triton backend may read stale workspace, or (the fused decode) the weights at
        that id's offset, anywhere in memory, and add what it finds to the output.
        """
        act = resolve_activation(activation)
        check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
        check_bool("check_ids", check_ids)
        if not isinstance(quant, QuantParams):
            raise TypeError(f"quant: expected a moekit QuantParams (UNQUANTIZED for float weights), got "
                            f"{type(quant).__name__}")
        check_expert_inputs(
            hidden_states, w13, w2, topk_weights, topk_ids,
            activation=act, w13_bias=w13_bias, w2_bias=w2_bias, expert_map=expert_map, quant=quant,
            check_ids=check_ids,
        )
        if shared_experts_input is not None:
            check_shape("shared_experts_input", shared_experts_input, tuple(hidden_states.shape), "[T, H]")
            check_same_device("shared_experts_input", shared_experts_input, "hidden_states", hidden_states)
        differentiable = {"hidden_states": hidden_states, "w13": w13, "w2": w2, "topk_weights": topk_weights,
                          "w13_bias": w13_bias, "w2_bias": w2_bias}
        grad = needs_grad(tuple(differentiable.values()))
        if grad and quant.is_quantized:
            # Returning a detached output would train nothing without a word. Named, because the tensor that
            # requires grad is often not the input: a trainable router gate makes topk_weights require it.
            raise ValueError(
                f"quant: quantized experts ({quant.weight_dtype}) have no backward, but "
                f"{requiring_grad(differentiable)}: run them under torch.no_grad()/torch.inference_mode() or "
                "detach it"
            )
        collective = self.prepare_finalize.collective
        if grad and collective:
            # The collectives of an expert-parallel dispatch are not differentiable: a backward would silently
            # miss every other rank's contribution.
            raise ValueError(
                f"{type(self.prepare_finalize).__name__}: an expert-parallel layer has no backward, but "
                f"{requiring_grad(differentiable)}: run it under torch.no_grad()/torch.inference_mode()"
            )
        num_tokens, hidden = hidden_states.shape
        # With no tokens of its own, a rank still joins the dispatch's collectives (the other ranks wait on it).
        if num_tokens == 0 and not grad and not collective:  # with a gradient, autograd needs the backend's output
            return hidden_states.new_empty((0, hidden))

        shared_in = hidden_states if shared_experts_input is None else shared_experts_input
        side = self._side_stream(hidden_states) if shared_experts is not None else None
        shared_out = None
        if side is not None:
            # Fork: the side stream waits for everything queued so far (shared_in is ready), then runs the
            # shared experts while this stream runs the routed ones. record_stream keeps the caching allocator
            # from handing either tensor's memory to someone else before the other stream is done with it.
            main = torch.cuda.current_stream(hidden_states.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                shared_out = shared_experts(shared_in)
            shared_in.record_stream(side)
        prep = self.prepare_finalize.prepare(
            hidden_states, topk_weights, topk_ids,
            apply_router_weight_on_input=apply_router_weight_on_input, quant=quant,
        )
        routed = self.experts.apply(
            prep.hidden_states, w13, w2, prep.topk_weights, prep.topk_ids,
            activation=act, w13_bias_E2I=w13_bias,
            w2_bias_EH=w2_bias if self.prepare_finalize.adds_w2_bias else None, expert_map_E=expert_map,
            quant=quant, hidden_scale=prep.hidden_scale, out_dtype=prep.experts_out_dtype or hidden_states.dtype,
        )
        out = self.prepare_finalize.finalize(routed, prep)
        if side is not None:
            main.wait_stream(side)  # join before the sum reads shared_out
            shared_out.record_stream(main)
        elif shared_experts is not None:
            shared_out = shared_experts(shared_in)
        if shared_out is None:
            return out
        # shared_experts is any callable: a [T, 1] or [H] result would broadcast into a wrong sum, so check it.
        if tuple(shared_out.shape) != (num_tokens, hidden):
            raise ValueError(
                f"shared_experts: expected an output of shape {(num_tokens, hidden)} [T, H], got {tuple(shared_out.shape)}"
            )
        # A shared MLP computing in a wider dtype must not promote the layer's output: sum, then round once.
        return (out + shared_out).to(hidden_states.dtype)

    def _side_stream(self, x: torch.Tensor) -> torch.cuda.Stream | None:
        if x.device.type != "cuda" or x.shape[0] > self.shared_overlap_max_tokens or torch.compiler.is_compiling():
            return None
        return _side_streams(x.device)


@functools.cache
def _side_streams(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device, shared by every kernel (streams are not per-layer state)."""
    return torch.cuda.Stream(device=device)


def check_expert_inputs(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: Activation,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    expert_map: torch.Tensor | None,
    quant: QuantParams,
    check_ids: bool,
) -> None:
    """Validate the arguments of ``fused_experts``/``ModularKernel.apply``; errors name the argument."""
    check_ndim("hidden_states", hidden_states, 2, "[T, H]")
    check_dtype("hidden_states", hidden_states, ACT_DTYPES)
    check_ndim("w13", w13, 3, "[E, 2I, H]")
    check_ndim("w2", w2, 3, "[E, H, I]")
    num_tokens, hidden = hidden_states.shape
    num_local, rows13, hidden13 = w13.shape
    if not quant.is_quantized:
        check_same_dtype("w13", w13, "hidden_states", hidden_states)
        check_same_dtype("w2", w2, "hidden_states", hidden_states)
    if quant.granularity == "group":
        check_group_weights(quant, w13, w2, hidden_states, gated=activation.is_gated)
    elif not quant.is_quantized or quant.weight_dtype in QDTYPES:
        if hidden13 != hidden:
            raise ValueError(
                f"hidden_states: expected hidden size H = {hidden13} (w13 [E, 2I, H] is {tuple(w13.shape)}), "
                f"got shape {tuple(hidden_states.shape)}"
            )
        if activation.is_gated and rows13 % 2:
            raise ValueError(
                f"w13: gated activation {activation.name!r} needs an even row count 2I, got shape {tuple(w13.shape)}"
            )
        inter = rows13 // 2 if activation.is_gated else rows13
        check_shape("w2", w2, (num_local, hidden, inter), f"[E, H, I] (w13 is {tuple(w13.shape)})")
        if quant.granularity is not None:
            _check_quant_scales(quant, w13, w2, hidden_states, inter=inter, gated=activation.is_gated)
    for name, t in (("w13", w13), ("w2", w2)):
        check_same_device(name, t, "hidden_states", hidden_states)
    check_ndim("topk_weights", topk_weights, 2, "[T, K]")
    check_ndim("topk_ids", topk_ids, 2, "[T, K]")
    check_dtype("topk_weights", topk_weights, ACT_DTYPES)
    check_int_dtype("topk_ids", topk_ids)
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(
            f"topk_ids: expected the shape of topk_weights {tuple(topk_weights.shape)}, got {tuple(topk_ids.shape)}"
        )
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"topk_ids: expected T = {num_tokens} rows (hidden_states is {tuple(hidden_states.shape)}), "
            f"got shape {tuple(topk_ids.shape)}"
        )
    for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        check_same_device(name, t, "hidden_states", hidden_states)
    if w13_bias is not None:  # a bool or integer bias ran as 0/1 or integer values, silently
        check_shape("w13_bias", w13_bias, (num_local, rows13), "[E, 2I]")
        check_dtype("w13_bias", w13_bias, ACT_DTYPES)
        check_same_device("w13_bias", w13_bias, "hidden_states", hidden_states)
    if w2_bias is not None:
        check_shape("w2_bias", w2_bias, (num_local, w2.shape[1]), "[E, H]")
        check_dtype("w2_bias", w2_bias, ACT_DTYPES)
        check_same_device("w2_bias", w2_bias, "hidden_states", hidden_states)
    num_global = num_local
    if expert_map is not None:
        check_ndim("expert_map", expert_map, 1, "[E_global]")
        check_signed_int_dtype("expert_map", expert_map)
        check_same_device("expert_map", expert_map, "hidden_states", hidden_states)
        num_global = expert_map.shape[0]
        if check_ids:
            check_expert_map_values(expert_map, num_local)
    if check_ids and topk_ids.numel() and values_checkable():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_global:
            raise ValueError(f"topk_ids: expected values in [0, E={num_global}), got values in [{lo}, {hi}]")



def _check_quant_scales(
    quant: QuantParams, w13: torch.Tensor, w2: torch.Tensor, hidden_states: torch.Tensor, *, inter: int, gated: bool
) -> None:
    """8-bit weights: storage dtype and the scales' shapes, dtype and device (moekit.quant.params' table)."""
    qdtype = QDTYPES[quant.weight_dtype]
    for name, t in (("w13", w13), ("w2", w2)):
        if t.dtype != qdtype:
            raise TypeError(f"{name}: expected dtype {str(qdtype).removeprefix('torch.')} for "
                            f"{quant.describe()}, got {str(t.dtype).removeprefix('torch.')}")
    shapes = expert_scale_shapes(quant.granularity, quant.block_shape, num_experts=w13.shape[0],
                                 hidden=hidden_states.shape[1], inter=inter, gated=gated)
    for name, t, shape in (("w13_scale", quant.w13_scale, shapes[0]), ("w2_scale", quant.w2_scale, shapes[1]),
                           ("a13_scale", quant.a13_scale, None), ("a2_scale", quant.a2_scale, None)):
        if t is None:
            continue
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"quant.{name}: expected shape {shape} for {quant.describe()} with w13 "
                             f"{tuple(w13.shape)}, w2 {tuple(w2.shape)}, got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"quant.{name}: expected dtype float32, got {str(t.dtype).removeprefix('torch.')}")
        check_same_device(f"quant.{name}", t, "hidden_states", hidden_states)
