"""4-bit / 8-bit integer weights with group scales, activations unquantized ("WNA16": w4a16, w8a16).

The kernel sees one layout (``moekit.ops.quantize_wna16``; E local experts, R = 2I rows of w13 when gated, else I):

    w13        uint8 [E, R, ⌈H/2⌉] (int4) / [E, R, H] (int8)     w13_scale  [E, R, ⌈H/g⌉]   w13_zp  uint8, same (asym)
    w2         uint8 [E, H, ⌈I/2⌉] / [E, H, I]                  w2_scale   [E, H, ⌈I/g⌉]   w2_zp   uint8, same (asym)

Checkpoints load in their own layout, one parameter per checkpoint tensor (each with its ``weight_loader``,
called per expert and shard: w1/w3 fill the two halves of the w13 parameters along N, w2 the w2 ones), and
``process_weights_after_loading`` converts them once into the layout above (QUANT_FORMATS.md names them):

    format              per projection (P = w13 | w2)                                    N-dim / halves split
    moekit              P, P_scale, P_zp (the layout itself; ``moekit.quantize``)       rows
    compressed-tensors  P_weight_packed int32 [N, ⌈K·b/32⌉], P_weight_scale [N, ⌈K/g⌉],   rows
                        P_weight_zero_point int32 [⌈N·b/32⌉ per shard, ⌈K/g⌉] (asym),
                        P_weight_shape [2 per shard] (= [N, K], checked)
    gptq (v1)           P_qweight int32 [K·b/32, N], P_qzeros int32 [⌈K/g⌉, ⌈N·b/32⌉ per shard],   columns
                        P_scales [⌈K/g⌉, N], P_g_idx [K per shard] (must be k // g: act order is refused)
    awq (gemm)          P_qweight int32 [K, N/8], P_qzeros int32 [⌈K/g⌉, N/8], P_scales [⌈K/g⌉, N]  columns

compressed-tensors' ``weight_packed`` becomes the codes without a copy (its int32 words read as bytes are the
layout); GPTQ and AWQ are repacked once. Scales load into float32 (exact for any checkpoint dtype) and are kept
in the narrowest of the layer dtype, fp16 and bf16 that holds every loaded scale exactly (never rounded).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from moekit._checks import check_bool, check_choice
from moekit.ops.quantize_wna16 import (
    BITS,
    WNA16Weight,
    awq_to_wna16,
    compressed_tensors_to_wna16,
    dequantize_gptq,
    dequantize_wna16,
    gptq_to_wna16,
    quantize_wna16,
)
from moekit.quant.base import (
    MoEQuantMethod,
    load_shard,
    register_biases,
    register_weight,
    replace_float_weights,
)
from moekit.quant.params import QuantParams
from moekit.quant.w8a8 import WEIGHT_SCALES, check_scales

if TYPE_CHECKING:
    from moekit.routed_experts import RoutedExperts

CHECKPOINT_FORMATS = ("moekit", "compressed-tensors", "gptq", "awq")
_SIGNED_SCALES = "finite group scales"
_INTERNAL = ("", "_scale", "_zp")
# Per format: (parameter suffix, checkpoint tensor name, dim of one expert's tensor that holds N / the halves).
_CHECKPOINT_TENSORS = {
    "moekit": (("", "weight", 0), ("_scale", "weight_scale", 0), ("_zp", "weight_zero_point", 0)),
    "compressed-tensors": (("_weight_packed", "weight_packed", 0), ("_weight_scale", "weight_scale", 0),
                           ("_weight_zero_point", "weight_zero_point", 0), ("_weight_shape", "weight_shape", 0)),
    "gptq": (("_qweight", "qweight", 1), ("_qzeros", "qzeros", 1), ("_scales", "scales", 1),
             ("_g_idx", "g_idx", 0)),
    "awq": (("_qweight", "qweight", 1), ("_qzeros", "qzeros", 1), ("_scales", "scales", 1)),
}
_ZERO_SUFFIXES = ("_zp", "_weight_zero_point")
# Per format: the suffixes of the codes, their scales and their zero points.
_COMPANIONS = {"moekit": ("", "_scale", "_zp"),
               "compressed-tensors": ("_weight_packed", "_weight_scale", "_weight_zero_point"),
               "gptq": ("_qweight", "_scales", "_qzeros"), "awq": ("_qweight", "_scales", "_qzeros")}
# Tensor parallelism: per format and suffix, where I runs in one expert's checkpoint tensor, for gate/up (I is
# their N) and for down (I is its K): (dim, elements of I per index along it) with "w" = codes per int32 word,
# "B" = codes per byte, "g" = the group size; None = the tensor stays whole. "shape" = compressed-tensors'
# [N, K], rewritten to the slice's.
_TP_AXES = {
    "moekit": {"": ((0, 1), (1, "B")), "_scale": ((0, 1), (1, "g")), "_zp": ((0, 1), (1, "g"))},
    "compressed-tensors": {"_weight_packed": ((0, 1), (1, "w")), "_weight_scale": ((0, 1), (1, "g")),
                           "_weight_zero_point": ((0, "w"), (1, "g")), "_weight_shape": "shape"},
    "gptq": {"_qweight": ((1, 1), (0, "w")), "_qzeros": ((1, "w"), (0, "g")), "_scales": ((1, 1), (0, "g")),
             "_g_idx": (None, (0, 1))},
    "awq": {"_qweight": ((1, "w"), (0, 1)), "_qzeros": ((1, "w"), (0, "g")), "_scales": ((1, 1), (0, "g"))},
}


def _retire(param: torch.nn.Parameter | None, name: str) -> None:
    """A checkpoint-layout parameter replaced by its conversion: an engine still holding it (it took the layer's
    parameters before loading) must not write into it, since nothing reads it any more (or, for compressed-tensors
    codes, the converted layer reads the same bytes beside scales that would not change)."""
    if param is None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError(f"{name}: converted by process_weights_after_loading; load into a freshly built layer")

    param.weight_loader = refuse


class WNA16MoEMethod(MoEQuantMethod):
    """``bits``-bit integer weights, a float scale (and with ``sym=False`` a zero point) per ``group_size``
    columns (-1: one group per row); activations stay in the layer's dtype. Backend ``auto`` is the layer's:
    Triton on CUDA (``grouped_gemm_wna16`` on the codes), torch elsewhere (dequantizing each routed expert).

    Args:
        checkpoint_format: the layout the parameters load in (module docstring); ``moekit`` is the kernel's own.
    """

    supports_eplb = True  # every tensor, codes, scales and zero points, is [E, ...]

    def __init__(self, *, bits: int = 4, group_size: int = 128, sym: bool = True,
                 checkpoint_format: str = "moekit", dequantize: bool = False) -> None:
        check_choice("bits", bits, BITS)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
            raise ValueError(f"group_size: expected a positive int or -1 (one group per row), got {group_size!r}")
        check_bool("sym", sym)
        check_choice("checkpoint_format", checkpoint_format, CHECKPOINT_FORMATS)
        if checkpoint_format == "awq" and (bits != 4 or sym):
            raise ValueError(f"checkpoint_format: AWQ stores 4-bit weights with zero points (bits=4, sym=False), "
                             f"got bits={bits}, sym={sym}")
        check_bool("dequantize", dequantize)
        if dequantize and checkpoint_format != "gptq":
            raise ValueError(f"dequantize: only GPTQ act-order checkpoints are dequantized at load, got "
                             f"checkpoint_format={checkpoint_format!r}")
        self.bits, self.group_size, self.sym, self.checkpoint_format = bits, group_size, sym, checkpoint_format
        # The caller asked for it (act order has no packed kernel): the layer ends up unquantized, in its dtype.
        self.dequantize = dequantize
        g = "channel" if group_size == -1 else f"g{group_size}"
        self.name = f"w{bits}a16_{g}" + ("" if sym else "_asym")
        suffixes = {s for s, _, _ in _CHECKPOINT_TENSORS[checkpoint_format]} | set(_INTERNAL)
        self.stored_params = tuple(f"{w}{s}" for w in ("w13", "w2") for s in sorted(suffixes))
        # Codes need their scales (and zero points when asymmetric); g_idx and weight_shape start correct.
        codes, scale, zero = _COMPANIONS[checkpoint_format]
        self.companions = {f"{w}{codes}": (f"{w}{scale}",) + (() if sym else (f"{w}{zero}",)) for w in ("w13", "w2")}

    @property
    def weight_dtype(self) -> str:
        return "int4" if self.bits == 4 else "int8"

    def checkpoint_tensors(self) -> tuple[tuple[str, str], ...]:
        """``(parameter suffix, checkpoint tensor name)`` of each tensor a checkpoint stores per projection:
        ``experts.{e}.gate_proj.<name>`` loads into ``w13<suffix>`` (shard w1), ``down_proj.<name>`` into
        ``w2<suffix>``; zero points only for ``sym=False``."""
        rows = _CHECKPOINT_TENSORS[self.checkpoint_format]
        return tuple((s, n) for s, n, _ in rows if not (self.sym and s in _ZERO_SUFFIXES))

    def check_loadable(self, layer: RoutedExperts, *, layout: str) -> None:
        """Refuse a load ``moekit.loading`` cannot do into ``layer``: a fused layout, or checkpoint tensors already
        converted by an earlier load."""
        if layout != "per_expert":
            raise ValueError(f"layout: {self.name} experts load from per-expert tensors (experts.{{e}}.<proj>.*), "
                             f"got the {layout!r} layout")
        if any(f"w13{s}" not in layer._parameters for s, _ in self.checkpoint_tensors()):
            raise ValueError(f"moe: its {self.checkpoint_format} tensors were converted by an earlier load "
                             "(process_weights_after_loading); load into a freshly built layer")

    def check_tp_split(self, intermediate_size: int, tp_size: int) -> None:
        """Refuse a tensor-parallel split whose slices of I would cut a scale group or a packed word: each rank's
        share must be whole groups and whole int32 words of codes (GPTQ/AWQ/compressed-tensors pack along I)."""
        if self.dequantize and tp_size > 1:  # act order scatters a rank's share of I over every group
            raise ValueError(f"parallel.tp_size: GPTQ act-order experts dequantized at load are not split over "
                             f"tensor-parallel ranks, got tp_size={tp_size}")
        need = math.lcm(32 // self.bits, max(self.group_size, 1))
        if intermediate_size % tp_size or (intermediate_size // tp_size) % need:
            raise ValueError(f"parallel.tp_size: expected each rank's share of I to be a multiple of {need} "
                             f"({self.name}: whole groups and packed words), got tp_size={tp_size} and "
                             f"intermediate_size={intermediate_size}")

    def tp_slicer(self, suffix: str, shard_id: str, intermediate_size: int, tp_size: int, tp_rank: int
                  ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Tensor-parallel rank ``tp_rank``'s part of one expert's checkpoint tensor ``<proj><suffix>`` of shard
        ``shard_id`` (``intermediate_size``: the whole layer's I), as its ``weight_loader`` takes it; None when
        the tensor stays whole (its I is all groups of one row, or it has none)."""
        if tp_size == 1:
            return None
        self.check_tp_split(intermediate_size, tp_size)
        share, down = intermediate_size // tp_size, shard_id == "w2"
        spec = _TP_AXES[self.checkpoint_format][suffix]
        if spec == "shape":
            div = [1, tp_size] if down else [tp_size, 1]
            return lambda t: t // torch.tensor(div, dtype=t.dtype, device=t.device)
        axis = spec[1 if down else 0]
        if axis is None or (axis[1] == "g" and self.group_size == -1):
            return None  # one group per row: the rank's K is still one group, with the same scale
        dim, per = axis[0], {"w": 32 // self.bits, "B": 8 // self.bits, "g": self.group_size}.get(axis[1], axis[1])
        start, size = tp_rank * share // per, share // per
        if suffix == "_g_idx":  # group indices restart at the slice: the loader checks g_idx == k // g
            first = tp_rank * share // _group(self.group_size, intermediate_size)
            return lambda t: t.narrow(dim, start, size) - first
        return lambda t: t.narrow(dim, start, size)

    def shard_shape(self, layer: RoutedExperts, name: str, shard_id: str) -> tuple[int, ...]:
        """The shape parameter ``name``'s ``weight_loader`` takes for one expert's ``shard_id`` (w1/w3: half of a
        w13 parameter along N when gated)."""
        shape = list(layer._parameters[name].shape[1:])
        if shard_id != "w2" and layer.activation.is_gated:
            suffix = name.removeprefix("w13")
            dim = next((d for s, _, d in _CHECKPOINT_TENSORS[self.checkpoint_format] if s == suffix), 0)
            shape[dim] //= 2
        return tuple(shape)

    # ------------------------------------------------------------------------------------------------ weights

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
        fmt = self.checkpoint_format
        halves = 2 if layer.activation.is_gated else 1
        shapes = {"w13": (halves, intermediate_size, hidden_size), "w2": (1, hidden_size, intermediate_size)}
        per_word = 32 // self.bits
        for w, (h, n, k) in shapes.items():
            what = f"{'w13' if w == 'w13' else 'w2'} [N={h * n}, K={k}]"
            if fmt == "gptq" and k % per_word:
                raise ValueError(f"checkpoint_format: GPTQ packs K in int32 words of {per_word} codes, so K must "
                                 f"be a multiple of {per_word}, got {what}")
            if fmt == "awq" and n % 8:
                raise ValueError(f"checkpoint_format: AWQ packs N in int32 words of 8 codes, so each shard's N "
                                 f"must be a multiple of 8, got {what}")
            for suffix, data in self._checkpoint_shapes(fmt, num_experts, h, n, k, params_dtype).items():
                if self.sym and suffix in _ZERO_SUFFIXES:
                    continue
                split = next(d for s, _, d in _CHECKPOINT_TENSORS[fmt] if s == suffix)
                register_weight(layer, f"{w}{suffix}", data.to(device),
                                self._loader(layer, f"{w}{suffix}", split))
        register_biases(layer, num_experts, halves * intermediate_size, hidden_size, params_dtype, device)

    def _checkpoint_shapes(self, fmt: str, e: int, h: int, n: int, k: int,
                           params_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Zero-filled parameters of one projection (``h`` shards of ``n`` rows each, reduction size ``k``);
        unit scales, so an unloaded layer computes finite values."""
        b, g = self.bits, _groups(self.group_size, k)
        words_k, words_n = math.ceil(k * b / 32), math.ceil(n * b / 32)
        i32 = torch.int32
        if fmt == "moekit":
            width = (k + 1) // 2 if b == 4 else k
            return {"": torch.zeros(e, h * n, width, dtype=torch.uint8),
                    "_scale": torch.ones(e, h * n, g, dtype=params_dtype),
                    "_zp": torch.zeros(e, h * n, g, dtype=torch.uint8)}
        if fmt == "compressed-tensors":
            return {"_weight_packed": torch.zeros(e, h * n, words_k, dtype=i32),
                    "_weight_scale": torch.ones(e, h * n, g, dtype=torch.float32),
                    "_weight_zero_point": torch.zeros(e, h * words_n, g, dtype=i32),
                    "_weight_shape": torch.tensor([n, k]).repeat(e, h)}
        if fmt == "gptq":
            return {"_qweight": torch.zeros(e, k // (32 // b), h * n, dtype=i32),
                    # v1's stored zero 2^(b-1) − 1 in every slot: an unloaded layer converts (as symmetric too)
                    "_qzeros": torch.full((e, g, h * words_n), _sym_qzeros_word(b), dtype=i32),
                    "_scales": torch.ones(e, g, h * n, dtype=torch.float32),
                    "_g_idx": (torch.arange(k) // _group(self.group_size, k)).repeat(e, h).to(i32)}
        return {"_qweight": torch.zeros(e, k, h * n // 8, dtype=i32),
                "_qzeros": torch.zeros(e, g, h * n // 8, dtype=i32),
                "_scales": torch.ones(e, g, h * n, dtype=torch.float32)}

    def _loader(self, layer: RoutedExperts, name: str, split_dim: int):
        return functools.partial(load_shard, layer, name, split_dim)

    def weight_loader_for(self, layer: RoutedExperts, name: str) -> Callable[..., None] | None:
        # GPTQ/AWQ tensors split their halves along the columns: the layer's own loader would cut the rows.
        for suffix, _, split in _CHECKPOINT_TENSORS[self.checkpoint_format] + tuple((s, "", 0) for s in _INTERNAL):
            if name in (f"w13{suffix}", f"w2{suffix}"):
                return self._loader(layer, name, split)
        return None  # the biases

    @torch.no_grad()
    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        """Convert the loaded checkpoint tensors into the kernel's layout, once (a second call does nothing); with
        ``dequantize`` into float weights of an unquantized layer instead."""
        if self.checkpoint_format != "moekit" and "w13" in layer._parameters:
            return  # converted (and checked) already
        # Scales loaded through the parameters' own weight_loader are checked here, before anything is replaced
        # (moekit.loading checks a checkpoint's before copying): a NaN/inf gives NaN outputs, and in the formats
        # whose producers write only positive scales a negative one flips the sign of its group. moekit's own
        # layout holds signed ones: GGUF's Q4_0 d is negative by construction (llama.cpp's max / -8). The
        # conversions below only move them.
        suffix = next(s for s, n, _ in _CHECKPOINT_TENSORS[self.checkpoint_format] if "scale" in n)
        signed = self.checkpoint_format == "moekit"
        for w in ("w13", "w2"):
            scales = layer._parameters[f"{w}{suffix}"].data
            if scales.device.type != "meta":  # a meta layer holds no values to check
                check_scales(f"{w}{suffix}", scales, _SIGNED_SCALES if signed else WEIGHT_SCALES, signed=signed)
        if self.checkpoint_format == "moekit":
            return
        if self.dequantize:
            self._dequantize_layer(layer)
            return
        halves = 2 if layer.activation.is_gated else 1
        converted = {}
        # Both projections are converted before anything is replaced: a tensor the converter refuses (an act-order
        # g_idx in one down_proj, say) leaves the layer as loaded, not half converted.
        for w, h in (("w13", halves), ("w2", 1)):
            parts = [[self._convert(layer, w, e, s, h) for s in range(h)]
                     for e in range(layer._parameters[self._first(w)].shape[0])]
            if self.checkpoint_format == "compressed-tensors":
                # The codes are the packed words themselves, read as bytes: a view, no copy.
                packed = layer._parameters[f"{w}_weight_packed"].data
                codes = packed.view(torch.uint8)[..., : parts[0][0].qweight.shape[-1]]
            else:
                codes = _stack([[p.qweight for p in row] for row in parts])
            scales = _stack([[p.scales.float() for p in row] for row in parts])
            zeros = None if self.sym else _stack([[p.zeros for p in row] for row in parts])
            converted[w] = (codes, _narrow_scales(scales, layer._params_dtype), zeros)
        for w, (codes, scales, zeros) in converted.items():
            for suffix, _, _ in _CHECKPOINT_TENSORS[self.checkpoint_format]:
                _retire(layer._parameters.pop(f"{w}{suffix}", None), f"{w}{suffix}")
            register_weight(layer, w, codes, self._loader(layer, w, 0))
            register_weight(layer, f"{w}_scale", scales, self._loader(layer, f"{w}_scale", 0))
            if zeros is not None:
                register_weight(layer, f"{w}_zp", zeros, self._loader(layer, f"{w}_zp", 0))

    def _dequantize_layer(self, layer: RoutedExperts) -> None:
        """GPTQ tensors with any g_idx (act order) -> float w13/w2 in the layer dtype; the layer's method becomes
        ``UnquantizedMoEMethod`` (its bytes are a float layer's: what ``dequantize=True`` asks for)."""
        from moekit.quant.unquantized import UnquantizedMoEMethod

        halves = 2 if layer.activation.is_gated else 1
        floats = {}
        for w, h, n, k in (("w13", halves, layer.intermediate_size, layer.hidden_size),
                           ("w2", 1, layer.hidden_size, layer.intermediate_size)):
            num = layer._parameters[self._first(w)].shape[0]
            floats[w] = torch.stack([
                torch.cat([self.dequantize_tensors(self._shard_tensors(layer, w, e, s, h), n=n, k=k)
                           for s in range(h)])
                for e in range(num)]).to(layer._params_dtype)
        for w, data in floats.items():
            for suffix, _, _ in _CHECKPOINT_TENSORS["gptq"]:
                _retire(layer._parameters.pop(f"{w}{suffix}", None), f"{w}{suffix}")
            register_weight(layer, w, data)
        layer.quant_method = UnquantizedMoEMethod()
        warnings.warn(f"{self.name} (GPTQ act order): experts dequantized to {layer._params_dtype} at load, as "
                      "dequantize=True asks; the layer runs and stores them unquantized", stacklevel=2)

    def _first(self, w: str) -> str:
        return f"{w}{_CHECKPOINT_TENSORS[self.checkpoint_format][0][0]}"

    def _shard_tensors(self, layer: RoutedExperts, w: str, e: int, shard: int, halves: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s loaded checkpoint tensors of projection ``w``, shard ``shard`` of ``halves`` (each cut
        along its N / halves axis), keyed by their checkpoint names."""
        out = {}
        for suffix, name, dim in _CHECKPOINT_TENSORS[self.checkpoint_format]:
            if f"{w}{suffix}" in layer._parameters:
                t = layer._parameters[f"{w}{suffix}"].data[e]
                size = t.shape[dim] // halves
                out[name] = t.narrow(dim, shard * size, size)
        return out

    def _convert(self, layer: RoutedExperts, w: str, e: int, shard: int, halves: int) -> WNA16Weight:
        """Shard ``shard`` of expert ``e``'s projection ``w`` in the kernel's layout."""
        t = self._shard_tensors(layer, w, e, shard, halves)
        b, fmt = self.bits, self.checkpoint_format
        if fmt == "compressed-tensors":
            n, k = (int(v) for v in t["weight_shape"])
            expected = (t["weight_packed"].shape[0], layer.hidden_size if w == "w13" else layer.intermediate_size)
            if (n, k) != expected:
                # A K that packs into as many words would pass the converter and misread the padding.
                raise ValueError(f"{w}_weight_shape: expected [N, K] = {list(expected)} for expert {e}, got "
                                 f"{[n, k]}")
            zp = None if self.sym else t["weight_zero_point"]
            return compressed_tensors_to_wna16(t["weight_packed"], t["weight_scale"], zp, bits=b,
                                               group_size=self.group_size, k=k)
        if fmt == "gptq":
            return gptq_to_wna16(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=b,
                                 group_size=self.group_size, sym=self.sym)
        return awq_to_wna16(t["qweight"], t["qzeros"], t["scales"], group_size=self.group_size)

    def dequantize_tensors(self, tensors: Mapping[str, torch.Tensor], *, n: int, k: int) -> torch.Tensor:
        """float32 [N, K] of one linear stored in this method's checkpoint format (``tensors`` by the checkpoint
        names of ``checkpoint_tensors``): how a loader reads a quantized shared expert into an unquantized Linear.
        GPTQ act order (any ``g_idx``) dequantizes too: nothing is kept in the packed layout here."""
        fmt, b, g, t = self.checkpoint_format, self.bits, self.group_size, tensors
        zero_name = {"compressed-tensors": "weight_zero_point", "moekit": "weight_zero_point"}.get(fmt, "qzeros")
        if not self.sym and zero_name not in t:  # read as symmetric, every code would be off by its zero point
            raise ValueError(f"tensors: {self.name} ({fmt}) is asymmetric and needs {zero_name!r}, got "
                             f"{sorted(t)}")
        if fmt == "gptq":
            w = dequantize_gptq(t["qweight"], t.get("qzeros"), t["scales"], t.get("g_idx"), bits=b, group_size=g,
                                sym=self.sym)
        elif fmt == "awq":
            w = dequantize_wna16(awq_to_wna16(t["qweight"], t["qzeros"], t["scales"], group_size=g))
        elif fmt == "compressed-tensors":
            shape = t.get("weight_shape")
            w = dequantize_wna16(compressed_tensors_to_wna16(
                t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"), bits=b, group_size=g,
                k=k if shape is None else int(shape[1])))
        else:
            w = dequantize_wna16(WNA16Weight(t["weight"], t["weight_scale"], t.get("weight_zero_point"), b, g, k))
        if tuple(w.shape) != (n, k):
            raise ValueError(f"expected a weight of shape {(n, k)} [N, K], got {tuple(w.shape)}")
        return w

    def quant_params(self, layer: RoutedExperts) -> QuantParams:
        if "w13" not in layer._parameters:
            # Checkpoint tensors not converted yet: still quantized (its activation dtype is the layer's).
            raise RuntimeError(f"{self.name}: the {self.checkpoint_format} tensors are loaded but not converted; "
                               "call layer.process_weights_after_loading() after loading")
        return QuantParams(weight_dtype=self.weight_dtype, granularity="group", group_size=self.group_size,
                           w13_scale=layer.w13_scale, w2_scale=layer.w2_scale,
                           w13_zp=getattr(layer, "w13_zp", None), w2_zp=getattr(layer, "w2_zp", None))

    # ----------------------------------------------------------------------------------- online quantization

    @torch.no_grad()
    def quantize_layer(self, layer: RoutedExperts) -> None:
        """Replace ``layer``'s unquantized weights by round-to-nearest codes (``quantize_wna16``), expert by
        expert: no float copy of the weights stays on the layer."""
        if self.checkpoint_format != "moekit":
            raise ValueError(f"checkpoint_format: online quantization writes moekit's own layout, got "
                             f"{self.checkpoint_format!r}")

        def store(layer: RoutedExperts, e: int, name: str, weight: torch.Tensor) -> None:
            q = quantize_wna16(weight, self.bits, self.group_size, self.sym)
            getattr(layer, name).data[e] = q.qweight
            getattr(layer, f"{name}_scale").data[e] = q.scales
            if q.zeros is not None:
                getattr(layer, f"{name}_zp").data[e] = q.zeros

        replace_float_weights(self, layer, store)


def dequantized_weights(layer: RoutedExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (w13 [E, R, H], w2 [E, H, I]) of a WNA16 layer, for tests and debugging (a full-size copy)."""
    method = layer.quant_method
    if not isinstance(method, WNA16MoEMethod):
        raise TypeError(f"layer: expected WNA16 routed experts, got quant method {method.name!r}")
    q = method.quant_params(layer)
    return (dequantize_wna16(expert_weight(layer.w13, q.w13_scale, q.w13_zp, q, layer.hidden_size)),
            dequantize_wna16(expert_weight(layer.w2, q.w2_scale, q.w2_zp, q, layer.intermediate_size)))


def expert_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, quant: QuantParams,
                  k: int) -> WNA16Weight:
    """One weight (or a stack of them) of ``quant``'s layout as a ``WNA16Weight`` with reduction size ``k``."""
    return WNA16Weight(codes, scales, zeros, quant.bits, quant.group_size, k)


# ---------------------------------------------------------------------------------------------------- helpers


def _groups(group_size: int, k: int) -> int:
    return math.ceil(k / _group(group_size, k))


def _group(group_size: int, k: int) -> int:
    return max(k, 1) if group_size == -1 else group_size


def _sym_qzeros_word(bits: int) -> int:
    """A GPTQ v1 qzeros word holding the symmetric zero (stored minus one) in each of its 32/bits slots."""
    stored = (1 << (bits - 1)) - 1
    return sum(stored << (bits * i) for i in range(32 // bits))  # 0x77777777 / 0x7f7f7f7f: positive int32


def _stack(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """[E][halves] tensors [n, ...] -> [E, halves·n, ...]."""
    return torch.stack([torch.cat(r, dim=0) for r in rows]).contiguous()


def _narrow_scales(scales: torch.Tensor, params_dtype: torch.dtype) -> torch.Tensor:
    """The narrowest of (the layer dtype, fp16, bf16) that holds every scale exactly, else float32."""
    for dtype in dict.fromkeys((params_dtype, torch.float16, torch.bfloat16)):
        narrow = scales.to(dtype)
        if torch.equal(narrow.float(), scales):
            return narrow
    return scales
