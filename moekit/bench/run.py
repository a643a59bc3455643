"""One benchmark sweep: for each token count, moekit and the baselines on the same random inputs.

Timed region: the routed experts given ``topk_weights``/``topk_ids`` (routing metadata, both GEMMs,
activation, weighting, top-k reduction) — what ``moekit.fused_experts`` does. Shared experts are left out: they
are a dense MLP, identical for every implementation, and would only dilute the comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from moekit.bench.baselines import eager_experts, grouped_mm_experts
from moekit.bench.floor import BENCH_SCHEMES, Ceilings, floor_us, moe_bytes, moe_flops
from moekit.bench.shapes import MoEShape
from moekit.bench.timing import time_cpu, time_us
from moekit.functional import fused_experts
from moekit.kernel import resolve_backend
from moekit.ops.quantize_mxfp4 import dequantize_mxfp4
from moekit.ops.quantize_wna16 import dequantize_wna16
from moekit.online_quant import quantize
from moekit.quant import MXFP4_SCHEMES, QUANT_SCHEMES, WNA16_SCHEMES
from moekit.quant.wna16 import expert_weight
from moekit.router import select_experts
from moekit.routed_experts import RoutedExperts
from moekit.testing import QUANT_REFERENCE_TOLERANCE, QUANT_TOLERANCES, TOLERANCES, rel_errors

# MEASURING.md requires CUDA-graph replays for T <= 1024 and allows eager timing above. Every call that can be
# captured is graph-timed at every T: eager timing of large calls still counts ~0.1-0.4 ms of Python launch
# overhead (seen on an H100), which is the host's cost, not the kernel's.
ERROR_TOKENS = 64  # the reference runs on this many tokens only; it is fp32 and slow
REF_CHUNK_BYTES = 2 << 30  # fp32 expert weights the reference holds at once
# On CUDA each timed call runs ROTATE times on as many token sets (hidden states + routing), and the time is
# divided by ROTATE. do_bench clears L2 before every call by writing 256 MB, and the dirty lines are written
# back while the next kernel runs: at decode sizes that write-back alone is ~15 us on an H100 (a third of a
# qwen3 T=1 call), a cost a model between two MoE layers does not pay. Rotating amortises it without letting
# one set's weights be found in L2 by the next (each set routes to its own experts).
ROTATE = 4


@dataclass
class Row:
    shape: str
    tokens: int
    backend: str
    dtype: str
    moekit_us: float
    tflops: float
    gbps: float
    active_experts: float  # mean over the rotated token sets (each routes to its own experts)
    floor_us: float | None
    efficiency: float | None
    max_rel_err: float
    grouped_mm_us: float | None
    eager_us: float | None
    graph: bool
    quant: str | None = None  # the moekit.quantize scheme of moekit's experts; None: unquantized (dtype)
    # CPU only (interleaved rounds, timing.time_cpu; the *_us fields above are medians): each variant's fastest
    # call and its spread (interquartile range / median). None on CUDA (do_bench's median) and in older files.
    moekit_min_us: float | None = None
    moekit_spread: float | None = None
    grouped_mm_min_us: float | None = None
    grouped_mm_spread: float | None = None
    eager_min_us: float | None = None
    eager_spread: float | None = None
    # The largest max_rel_err a correct kernel gives at this point (``error_tolerance``); None in older files.
    max_rel_err_tol: float | None = None

    @property
    def error_exceeds(self) -> bool:
        """Whether moekit's output is further from the reference than ``max_rel_err_tol`` allows (NaN included)."""
        return self.max_rel_err_tol is not None and not self.max_rel_err <= self.max_rel_err_tol

    @property
    def max_spread(self) -> float | None:
        """The largest spread of the variants timed at this point (None when none was measured)."""
        spreads = [s for s in (self.moekit_spread, self.grouped_mm_spread, self.eager_spread) if s is not None]
        return max(spreads, default=None)

    def as_dict(self) -> dict:
        return asdict(self)


def error_tolerance(dtype: torch.dtype, quant: str | None = None) -> float:
    """The max relative error above which the error column flags a point: what the tests allow for the same
    comparison (``moekit.testing``). Unquantized: the ``dtype``'s rounding (``TOLERANCES``). 8-bit schemes, against
    the unquantized reference: their quantization error (``QUANT_TOLERANCES`` of the scheme's qdtype).
    Weight-only ones, against their own dequantized weights: the kernel tests' bound (the dtype's rounding, at
    least ``QUANT_REFERENCE_TOLERANCE``)."""
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype: expected one of {list(TOLERANCES)}, got {dtype}")
    rounding = TOLERANCES[dtype].max
    _check_quant(quant)
    if quant is None:
        return rounding
    if quant in QUANT_SCHEMES:
        return max(rounding, QUANT_TOLERANCES[QUANT_SCHEMES[quant].qdtype].max)
    return max(rounding, QUANT_REFERENCE_TOLERANCE.max)


