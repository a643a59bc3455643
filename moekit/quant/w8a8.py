"""8-bit routed experts (fp8 e4m3 / int8 weights, activations quantized on the fly): the shared method.

Parameters (E local experts; R = 2I rows for gated activations, else I; scale shapes in ``moekit.quant.params``):

    w13        fp8/int8 [E, R, H]        w13_scale  float32, per granularity
    w2         fp8/int8 [E, H, I]        w2_scale   float32, per granularity
    w13_bias   [E, R], w2_bias [E, H]    optional, in the activation dtype (unquantized)

Nothing is trainable (``requires_grad=False``): quantized experts have no backward. ``fp8.py`` and ``int8.py`` name
the schemes; ``moekit.quantize`` fills a layer from its unquantized weights (``quantize_layer``).

Per-tensor weights load a scale per shard (``w13_scale`` [E, 2]: w1 and w3 of a checkpoint may differ);
``process_weights_after_loading`` requantizes each expert's w1/w3 codes to the larger of the two, as vLLM does,
so the kernel sees one scale per expert ([E]).

Static activation scales (per-tensor only: a checkpoint's ``input_scale``, ``static_input_scales=True``) load per
expert and shard into ``w13_input_scale`` [E, 2] (w1, w3) and ``w2_input_scale`` [E, 1]; after loading each
becomes one scale per layer, the largest loaded (vLLM does the same: one quantization of x serves every expert);
a 0 (an expert calibration never routed to) is allowed, all zeros are not. NaN, inf and negative scales of either
kind are refused (``check_scales``) before anything is merged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from moekit._checks import check_bool
from moekit.ops.quantize import (
    QDTYPES,
    dequantize_weight,
    expert_scale_shapes,
    native_8bit_dots,
    quantize_weight,
    quantize_with_scale,
)
from moekit.quant.base import MoEQuantMethod, register_biases, register_weight, replace_float_weights
from moekit.quant.params import QuantParams

if TYPE_CHECKING:
    from moekit.kernel import ModularKernel
    from moekit.routed_experts import RoutedExperts


class W8A8MoEMethod(MoEQuantMethod):
    """8-bit weights in ``qdtype`` with scales per ``granularity``; activations quantized in the same dtype."""

    qdtype: ClassVar[str]
    granularity: ClassVar[str]
    stored_params = ("w13", "w2", "w13_scale", "w2_scale", "w13_input_scale", "w2_input_scale")
    block_shape: tuple[int, int] | None = None
    # Codes, scales and biases are [E, ...]; merged static input scales are one per layer (0-d) and are refused
    # by the rearrangement itself, since each rank's maximum covers only its own experts.
    supports_eplb = True
    companions = {"w13": ("w13_scale",), "w2": ("w2_scale",)}

    def __init__(self, *, static_input_scales: bool = False) -> None:
        check_bool("static_input_scales", static_input_scales)
        if static_input_scales and self.granularity != "tensor":
            raise ValueError(f"static_input_scales: static activation scales need per-tensor weights, got "
                             f"{self.name!r}")
        self.static_input_scales = static_input_scales

    def checkpoint_tensors(self, scale_name: str = "weight_scale") -> tuple[tuple[str, str], ...]:
        """``(parameter suffix, checkpoint tensor name)`` of each tensor a checkpoint stores per projection, for
        ``moekit.loading.expert_params_mapping(..., tensors=...)``: the codes (``weight`` -> ``w13`` / ``w2``), their
        scales (``scale_name``: ``weight_scale_inv`` in DeepSeek-V3/Qwen3 fp8 checkpoints, ``weight_scale`` in
        compressed-tensors and ModelOpt ones -> ``w13_scale`` / ``w2_scale``) and, with static activation scales,
        ``input_scale`` -> ``w13_input_scale`` / ``w2_input_scale``."""
        if scale_name not in ("weight_scale", "weight_scale_inv"):
            raise ValueError(f"scale_name: expected 'weight_scale' or 'weight_scale_inv', got {scale_name!r}")
        rows = (("", "weight"), ("_scale", scale_name))
        return rows + ((("_input_scale", "input_scale"),) if self.static_input_scales else ())

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
        gated = layer.activation.is_gated
        rows = layer.activation.w13_rows(intermediate_size)
        qdtype = QDTYPES[self.qdtype]
        # Zero codes and unit scales: an unloaded layer computes zeros, never the NaN that empty fp8 bits can hold.
        register_weight(layer, "w13", torch.zeros(num_experts, rows, hidden_size, dtype=qdtype, device=device))
        register_weight(layer, "w2", torch.zeros(num_experts, hidden_size, intermediate_size, dtype=qdtype,
                                                 device=device))
        s13, s2 = expert_scale_shapes(self.granularity, self.block_shape, num_experts=num_experts,
                                      hidden=hidden_size, inter=intermediate_size, gated=gated)
        # Scales that process_weights_after_loading merges (per-tensor w1/w3, static input scales) start at 0, so a
        # shard a strict=False load left out cannot win the max (a unit default requantized the loaded shard to
        # 1.0, or set the layer's activation scale); the others start at 1.
        merged = self.granularity == "tensor" and gated
        if merged:
            s13 = (num_experts, 2)  # w1 and w3 as loaded; one per expert after process_weights_after_loading
        register_weight(layer, "w13_scale", (torch.zeros if merged else torch.ones)(s13, dtype=torch.float32,
                                                                                     device=device))
        register_weight(layer, "w2_scale", torch.ones(s2, dtype=torch.float32, device=device))
        if self.static_input_scales:
            # Reduced to one per layer (the max) by process_weights_after_loading; all 0 there is refused.
            rows13 = 2 if gated else 1
            register_weight(layer, "w13_input_scale", torch.zeros(num_experts, rows13, dtype=torch.float32,
                                                                  device=device))
            register_weight(layer, "w2_input_scale", torch.zeros(num_experts, 1, dtype=torch.float32, device=device))
        register_biases(layer, num_experts, rows, hidden_size, params_dtype, device)

    def check_tp_split(self, intermediate_size: int, tp_size: int) -> None:
        """Refuse block scales that a rank's slice of I would cut through: each rank's I / tp_size must be a multiple
        of the block along I (w13's rows, block N; w2's columns, block K), as vLLM requires. A slice-local block
        quantization would still run, but its scales would not be the full layer's (a checkpoint's) sliced.
        Per-row and per-tensor scales split anywhere."""
        bs = self.block_shape
        if bs is None or tp_size == 1:
            return
        share = intermediate_size // tp_size
        if share % bs[0] or share % bs[1]:
            raise ValueError(f"parallel.tp_size: expected each rank's share of I to be whole {self.name} scale blocks, "
                             f"got tp_size={tp_size} and intermediate_size={intermediate_size}: {share} per rank, not "
                             f"a multiple of the {bs[0]}x{bs[1]} block")

    @torch.no_grad()
    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        """Merge per-shard scales (static input scales to one per layer, per-tensor w1/w3 scales to one per expert),
        once. Every scale is checked first (``moekit.loading`` checks the checkpoint's before copying; an engine
        driving ``weight_loader`` itself gets the same refusals here): a refused layer is left as loaded."""
        static = self.static_input_scales and layer.w13_input_scale.dim() != 0
        if layer.w13_scale.device.type != "meta":  # a meta layer holds no values to check
            for name in ("w13_scale", "w2_scale"):
                check_scales(name, getattr(layer, name).data, WEIGHT_SCALES)
            for name in ("w13_input_scale", "w2_input_scale") if static else ():
                scales = getattr(layer, name).data
                check_scales(name, scales, INPUT_SCALES)
                if not bool((scales > 0).any()):
                    raise ValueError(f"{name}: every static activation scale is 0: {NO_INPUT_SCALE}")
                check_input_scale_normal(name, float(scales.max()))
        for name in ("w13_input_scale", "w2_input_scale") if static else ():
            # The max over experts: a 0 (an expert calibration never routed to) does not lower it.
            register_weight(layer, name, getattr(layer, name).data.amax().reshape(()).contiguous())
        if self.granularity != "tensor" or layer.w13_scale.dim() == 1:
            return
        inter = layer.intermediate_size
        scales = layer.w13_scale.data
        merged = scales.amax(dim=1)
        # A meta layer (built to be materialized later) has no codes to requantize: only the shapes change.
        for e in range(scales.shape[0] if scales.device.type != "meta" else 0):
            for half, s in ((slice(0, inter), scales[e, 0]), (slice(inter, 2 * inter), scales[e, 1])):
                if bool(s != merged[e]):  # requantize only the shard whose scale was smaller
                    codes = layer.w13.data[e, half]
                    layer.w13.data[e, half] = quantize_with_scale(codes.float() * s, merged[e], self.qdtype)
        register_weight(layer, "w13_scale", merged.contiguous())

    def quant_params(self, layer: RoutedExperts) -> QuantParams:
        # Unmerged per-expert input scales are not a kernel input (kernel_for refuses to run before the merge).
        static = self.static_input_scales and layer.w13_input_scale.dim() == 0
        return QuantParams(
            weight_dtype=self.qdtype,
            act_dtype=self.qdtype,
            w13_scale=layer.w13_scale,
            w2_scale=layer.w2_scale,
            a13_scale=layer.w13_input_scale if static else None,
            a2_scale=layer.w2_input_scale if static else None,
            block_shape=self.block_shape,
            granularity=self.granularity,
        )

    def kernel_for(self, layer: RoutedExperts, x: torch.Tensor) -> ModularKernel:
        # 'auto' is the layer's choice (Triton on CUDA: TritonExperts._run_w8a8), except for fp8 on a GPU without
        # fp8 dots, where the torch backend (dequantizing per expert) is the one that runs.
        unmerged = [(n, p) for n, p in (("w13_scale", layer.w13_scale),
                                         ("w13_input_scale", getattr(layer, "w13_input_scale", None)))
                    if p is not None and self.granularity == "tensor" and p.dim() > (1 if n == "w13_scale" else 0)]
        if unmerged:
            name, param = unmerged[0]
            raise RuntimeError(
                f"{name}: per-shard scales {tuple(param.shape)} are loaded but not merged; "
                "call layer.process_weights_after_loading() after loading"
            )
        if layer.backend == "auto" and not native_8bit_dots(self.qdtype, x.device):
            return layer.kernel_for(x, backend="torch")
        return layer.kernel_for(x)

    @torch.no_grad()
    def quantize_layer(self, layer: RoutedExperts) -> None:
        """Replace ``layer``'s unquantized weights by this method's, quantized expert by expert (the float
        weights are dropped: no dequantized copy stays, and peak memory grows by one expert's fp32 temporaries).
        A refused expert (``quantize_weight`` raises on inf/NaN) leaves the layer with its float weights, unchanged
        (``replace_float_weights``)."""
        if self.static_input_scales:
            raise ValueError("static_input_scales: a layer quantized from float weights has no calibrated "
                             "activation scales; use dynamic ones (static_input_scales=False)")
        gate_rows = layer.intermediate_size if layer.activation.is_gated else None

        def store(layer: RoutedExperts, e: int, name: str, weight: torch.Tensor) -> None:
            q, s = quantize_weight(weight, self.qdtype, self.granularity, self.block_shape,
                                   gate_rows=gate_rows if name == "w13" else None)
            getattr(layer, name).data[e] = q
            # Broadcast over [2] for per-shard tensor scales (w13_scale [E, 2]): both shards share it.
            getattr(layer, f"{name}_scale").data[e] = s

        replace_float_weights(self, layer, store)
        self.process_weights_after_loading(layer)


# What check_scales expects of each kind of scale, and why all-zero activation scales are refused.
WEIGHT_SCALES = "finite non-negative weight scales (0 for an all-zero block)"
INPUT_SCALES = "finite non-negative static activation scales (0 for an expert calibration never reached)"
NO_INPUT_SCALE = "no usable scale (every activation would quantize to 0)"


def check_input_scale_normal(name: str, top: float) -> None:
    """The layer's one static activation scale (the max over its experts) must be a normal float32: x divided by
    a subnormal scale overflows, and every output would be NaN."""
    if 0 < top < torch.finfo(torch.float32).tiny:
        raise ValueError(f"{name}: the largest static activation scale is {top:g}, below the smallest normal "
                         f"float32 ({torch.finfo(torch.float32).tiny:g}): x / scale would overflow")


def check_scales(where: str, scale: torch.Tensor, what: str, *, signed: bool = False) -> None:
    """Refuse NaN, inf and (unless ``signed``) negative entries of ``scale`` with a ValueError naming ``where`` (a
    parameter or a checkpoint key), the bad values and their positions; 0 passes. A NaN/inf scale gives NaN
    outputs, a negative one flips the sign of what it scales, and a merge (the max over shards or experts) would
    spread either."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"scale: expected a tensor, got {type(scale).__name__}")
    scale = scale.float()
    bad = ~torch.isfinite(scale) if signed else ~torch.isfinite(scale) | (scale < 0)
    if bool(bad.any()):
        at = bad.nonzero().tolist()
        raise ValueError(f"{where}: expected {what}, got {scale[bad].tolist()[:8]} at {at[:8]}"
                         f"{' ...' if len(at) > 8 else ''}")


def dequantized_weights(layer: RoutedExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (w13, w2) of an 8-bit layer, for tests and debugging (a full-size copy: never on a hot path)."""
    method = layer.quant_method
    if not isinstance(method, W8A8MoEMethod):
        raise TypeError(f"layer: expected 8-bit routed experts, got quant method {method.name!r}")
    gate_rows = layer.intermediate_size if layer.activation.is_gated else None
    w13 = dequantize_weight(layer.w13, layer.w13_scale, method.granularity, method.block_shape, gate_rows=gate_rows)
    w2 = dequantize_weight(layer.w2, layer.w2_scale, method.granularity, method.block_shape)
    return w13, w2
