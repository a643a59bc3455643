"""MXFP4 experts: e2m1 weights with one e8m0 scale per 32 columns, activations unquantized (gpt-oss,
compressed-tensors MXFP4A16).

The kernel sees ``moekit.ops.quantize_mxfp4``'s layout (E local experts, R = 2I rows of w13 when gated: gate rows,
then up rows; H and I multiples of 32):

    w13  uint8 [E, R, H/2]   w13_scale  uint8 [E, R, H/32]   w13_bias [E, R] (optional, the layer's dtype)
    w2   uint8 [E, H, I/2]   w2_scale   uint8 [E, H, I/32]   w2_bias  [E, H]

Both checkpoint formats hold these very bytes (QUANT_FORMATS.md 1.7), so they load straight into the parameters:

    compressed-tensors MXFP4A16, per expert:  experts.{e}.{gate,up,down}_proj.weight_packed uint8 [N, K/2] and
        .weight_scale uint8 [N, K/32], through each parameter's ``weight_loader`` (w1 / w3: the two row halves of
        w13 and w13_scale; w2)
    gpt-oss (HF ``quant_method: mxfp4``), fused per layer (``gpt_oss_tensors``):
        experts.gate_up_proj_blocks uint8 [E, 2I, H/32, 16], _scales uint8 [E, 2I, H/32], _bias [E, 2I]
        experts.down_proj_blocks    uint8 [E, H, I/32, 16],  _scales uint8 [E, H, I/32],  _bias [E, H]

gpt-oss interleaves the gate and up rows ([g0, u0, g1, u1, ...], its swiglu reads ``h[..., ::2]``, ``h[..., 1::2]``).
Each row carries its own scales, so de-interleaving blocks, scales and bias the same way is a lossless row
permutation, done at load: the layer then runs moekit's gated activation (``swigluoai``, with its clamp) on gate
rows then up rows. Blocks [.., K/32, 16] are the codes [.., K/2] viewed. ``process_weights_after_loading`` refuses
e8m0 255 (NaN in the OCP spec).

Tensor parallelism (rank r of tp holds I_r = I / tp of every expert): gate/up keep their rows of the share (codes,
scales, bias), down keeps the share's columns: I_r / 2 bytes of codes and I_r / 32 scale groups, so I_r must be a
multiple of 32 (``check_tp_split``). Per-expert tensors are cut before their ``weight_loader`` (``tp_slicer``),
gpt-oss's fused ones after their conversion (``moekit.loading``); down's bias stays whole.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from moekit._layout import deinterleave
from moekit.ops.quantize_mxfp4 import E8M0_NAN, GROUP, dequantize_mxfp4, quantize_mxfp4
from moekit.quant.base import (
    MoEQuantMethod,
    load_shard,
    register_biases,
    register_weight,
    replace_float_weights,
)
from moekit.quant.params import QuantParams

if TYPE_CHECKING:
    from moekit.kernel import ModularKernel
    from moekit.routed_experts import RoutedExperts

_UNIT_SCALE = 127  # e8m0 of 1.0: an unloaded layer (zero codes) computes zeros, never NaN


def check_e8m0_scales(where: str, scale: torch.Tensor, *, per_expert: bool = False) -> None:
    """Refuse e8m0 255 (NaN in the OCP MX spec: its whole group of 32 weights would be NaN) in ``scale``, naming
    ``where`` (a parameter or a checkpoint key) and the local experts (``per_expert``: dim 0) or the positions."""
    bad = scale == E8M0_NAN
    if not bool(bad.any()):
        return
    if per_expert:
        located = f"in local experts {bad.flatten(1).any(1).nonzero().flatten().tolist()[:16]}"
    else:
        located = f"at {bad.nonzero()[:4].tolist()}{' ...' if int(bad.sum()) > 4 else ''}"
    raise ValueError(f"{where}: e8m0 255 (NaN in the OCP MX spec) {located}: a corrupted checkpoint")


class MXFP4MoEMethod(MoEQuantMethod):
    """MXFP4 routed experts (module docstring); the torch backend runs them (each used expert dequantized in its
    loop, and 'auto' picks it) and so does backend 'triton' (codes dequantized in the GEMMs' K loop)."""

    name = "mxfp4"
    stored_params = ("w13", "w13_scale", "w2", "w2_scale")
    supports_eplb = True  # codes, scales and biases are all [E, ...]
    companions = {"w13": ("w13_scale",), "w2": ("w2_scale",)}

    def create_weights(
        self,
        layer: RoutedExperts,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        params_dtype: torch.dtype,
        device: torch.device | None,
    ) -> None:
        _check_sizes(hidden_size, intermediate_size)
        rows = layer.activation.w13_rows(intermediate_size)
        for w, n, k in (("w13", rows, hidden_size), ("w2", hidden_size, intermediate_size)):
            register_weight(layer, w, torch.zeros(num_experts, n, k // 2, dtype=torch.uint8, device=device),
                            self._loader(layer, w))
            scales = torch.full((num_experts, n, k // GROUP), _UNIT_SCALE, dtype=torch.uint8, device=device)
            register_weight(layer, f"{w}_scale", scales, self._loader(layer, f"{w}_scale"))
        register_biases(layer, num_experts, rows, hidden_size, params_dtype, device)

    def weight_loader_for(self, layer: RoutedExperts, name: str) -> Callable[..., None] | None:
        return self._loader(layer, name) if name in self.stored_params else None

    @staticmethod
    def _loader(layer: RoutedExperts, name: str) -> Callable:
        # One expert's shard at a time; uint8 codes and scales only (a float tensor would be cast, not decoded).
        return functools.partial(load_shard, layer, name, 0)

    # ---------------------------------------------------------------------------------------------- loading

    @staticmethod
    def checkpoint_tensors() -> tuple[tuple[str, str], ...]:
        """``(parameter suffix, checkpoint tensor name)`` per projection of a per-expert (compressed-tensors)
        checkpoint: ``experts.{e}.gate_proj.weight_packed`` -> ``w13`` (shard w1), ``.weight_scale`` ->
        ``w13_scale``."""
        return (("", "weight_packed"), ("_scale", "weight_scale"))

    @staticmethod
    def shard_shape(layer: RoutedExperts, name: str, shard_id: str) -> tuple[int, ...]:
        """The shape parameter ``name``'s ``weight_loader`` takes for one expert's ``shard_id`` (w1/w3: half the
        rows of a w13 parameter when gated)."""
        shape = list(layer._parameters[name].shape[1:])
        if shard_id != "w2" and layer.activation.is_gated:
            shape[0] //= 2
        return tuple(shape)

    def check_loadable(self, layer: RoutedExperts, *, layout: str) -> None:
        """Refuse a load ``moekit.loading`` cannot do into ``layer``: a layout other than per-expert
        (compressed-tensors) or gpt_oss, gpt-oss's fused tensors into a non-gated layer."""
        if layout not in ("per_expert", "gpt_oss"):
            raise ValueError(f"layout: mxfp4 experts load from per-expert tensors (experts.{{e}}.<proj>.weight_packed) "
                             f"or gpt-oss's fused experts.*_blocks, got the {layout!r} layout")
        if layout == "gpt_oss" and not layer.activation.is_gated:
            raise ValueError(f"layout: gpt-oss's interleaved gate/up rows need a gated activation, got "
                             f"{layer.activation.name!r}")

    @staticmethod
    def check_tp_split(intermediate_size: int, tp_size: int) -> None:
        """Refuse a tensor-parallel split whose slices of I would cut a scale group: down's K = I runs along its
        codes (two a byte) and its e8m0 groups of 32, so each rank's share must be whole groups (whole bytes
        then too). Gate/up cut rows, which any split keeps whole."""
        if intermediate_size % tp_size or (intermediate_size // tp_size) % GROUP:
            raise ValueError(f"parallel.tp_size: expected each rank's share of I to be a multiple of {GROUP} (mxfp4: "
                             f"whole e8m0 scale groups of {GROUP} columns of down_proj), got tp_size={tp_size} and "
                             f"intermediate_size={intermediate_size}")

    @classmethod
    def tp_slicer(cls, suffix: str, shard_id: str, intermediate_size: int, tp_size: int, tp_rank: int
                  ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Tensor-parallel rank ``tp_rank``'s part of one expert's compressed-tensors tensor ``<proj><suffix>``
        (``""``: ``weight_packed`` [N, K/2], ``"_scale"``: ``weight_scale`` [N, K/32]) of shard ``shard_id``
        (``intermediate_size``: the whole layer's I), as its ``weight_loader`` takes it; None without TP.
        Gate/up (N = I) keep their rows of the share; down (K = I) its bytes and scale groups of the share."""
        if tp_size == 1:
            return None
        cls.check_tp_split(intermediate_size, tp_size)
        share = intermediate_size // tp_size
        if shard_id != "w2":
            dim, per = 0, 1
        else:
            dim, per = 1, {"": 2, "_scale": GROUP}[suffix]  # codes a byte / columns a scale
        start, size = tp_rank * share // per, share // per
        return lambda t: t.narrow(dim, start, size)

    @staticmethod
    def gpt_oss_tensors(layer: RoutedExperts) -> list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor] | None]]:
        """``(parameter, checkpoint name under experts., conversion)`` of gpt-oss's fused tensors; each conversion
        maps the whole [E, ...] tensor into the parameter's layout (blocks viewed as codes, gate/up rows
        de-interleaved)."""

        def codes(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(-2)  # [E, N, K/32, 16] -> [E, N, K/2]

        def rows(t: torch.Tensor) -> torch.Tensor:
            return deinterleave(t, dim=1)

        table = [("w13", "gate_up_proj_blocks", lambda t: rows(codes(t))), ("w13_scale", "gate_up_proj_scales", rows),
                 ("w2", "down_proj_blocks", codes), ("w2_scale", "down_proj_scales", None)]
        if layer.w13_bias is not None:
            table += [("w13_bias", "gate_up_proj_bias", rows), ("w2_bias", "down_proj_bias", None)]
        return table

    @torch.no_grad()
    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        """The loaded bytes are already the kernel's layout; refuse e8m0 255 (NaN) in any scale."""
        for name in ("w13_scale", "w2_scale"):
            scale = layer._parameters[name]
            if scale.device.type != "meta":
                check_e8m0_scales(name, scale, per_expert=True)

    def dequantize_tensors(self, tensors: Mapping[str, torch.Tensor], *, n: int, k: int) -> torch.Tensor:
        """float32 [N, K] of one linear stored as a compressed-tensors MXFP4 ``weight_packed`` / ``weight_scale``
        pair: how a loader reads a quantized shared expert into an unquantized Linear."""
        w = dequantize_mxfp4(tensors["weight_packed"], tensors["weight_scale"])
        if tuple(w.shape) != (n, k):
            raise ValueError(f"expected a weight of shape {(n, k)} [N, K], got {tuple(w.shape)}")
        return w

    # ---------------------------------------------------------------------------------------------- running

    def quant_params(self, layer: RoutedExperts) -> QuantParams:
        return QuantParams(weight_dtype="mxfp4", granularity="group", group_size=GROUP, w13_scale=layer.w13_scale,
                           w2_scale=layer.w2_scale)

    @torch.no_grad()
    def quantize_layer(self, layer: RoutedExperts) -> None:
        """Replace ``layer``'s unquantized weights by MXFP4 codes (``quantize_mxfp4``), expert by expert: no float
        copy of the weights stays on the layer."""
        _check_sizes(layer.hidden_size, layer.intermediate_size)  # before anything is dropped

        def store(layer: RoutedExperts, e: int, name: str, weight: torch.Tensor) -> None:
            getattr(layer, name).data[e], getattr(layer, f"{name}_scale").data[e] = quantize_mxfp4(weight)

        replace_float_weights(self, layer, store)


def dequantized_weights(layer: RoutedExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (w13 [E, R, H], w2 [E, H, I]) of an MXFP4 layer, for tests and debugging (a full-size copy)."""
    if not isinstance(layer.quant_method, MXFP4MoEMethod):
        raise TypeError(f"layer: expected MXFP4 routed experts, got quant method {layer.quant_method.name!r}")
    return dequantize_mxfp4(layer.w13, layer.w13_scale), dequantize_mxfp4(layer.w2, layer.w2_scale)


def _check_sizes(hidden_size: int, intermediate_size: int) -> None:
    for what, size in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if size % GROUP:
            raise ValueError(f"{what}: mxfp4 weights scale blocks of {GROUP} columns, so it must be a multiple of "
                             f"{GROUP}, got {size}")