def _check_quant(quant: str | None, name: str = "quant") -> None:
    """``quant`` is None (unquantized) or a scheme the bench runs; the error names the argument ``name``."""
    if quant is not None and quant not in BENCH_SCHEMES:
        raise ValueError(f"{name}: expected None or one of {BENCH_SCHEMES}, got {quant!r}")


def _check_num_tokens(num_tokens: int) -> None:
    # bool is an int: True would time one token
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0:
        raise ValueError(f"num_tokens: expected a non-negative int, got {num_tokens!r}")


def make_weights(shape: MoEShape, dtype: torch.dtype, device: torch.device, seed: int,
                 quant: str | None = None) -> dict:
    """Random expert weights for ``shape``, scaled like nn.Linear's init; made once per shape.

    With ``quant`` (a ``moekit.quantize`` scheme), ``"quantized"`` also holds those weights quantized by
    ``moekit.quantize`` as a ``RoutedExperts``: moekit runs it, the baselines and the reference the float weights.
    """
    _check_quant(quant)
    g = torch.Generator(device=device).manual_seed(seed)
    rows = shape.activation.w13_rows(shape.intermediate_size)
    E, H, I = shape.num_experts, shape.hidden_size, shape.intermediate_size

    def rand(*dims: int, scale: float) -> torch.Tensor:
        return torch.randn(*dims, generator=g, device=device, dtype=dtype).mul_(scale)

    weights = {"w13": rand(E, rows, H, scale=H**-0.5), "w2": rand(E, H, I, scale=I**-0.5)}
    if shape.bias:
        weights["w13_bias"] = rand(E, rows, scale=0.1)
        weights["w2_bias"] = rand(E, H, scale=0.1)
    if quant is not None:
        weights["quantized"] = quantized_experts(shape, weights, quant)
    return weights


def quantized_experts(shape: MoEShape, weights: dict, scheme: str) -> RoutedExperts:
    """``weights`` quantized with ``moekit.quantize(…, scheme)``; ``weights`` themselves stay as they are."""
    if scheme not in BENCH_SCHEMES:
        raise ValueError(f"scheme: expected one of {BENCH_SCHEMES}, got {scheme!r}")
    # quantize replaces the parameters by new code tensors and never writes into the old ones.
    return quantize(float_experts(shape, weights), scheme)


def float_experts(shape: MoEShape, weights: dict) -> RoutedExperts:
    """A ``RoutedExperts`` layer whose parameters are ``weights``' float tensors themselves (built on meta: no
    second full-size copy is made)."""
    layer = RoutedExperts(shape.num_experts, shape.hidden_size, shape.intermediate_size, activation=shape.activation,
                          bias=shape.bias, dtype=weights["w13"].dtype, device="meta")
    for name in ("w13", "w2", "w13_bias", "w2_bias"):
        if name in weights:
            setattr(layer, name, nn.Parameter(weights[name], requires_grad=False))
    return layer


