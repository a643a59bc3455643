"""Readers that turn a transformers MoE block's routed experts into moekit's canonical weights.

Each reader takes the block and returns ``ExpertsWeights``: the activation and w13 [E, 2I, H] (gate rows, then
up rows), w2 [E, H, I] (+ biases). The layouts, in moekit terms:

    decorated  @use_experts_implementation modules: the decorator's flags        most families
               (transposed, interleaved, biases) -> views, or for interleaved
               gate/up rows (gpt-oss) a de-interleaved copy of w13;
               fp8 ``FP8Experts`` (FineGrainedFP8Config) -> their codes and
               scales, shared, for moekit's fp8 block method (``fp8.py``)
    llama4     gate_up_proj [E, H, 2I] (gate | up), down_proj [E, I, H]          Llama4
               -> transposed views
    dbrx       mlp.w1 (gate), mlp.v1 (up), mlp.w2 (down), each [E*I, H]          DBRX
               -> w13 = cat(w1, v1) copy, w2 a transposed view
    jetmoe     input_linear.weight [E, 2I, H] (gate | up),                       JetMoE
               output_linear.weight [E, H, I] -> shared as they are

The kernels take any strides on w13/w2, so a transposed layout is read in place; only rows that must be
reordered or joined are copied, and the copy replaces the original tensors in the converted model. For each copy
the reader also returns a ``SavedAs`` saying how it is saved back in the block's layout (``saving.py``). A reader
raises ``NotImplementedError`` for experts moekit cannot run exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moekit._layout import deinterleave, interleave
from moekit.hf.fp8 import fp8_unsupported, fp8_weights, is_fp8_experts
from moekit.hf.saving import SavedAs, interleaved, split_rows
from moekit.hf.spec import canonical_weights, gated_act_fn_activation, read_experts_spec, source_names
from moekit.ops.activation import Activation
from moekit.quant.base import MoEQuantMethod
from moekit.quant.fp8 import Fp8BlockMoEMethod


@dataclass(frozen=True, kw_only=True)
class ExpertsWeights:
    """A block's routed experts in moekit's layout: w13 [E, 2I, H], w2 [E, H, I], w13_bias [E, 2I], w2_bias [E, H];
    ``saved`` describes the tensors that are copies (names relative to the block and to the ``HFMoE``).
    Quantized experts: w13/w2 hold codes, ``w13_scale``/``w2_scale`` their scales, for ``quant_method``."""

    activation: Activation
    w13: torch.Tensor
    w2: torch.Tensor
    w13_bias: torch.Tensor | None = None
    w2_bias: torch.Tensor | None = None
    saved: tuple[SavedAs, ...] = ()
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    quant_method: MoEQuantMethod | None = None


ExpertsReader = Callable[[nn.Module], ExpertsWeights]


@torch.no_grad()
def decorated(block: nn.Module) -> ExpertsWeights:
    """``block.experts``, a module decorated with ``@use_experts_implementation`` (see ``moekit.hf.spec``)."""
    experts = block.experts
    spec = read_experts_spec(experts)
    if spec.activation is None:
        raise NotImplementedError(f"experts {type(experts).__name__} with {spec.reason}")
    if is_fp8_experts(experts):
        return _fp8(experts, spec.activation)
    # Not experts.weights: its cache would keep a second, full copy of interleaved experts on the caller's module
    # (the block the converted MoE replaces, or one left in place when convert gives up on a later block).
    w13, w2, w13_bias, w2_bias = canonical_weights(experts, spec)
    saved = ()
    if spec.interleaved:
        w13_name, _, b13_name, _ = source_names(experts, spec)
        saved = (interleaved("routed_experts.w13", f"experts.{w13_name}", transposed=spec.transposed),)
        if b13_name is not None:
            saved += (interleaved("routed_experts.w13_bias", f"experts.{b13_name}", transposed=False),)
    return ExpertsWeights(
        activation=spec.activation, w13=w13, w2=w2, w13_bias=w13_bias, w2_bias=w2_bias, saved=saved
    )


def _fp8(experts: nn.Module, activation: Activation) -> ExpertsWeights:
    # The converted layer shares the codes and scales; a derived scale (2I <= 128) would be a tensor the block
    # does not save, so it is refused here rather than described.
    reason = fp8_unsupported(experts, allow_scale_copy=False)
    if reason is not None:
        raise NotImplementedError(f"fp8 experts {type(experts).__name__} with {reason}")
    w13, w2, quant = fp8_weights(experts)
    return ExpertsWeights(activation=activation, w13=w13, w2=w2, w13_scale=quant.w13_scale,
                          w2_scale=quant.w2_scale, quant_method=Fp8BlockMoEMethod())


def llama4(block: nn.Module) -> ExpertsWeights:
    """``gate_up_proj`` [E, H, 2I] with the gate columns first, ``down_proj`` [E, I, H]: transposed views."""
    experts = block.experts
    return ExpertsWeights(
        activation=_activation(experts, experts.act_fn),
        w13=experts.gate_up_proj.transpose(1, 2),
        w2=experts.down_proj.transpose(1, 2),
    )


@torch.no_grad()
def dbrx(block: nn.Module) -> ExpertsWeights:
    """``mlp.w1``/``mlp.v1``/``mlp.w2`` [E*I, H], expert e in rows e*I..(e+1)*I; w1 is the gate, v1 the up
    projection, and the down projection computes ``h @ w2[e]`` (so w2[e] is stored [I, H])."""
    experts = block.experts
    mlp = experts.mlp
    split = (experts.num_experts, experts.ffn_hidden_size, experts.hidden_size)
    saved = split_rows(
        "routed_experts.w13",
        ("experts.mlp.w1", "experts.mlp.v1"),
        dim=1,
        half_shape=split,
        source_shape=tuple(mlp.w1.shape),
    )
    return ExpertsWeights(
        activation=_activation(mlp, mlp.activation_fn),
        w13=torch.cat((mlp.w1.view(split), mlp.v1.view(split)), dim=1),
        w2=mlp.w2.view(split).transpose(1, 2),
        saved=(saved,),
    )


def jetmoe(block: nn.Module) -> ExpertsWeights:
    """``input_linear.weight`` [E, 2I, H] (gate | up) and ``output_linear.weight`` [E, H, I]: shared, no copy."""
    return ExpertsWeights(
        activation=_activation(block, block.activation),
        w13=block.input_linear.weight,
        w2=block.output_linear.weight,
    )


def _activation(owner: nn.Module, act_fn) -> Activation:
    activation = gated_act_fn_activation(act_fn)
    if activation is None:
        raise NotImplementedError(f"{type(owner).__name__} with an activation moekit lacks ({type(act_fn).__name__})")
    return activation
