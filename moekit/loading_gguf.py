"""GGUF MoE blocks -> a ``moekit.MoE``: what runs packed, what is dequantized at load.

    method = gguf_quant_method(ckpt, "blk.3")     the layer's weight format from its expert tensors' types
    report = load_gguf(moe, ckpt, "blk.3")        checks every tensor's presence, shape and type first, then reads
                                                  and copies them one expert at a time (``load_moe`` dispatches
                                                  here for GGUF checkpoints)

One quant method per layer, from the ggml types of ``ffn_{gate,up,down}_exps``:

    all Q4_0                 w4a16 g32 symmetric (``WNA16MoEMethod(bits=4, group_size=32)``), codes repacked, exact
    Q8_0 (with Q4_0)         w8a16 g32 symmetric; Q4_0 projections are widened to 8-bit codes, exact (the usual
                             "down in a higher type" mix keeps every value, at 8 bits for the Q4_0 ones)
    anything else            unquantized: every expert weight dequantized (``gguf.quants.dequantize``) into the
                             layer's dtype (K-quants, IQ*, MXFP4, F16/BF16/F32, and mixes with them)

Router, correction bias, biases and shared experts are always dequantized into the layer's dtype (moekit keeps
them unquantized). ``GGUFLoadReport`` names the ggml type of every tensor read, the ones kept packed (with the
scheme) and the ones dequantized (with the dtype they now hold): the rounding of a dequantized value into a
bf16/fp16 layer is the only precision lost, and the report lists where it happens. Scales (Q8_0/Q4_0's fp16 d)
are kept in the narrowest of the layer's dtype, fp16 and bf16 that holds every one exactly (else float32, as for
WNA16 checkpoints): never rounded.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit._checks import check_bool, finite_extremes
from moekit.checkpoint_gguf import GGUF_BLOCK, GGUFCheckpoint, q4_0_to_wna16, q8_0_to_wna16
from moekit.layer import MoE
from moekit.loading import LoadReport
from moekit.loading_checks import check_correction_bias, check_materialized
from moekit.quant.unquantized import UnquantizedMoEMethod
from moekit.quant.wna16 import WNA16MoEMethod, _narrow_scales

PACKED_TYPES = ("Q8_0", "Q4_0")
_PROJS = ("gate", "up", "down")


@dataclass
class GGUFLoadReport(LoadReport):
    """``LoadReport`` plus, per tensor read: ``types`` (key -> ggml type), ``packed`` (key -> the WNA16 scheme it
    runs in, codes converted exactly) and ``dequantized`` (key -> "Q4_K -> torch.bfloat16": dequantized by
    ``gguf.quants`` into that dtype at load)."""

    types: dict[str, str] = field(default_factory=dict)
    packed: dict[str, str] = field(default_factory=dict)
    dequantized: dict[str, str] = field(default_factory=dict)


def gguf_quant_method(checkpoint: GGUFCheckpoint | str | os.PathLike, prefix: str) -> WNA16MoEMethod | None:
    """The quant method a layer needs to hold block ``prefix``'s (``blk.L``) routed experts without losing a bit:
    w4a16 g32 when all three projections are Q4_0, w8a16 g32 when they are Q8_0 and Q4_0, else None (unquantized,
    the experts are dequantized at load). Missing tensors give None (``load_gguf`` reports them)."""
    ckpt = _checkpoint(checkpoint)
    keys = [f"{_block(prefix)}ffn_{p}_exps.weight" for p in _PROJS]
    types = {ckpt.type_name(k) for k in keys if k in ckpt}
    if not types or not types <= set(PACKED_TYPES):
        return None
    return WNA16MoEMethod(bits=4 if types == {"Q4_0"} else 8, group_size=GGUF_BLOCK, sym=True)


@torch.no_grad()
def load_gguf(moe: MoE, checkpoint: GGUFCheckpoint | str | os.PathLike, prefix: str, *,
              strict: bool = True) -> GGUFLoadReport:
    """Load GGUF block ``prefix`` (``blk.L``, or the layer index L) into ``moe``; ``load_moe`` calls this for GGUF
    checkpoints. Every key, shape and type is checked before anything is copied: when this raises, ``moe`` is
    unchanged. With ``strict=False`` the weights (and scales) of a missing tensor keep what they held.

    ``moe``'s routed experts are unquantized (every expert weight dequantized into the layer's dtype) or a
    ``WNA16MoEMethod`` of moekit's own layout, group 32, symmetric, that the projections' types map onto exactly
    (``gguf_quant_method``; 4-bit: Q4_0 only; 8-bit: Q8_0 and Q4_0).

    Raises:
        KeyError: (``strict``) missing tensors or unexpected ``blk.L.ffn_*`` tensors, listed.
        ValueError: a shape that does not fit (named), a type the layer's method cannot hold exactly or the gguf
            package cannot dequantize, another quant method, tensor parallelism, a non-gated activation or meta
            tensors in ``moe`` (``moe.to_empty(device=...)`` first); a NaN/inf block scale of a packed expert, or a
            dequantized value that is NaN/inf or beyond the layer's dtype (an fp16 layer: 65504) (named; found as
            that tensor is copied, so after earlier ones).
    """
    if not isinstance(moe, MoE):
        raise TypeError(f"moe: expected a moekit.MoE, got {type(moe).__name__}")
    check_bool("strict", strict)
    check_materialized(moe)
    ckpt = _checkpoint(checkpoint)
    block = _block(prefix)
    experts = moe.routed_experts
    method = experts.quant_method
    if not experts.activation.is_gated:
        raise ValueError(f"moe: GGUF MoE blocks are gated (gate and up projections), got the non-gated activation "
                         f"{experts.activation.name!r}")
    if moe.parallel.tp_size != 1:
        raise ValueError(f"moe: GGUF loading reads whole experts; tensor parallelism (tp_size={moe.parallel.tp_size})"
                         " is not supported for it yet")
    packed = isinstance(method, WNA16MoEMethod)
    if packed and not (method.checkpoint_format == "moekit" and method.sym and method.group_size == GGUF_BLOCK):
        raise ValueError(f"moe: GGUF Q8_0/Q4_0 experts load into a symmetric group-{GGUF_BLOCK} WNA16 layer of "
                         f"moekit's layout, got {method.name} ({method.checkpoint_format})")
    if not packed and not isinstance(method, UnquantizedMoEMethod):
        raise ValueError(f"moe: GGUF experts load packed into w4a16_g32 / w8a16_g32 layers or dequantized into an "
                         f"unquantized one, got quant method {method.name!r}")
    if strict and not any(k.startswith(block) for k in ckpt.keys()):
        layers = ckpt.moe_layers()
        raise KeyError(f"prefix {block[:-1]!r} not found in {ckpt.path}; its MoE blocks: "
                       f"{[f'blk.{i}' for i in layers[:16]]}")
    report = GGUFLoadReport(prefix=block[:-1], layout="gguf")
    plan = _GGUFPlan(ckpt, report)
    held = experts.held_experts()[1]
    slots = list(enumerate(range(experts.num_experts) if held is None else held))
    _plan_router(moe, plan, block)
    if packed:
        _plan_packed(moe, plan, block, slots)
    else:
        _plan_dequantized(moe, plan, block, slots)
    if moe.shared_experts is not None:
        _plan_shared(moe, plan, block)
    # Everything under the block's ffn_*/exp_probs_b names is MoE; the norms around it are the decoder layer's.
    ours = [k for k in ckpt.keys() if k.startswith((block + "ffn_", block + "exp_probs_b"))
            and not k.startswith(block + "ffn_norm")]
    report.unexpected = [k for k in ours if k not in report.types]
    if strict and not report.ok:
        raise KeyError(f"load_gguf({report.prefix!r}): missing {report.missing}, unexpected {report.unexpected}")
    try:
        plan.run()
    except BaseException:  # the copies made before the failure went through .data: RoutedExperts.weights_changed
        experts.weights_changed()
        raise
    experts.process_weights_after_loading()  # says weights changed itself
    return report


def _checkpoint(checkpoint: GGUFCheckpoint | str | os.PathLike) -> GGUFCheckpoint:
    return checkpoint if isinstance(checkpoint, GGUFCheckpoint) else GGUFCheckpoint(checkpoint)


def _block(prefix: str | int) -> str:
    """``blk.L.`` from ``blk.L``, ``blk.L.`` or L."""
    if isinstance(prefix, int) and not isinstance(prefix, bool):
        return f"blk.{prefix}."
    if not isinstance(prefix, str):
        raise TypeError(f"prefix: expected 'blk.L' or a layer index, got {type(prefix).__name__}")
    return prefix.rstrip(".") + "."


class _GGUFPlan:
    """The copies of one ``load_gguf`` call, checked when planned; ``run`` performs them once every check passed."""

    def __init__(self, ckpt: GGUFCheckpoint, report: GGUFLoadReport) -> None:
        self.ckpt, self.report = ckpt, report
        self._steps: list[Callable[[], None]] = []
        self._checks: list[tuple[str, Callable[[], None]]] = []

    def present(self, key: str, shape: tuple[int, ...]) -> bool:
        """Whether ``key`` is stored (else reported missing); raises when its shape is not ``shape``."""
        if key not in self.ckpt:
            self.report.missing.append(key)
            return False
        got = self.ckpt.shape(key)
        if got != tuple(shape):
            raise ValueError(f"checkpoint key {key!r}: expected shape {tuple(shape)}, got {got}")
        self.report.types[key] = self.ckpt.type_name(key)
        return True

    def dequantized(self, key: str, dest: torch.Tensor, index: int | None = None, *,
                    reshape: tuple[int, ...] | None = None, finite: bool = True) -> None:
        """Plan ``dest.copy_(values of key[index])`` (dequantized unless a float type kept as is); ``finite``:
        refuse NaN/inf values (off for the correction bias, whose own check allows -inf: "never this expert")."""
        kind = self.ckpt.type_name(key)
        if kind not in ("F32", "F16", "BF16") or kind != _FLOAT_NAMES.get(dest.dtype):
            self.report.dequantized[key] = f"{kind} -> {dest.dtype}"
        # A type gguf cannot dequantize fails before any copy.
        self.check(key, lambda: self.ckpt.dequantize(key, 0 if index is not None else None))

        def step() -> None:
            values = self.ckpt.dequantize(key, index)
            cast = values.to(dest.dtype)
            if finite and cast.is_floating_point() and not finite_extremes(cast):
                # A NaN/inf weight (a corrupted block scale), or a value beyond the layer's dtype (1e5 in fp16),
                # would make every token routed there NaN/inf. Checked as each tensor is read, like the packed
                # scales: the copies before it stay (load_gguf's docstring).
                where = "" if index is None else f" (expert {index})"
                if not finite_extremes(values):
                    raise ValueError(f"checkpoint key {key!r}{where}: NaN or inf after dequantization ({kind}): a "
                                     "corrupted checkpoint")
                raise ValueError(f"checkpoint key {key!r}{where}: values beyond the range of the layer's "
                                 f"{str(dest.dtype).removeprefix('torch.')} (max |x| {float(values.abs().max()):g})")
            dest.copy_(cast if reshape is None else cast.reshape(reshape))

        self._steps.append(step)

    def check(self, key: str, check: Callable[[], None]) -> None:
        """Run ``check`` (once per key) before the first copy."""
        if not any(c[0] == key for c in self._checks):
            self._checks.append((key, check))

    def add(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def run(self) -> None:
        for _, check in self._checks:
            check()
        for step in self._steps:
            step()


_FLOAT_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _plan_router(moe: MoE, plan: _GGUFPlan, block: str) -> None:
    cfg = moe.config
    key = block + "ffn_gate_inp.weight"
    if plan.present(key, (cfg.num_experts, cfg.hidden_size)):
        plan.dequantized(key, moe.gate.weight)
    if moe.gate.bias is not None and plan.present(block + "ffn_gate_inp.bias", (cfg.num_experts,)):
        plan.dequantized(block + "ffn_gate_inp.bias", moe.gate.bias)
    if moe.e_score_correction_bias is not None:
        key = block + "exp_probs_b.bias"
        if plan.present(key, (cfg.num_experts,)):
            bias = plan.ckpt.dequantize(key)  # small: checked now, before anything is copied
            check_correction_bias(key, bias)
            plan.dequantized(key, moe.e_score_correction_bias, finite=False)


def _expert_shapes(moe: MoE) -> dict[str, tuple[int, int, int]]:
    cfg = moe.config
    e, h, i = moe.routed_experts.held_experts()[0], cfg.hidden_size, cfg.intermediate_size  # E logical
    return {"gate": (e, i, h), "up": (e, i, h), "down": (e, h, i)}


def _plan_dequantized(moe: MoE, plan: _GGUFPlan, block: str, slots: list[tuple[int, int]]) -> None:
    experts = moe.routed_experts
    inter = moe.config.intermediate_size
    for proj, shape in _expert_shapes(moe).items():
        key = f"{block}ffn_{proj}_exps.weight"
        if not plan.present(key, shape):
            continue
        param = experts.w2 if proj == "down" else experts.w13
        rows = {"gate": slice(0, inter), "up": slice(inter, 2 * inter), "down": slice(None)}[proj]
        for slot, e in slots:
            plan.dequantized(key, param.data[slot, rows], e)
    _plan_biases(moe, plan, block, slots)


def _plan_biases(moe: MoE, plan: _GGUFPlan, block: str, slots: list[tuple[int, int]]) -> None:
    experts = moe.routed_experts
    if experts.w13_bias is None:
        return
    cfg = moe.config
    inter = cfg.intermediate_size
    for proj, (param, rows, n) in {"gate": (experts.w13_bias, slice(0, inter), inter),
                                   "up": (experts.w13_bias, slice(inter, 2 * inter), inter),
                                   "down": (experts.w2_bias, slice(None), cfg.hidden_size)}.items():
        key = f"{block}ffn_{proj}_exps.bias"
        if plan.present(key, (experts.held_experts()[0], n)):
            for slot, e in slots:
                plan.dequantized(key, param.data[slot, rows], e)


def _plan_packed(moe: MoE, plan: _GGUFPlan, block: str, slots: list[tuple[int, int]]) -> None:
    experts = moe.routed_experts
    bits = experts.quant_method.bits
    allowed = ("Q4_0",) if bits == 4 else PACKED_TYPES
    inter = moe.config.intermediate_size
    scheme = experts.quant_method.name
    # The fp16 d of every block, gathered on the layer's device in float32 (exact for fp16 d and for whatever the
    # scales held) from the current scales: rows of a projection missing under strict=False keep their values.
    scales = {name: getattr(experts, f"{name}_scale").detach().to(torch.float32, copy=True)
              for name in ("w13", "w2")}
    for proj, shape in _expert_shapes(moe).items():
        key = f"{block}ffn_{proj}_exps.weight"
        # A packed tensor's stored shape is [E, N, K/32 · bytes]; ckpt.shape gives the logical [E, N, K].
        if not plan.present(key, shape):
            continue
        kind = plan.ckpt.type_name(key)
        if kind not in allowed:
            raise ValueError(f"checkpoint key {key!r}: holds {kind} blocks, which {scheme} cannot hold exactly "
                             f"(expected {' or '.join(allowed)}); build the layer with gguf_quant_method's choice "
                             "(MoE.from_pretrained does), or unquantized to dequantize at load")
        plan.report.packed[key] = scheme
        name = "w2" if proj == "down" else "w13"
        rows = {"gate": slice(0, inter), "up": slice(inter, 2 * inter), "down": slice(None)}[proj]
        codes = getattr(experts, name).data
        steps = [_packed_step(plan.ckpt, key, kind, e, bits, codes[slot, rows], scales[name][slot, rows])
                 for slot, e in slots]
        if steps:  # converting one expert checks the blocks against the layer's shapes before anything is copied
            plan.check(key, functools.partial(steps[0], dry_run=True))
        for step in steps:
            plan.add(step)

    def narrow_scales() -> None:
        for name, s in scales.items():
            param = experts._parameters[f"{name}_scale"]
            # A meta layer holds no values to check: its scales keep their dtype.
            data = s.to(param.dtype) if s.device.type == "meta" else _narrow_scales(s, experts.params_dtype)
            # The same Parameter object (an engine's params_dict or hooks may hold it), its data swapped: same
            # device, so set_data takes the new dtype.
            param.data = data

    plan.add(narrow_scales)
    _plan_biases(moe, plan, block, slots)


def _packed_step(ckpt: GGUFCheckpoint, key: str, kind: str, expert: int, bits: int, codes: torch.Tensor,
                 scales: torch.Tensor) -> Callable[..., None]:
    def step(dry_run: bool = False) -> None:
        raw = ckpt.raw(key, expert)
        w = q8_0_to_wna16(raw) if kind == "Q8_0" else q4_0_to_wna16(raw, bits)
        for what, got, dest in (("codes", w.qweight, codes), ("scales", w.scales, scales)):
            if got.shape != dest.shape:
                raise ValueError(f"checkpoint key {key!r}: expert {expert}'s {kind} blocks give {what} of shape "
                                 f"{tuple(got.shape)}, the layer holds {tuple(dest.shape)}")
        # A NaN/inf d makes its block's weights NaN. Found only as each expert is read (checking every expert first
        # would read the file twice): the layer is then left partly copied, as after a failed copy. A negative d is
        # valid (Q4_0's d = max / -8 for the signed value of largest magnitude).
        if not finite_extremes(w.scales):
            raise ValueError(f"checkpoint key {key!r}: expert {expert}'s {kind} blocks hold a NaN/inf scale d (a "
                             "corrupted file)")
        if not dry_run:
            codes.copy_(w.qweight)
            scales.copy_(w.scales)

    return step


def _plan_shared(moe: MoE, plan: _GGUFPlan, block: str) -> None:
    shared = moe.shared_experts
    h, inter = moe.config.hidden_size, shared.intermediate_size
    gate_up = shared.gate_up_proj.weight.data
    for proj, dest in (("gate", gate_up[:inter]), ("up", gate_up[inter:]), ("down", shared.down_proj.weight.data)):
        key = f"{block}ffn_{proj}_shexp.weight"
        if plan.present(key, tuple(dest.shape)):
            plan.dequantized(key, dest)
    if shared.gate is not None:
        key = block + "ffn_gate_inp_shexp.weight"
        if plan.present(key, (h,)):  # Qwen2-MoE's Linear(H, 1), stored as a vector
            plan.dequantized(key, shared.gate.weight.data, reshape=(1, h))