def make_tokens(shape: MoEShape, num_tokens: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """Random hidden states and routing from random logits through the real router, fresh per point."""
    _check_num_tokens(num_tokens)
    g = torch.Generator(device=device).manual_seed(seed + 1 + num_tokens)
    logits = torch.randn(num_tokens, shape.num_experts, generator=g, device=device)
    topk_weights, topk_ids = select_experts(logits, shape.top_k, renormalize=True)
    x = torch.randn(num_tokens, shape.hidden_size, generator=g, device=device, dtype=dtype)
    return {"hidden_states": x, "topk_weights": topk_weights, "topk_ids": topk_ids}


def reference_error(inputs: dict, out: torch.Tensor, shape: MoEShape, layer: RoutedExperts | None = None) -> float:
    """Max relative error of ``out`` against the fp32 torch backend on the first ``ERROR_TOKENS`` tokens, with the
    float weights of ``inputs``, or the weights of a weight-only ``layer`` dequantized to fp32 (its error is then
    the kernel's alone: rounding to 4 bits would hide it)."""
    n = min(ERROR_TOKENS, out.shape[0])
    if n == 0:
        return 0.0
    ids = inputs["topk_ids"][:n]
    used, local_ids = torch.unique(ids, return_inverse=True)  # only the experts these tokens use
    weights = inputs["topk_weights"][:n]
    x = inputs["hidden_states"][:n].float()
    # fp32 copies of every used expert would not fit beside the bf16 weights for the largest presets (deepseek-v3:
    # ~37 GB for 64 tokens' experts), so the reference runs over chunks of experts of at most ~2 GiB each; a
    # routed row whose expert is outside the chunk gets weight 0 (its output is scaled away, biases included).
    expert_bytes = 4 * (inputs["w13"][0].numel() + inputs["w2"][0].numel())
    chunk = max(1, REF_CHUNK_BYTES // expert_bytes)
    ref = torch.zeros(n, out.shape[1], dtype=torch.float32, device=out.device)
    for start in range(0, used.numel(), chunk):
        in_chunk = (local_ids >= start) & (local_ids < start + chunk)
        experts = used[start:start + chunk]
        w13, w2 = (inputs["w13"][experts].float(), inputs["w2"][experts].float()) if layer is None else \
            _dequantized(layer, experts)
        sub = {
            "hidden_states": x,
            "w13": w13,
            "w2": w2,
            "topk_weights": torch.where(in_chunk, weights, 0.0),
            "topk_ids": torch.where(in_chunk, local_ids - start, 0).to(torch.int32),
        }
        for k in ("w13_bias", "w2_bias"):
            if k in inputs:
                sub[k] = inputs[k][used[start:start + chunk]].float()
        ref += fused_experts(**sub, activation=shape.activation, backend="torch").float()
    return rel_errors(out[:n], ref)[0]


def _dequantized(layer: RoutedExperts, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (w13, w2) of a weight-only (integer or mxfp4) ``layer``'s ``experts`` (an index tensor), dequantized
    from its codes."""
    q = layer.quant_method.quant_params(layer)

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[experts]

    if q.weight_dtype == "mxfp4":
        return (dequantize_mxfp4(pick(layer.w13), pick(q.w13_scale)),
                dequantize_mxfp4(pick(layer.w2), pick(q.w2_scale)))
    return (dequantize_wna16(expert_weight(pick(layer.w13), pick(q.w13_scale), pick(q.w13_zp), q, layer.hidden_size)),
            dequantize_wna16(expert_weight(pick(layer.w2), pick(q.w2_scale), pick(q.w2_zp), q,
                                           layer.intermediate_size)))


def average_call(shape: MoEShape, num_tokens: int, actives: list[int], elem: int, ceilings: Ceilings | None,
                 quant: str | None) -> tuple[float | None, float]:
    """(floor µs, bytes) of the average call over token sets that touch ``actives`` experts each: both from each
    set's own count (a rounded mean count made GB/s describe other bytes than the floor: mixtral T=4 read 89.5% of
    the read ceiling in GB/s against 94% of the floor)."""
    fl = sum(floor_us(shape, num_tokens, a, elem, ceilings, quant) for a in actives) / len(actives) if ceilings else None
    return fl, sum(moe_bytes(shape, num_tokens, a, elem, quant) for a in actives) / len(actives)


def bench_point(
    shape: MoEShape,
    num_tokens: int,
    *,
    backend: str,
    dtype: torch.dtype,
    device: torch.device,
    ceilings: Ceilings | None,
    weights: dict | None = None,
    baselines: bool = True,
    seed: int = 0,
    quant: str | None = None,
) -> Row:
    """Time one (shape, T) point. Pass ``weights`` from ``make_weights`` (with the same ``quant``) to reuse them
    across token counts.

    With ``quant``, moekit runs the routed experts quantized by ``moekit.quantize`` (``auto`` picks what such a
    layer runs: Triton on CUDA with the scheme's dots, mxfp4 included, else torch; ``backend="triton"`` times
    the Triton kernel wherever it runs); the baselines run the float weights, and the floor counts the quantized weights (codes,
    scales, zero points: ``floor.moe_bytes``). The error column is against the unquantized fp32 reference for
    8-bit schemes (MEASURING.md) and against the fp32 reference on the dequantized weights for weight-only ones
    (integer groups and mxfp4).
    """
    _check_num_tokens(num_tokens)
    _check_quant(quant)
    if weights is None:
        weights = make_weights(shape, dtype, device, seed, quant)
    made_for = weights["quantized"].quant_method.name if "quantized" in weights else None
    if made_for != quant:  # moekit would time one format and the floor and error column count another
        raise ValueError(f"weights: expected make_weights(..., quant={quant!r})'s, got weights made with "
                         f"quant={made_for!r}")
    rotate = ROTATE if device.type == "cuda" else 1
    token_sets = [make_tokens(shape, num_tokens, dtype, device, seed + 7919 * i) for i in range(rotate)]
    # The bench times what the layer would run: its quant method's choice for 'auto' (e.g. torch for an fp8
    # layer on a GPU without fp8 dots).
    if quant is not None and backend == "auto":
        layer = weights["quantized"]
        backend = layer.quant_method.kernel_for(layer, token_sets[0]["hidden_states"]).experts.name
    backend = resolve_backend(backend, device)
    act = shape.activation
    bias_kw = {"w13_bias_E2I": weights.get("w13_bias"), "w2_bias_EH": weights.get("w2_bias")}
    float_weights = {k: v for k, v in weights.items() if k not in ("quantized", "layer")}
    cpu_layer = None
    if quant is None:
        moekit_weights = float_weights
        if device.type == "cpu":
            # On a CPU moekit is timed as a layer, as a model runs it: the torch backend packs a layer's weights
            # for oneDNN (moekit.kernel.cpu_packed) and runs bare fused_experts tensors on the plain GEMMs.
            cpu_layer = weights.setdefault("layer", float_experts(shape, float_weights))
            cpu_layer.backend = backend
    else:
        layer = weights["quantized"]
        moekit_weights = {"w13": layer.w13, "w2": layer.w2, "w13_bias": layer.w13_bias, "w2_bias": layer.w2_bias,
                          "quant": layer.quant_method.quant_params(layer)}

    def timed(fn, graph: bool) -> float:
        return time_us(lambda: [fn(**tokens) for tokens in token_sets], device, graph=graph) / rotate

    def moekit_fn(hidden_states, topk_weights, topk_ids):
        if cpu_layer is not None:
            with torch.no_grad():
                return cpu_layer(hidden_states, topk_weights, topk_ids)
        return fused_experts(hidden_states, topk_weights=topk_weights, topk_ids=topk_ids, activation=act,
                             backend=backend, **moekit_weights)

    def grouped_fn(hidden_states, topk_weights, topk_ids):
        return grouped_mm_experts(hidden_states, weights["w13"], weights["w2"], topk_weights, topk_ids,
                                  activation=act, **bias_kw)

    def eager_fn(hidden_states, topk_weights, topk_ids):
        return eager_experts(hidden_states, weights["w13"], weights["w2"], topk_weights, topk_ids,
                             activation=act, **bias_kw)

    weight_only = quant in WNA16_SCHEMES or quant in MXFP4_SCHEMES
    err = reference_error({**float_weights, **token_sets[0]}, moekit_fn(**token_sets[0]), shape,
                          weights["quantized"] if weight_only else None)
    # The torch backend syncs to size its per-expert loop, so only Triton is captured in a graph.
    graph = device.type == "cuda" and backend != "torch"
    variants = {"moekit": moekit_fn}
    if baselines:
        if _grouped_mm_runs(device, dtype):
            variants["grouped_mm"] = grouped_fn
        variants["eager"] = eager_fn
    cpu_stats = {}
    if device.type == "cuda":
        graphed = {"moekit": graph, "grouped_mm": True, "eager": False}
        timings = {name: timed(fn, graphed[name]) for name, fn in variants.items()}
    else:
        # Interleaved rounds (timing.time_cpu): the ratios hold on a machine other processes share.
        measured = time_cpu({name: (lambda fn=fn: fn(**token_sets[0])) for name, fn in variants.items()})
        timings = {name: t.median_us for name, t in measured.items()}
        for name, t in measured.items():
            cpu_stats.update({f"{name}_min_us": t.min_us, f"{name}_spread": t.spread})
    moekit_us = timings["moekit"]
    grouped_us = timings.get("grouped_mm")
    eager_us = timings.get("eager")

    actives = [int(torch.unique(tokens["topk_ids"]).numel()) for tokens in token_sets]
    fl, moved = average_call(shape, num_tokens, actives, weights["w13"].element_size(), ceilings, quant)
    return Row(
        shape=shape.name,
        tokens=num_tokens,
        backend=backend,
        dtype=str(dtype).removeprefix("torch."),
        moekit_us=moekit_us,
        tflops=moe_flops(shape, num_tokens) / moekit_us * 1e-6,
        gbps=moved / moekit_us * 1e-3,
        active_experts=sum(actives) / len(actives),
        floor_us=fl,
        efficiency=fl / moekit_us if fl else None,
        max_rel_err=err,
        max_rel_err_tol=error_tolerance(dtype, quant),
        grouped_mm_us=grouped_us,
        eager_us=eager_us,
        graph=graph,
        quant=quant,
        **cpu_stats,
    )


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm exists only in recent torch, and only for some devices/dtypes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.randn(32, 16, device=device, dtype=dtype)
        b = torch.randn(2, 16, 16, device=device, dtype=dtype)
        torch._grouped_mm(a, b.transpose(1, 2).contiguous().transpose(1, 2),
                          offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True

