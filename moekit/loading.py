"""Checkpoint loading: MoE weights from safetensors files (``moekit.checkpoint.Checkpoint``) into a ``moekit.MoE``,
one tensor at a time.

    ckpt   = Checkpoint(path)                       a .safetensors file, or a directory (model.safetensors, else
                                                     model.safetensors.index.json, else its shards: transformers'
                                                     order); nothing is read yet
    report = load_moe(moe, ckpt, "model.layers.3.mlp")
                                                     checks that block's keys and shapes from the headers, then
                                                     reads its tensors one at a time, converts each to moekit's
                                                     canonical layout and copies it into ``moe``; a failed check
                                                     (a shape, ``strict``) leaves ``moe`` untouched

Expert layouts understood under ``{prefix}.experts.`` (E experts, H hidden, I intermediate):

    per_expert   {e}.gate_proj.weight [I, H], {e}.up_proj.weight [I, H], {e}.down_proj.weight [H, I]
                 (Mixtral: {e}.w1 / w3 / w2)                       -> RoutedExperts.weight_loader, shard w1/w3/w2
    fused        gate_up_proj [E, 2I, H] (gate rows, then up), down_proj [E, H, I]        -> copied as they are
    gpt_oss      gate_up_proj [E, H, 2I] (gate/up columns interleaved), down_proj [E, I, H],
                 gate_up_proj_bias [E, 2I] (interleaved), down_proj_bias [E, H]  -> transposed, de-interleaved
    transposed   gate_up_proj [E, H, 2I] (gate columns, then up), down_proj [E, I, H], optional biases
                 (Llama4, openai_privacy_filter)                                  -> transposed

A transposed gate_up_proj alone cannot say whether its gate/up columns are interleaved, and with 2I = H it cannot
even say whether it is transposed: ``auto`` reads the checkpoint's ``config.json``, whose ``model_type`` decides
for the families in ``MODEL_LAYOUTS``; otherwise the shapes decide, and ``layout=`` is asked for where they cannot.

Around the experts: the router (``gate.weight``, ``router.weight`` [+ ``.bias``]), the correction bias
(``gate.e_score_correction_bias``, ``e_score_correction_bias``), and shared experts (``shared_expert(s).`` or
``shared_mlp.`` ``gate_proj``/``up_proj``/``down_proj``, ``shared_expert_gate.weight``).

Quantized experts (a ``W8A8MoEMethod`` layer; per-expert layout only): beside each ``{e}.<proj>.weight`` of 8-bit
codes, ``weight_scale_inv`` (DeepSeek-V3/Qwen3 fp8, fp32) or ``weight_scale`` (compressed-tensors, ModelOpt; any
float dtype), per block/row/tensor (0-d or [1]), and with static activation scales ``input_scale``, each checked
before anything is copied (NaN, inf, negative refused, 0 allowed; not every input scale 0); then
``process_weights_after_loading``. 8-bit shared experts are dequantized into the layer's dtype. Weight-only
4/8-bit experts (a ``WNA16MoEMethod`` layer) read the tensors its ``checkpoint_tensors`` names beside each
projection (compressed-tensors ``weight_packed``/``weight_scale``/``weight_zero_point``/``weight_shape``, GPTQ
``qweight``/``qzeros``/``scales``/``g_idx``, AWQ ``qweight``/``qzeros``/``scales``) through each parameter's own
``weight_loader`` (float group scales checked like the 8-bit ones); ``process_weights_after_loading`` converts them
into the kernel's layout. MXFP4 experts (an ``MXFP4MoEMethod`` layer) read compressed-tensors' per-expert
``weight_packed``/``weight_scale`` the same way, or gpt-oss's fused ``experts.{gate_up,down}_proj_{blocks,scales,bias}`` (layout ``gpt_oss``, found by ``auto``), whose
conversions (``MXFP4MoEMethod.gpt_oss_tensors``) de-interleave the gate/up rows (under TP, then cut).
``moekit.pretrained.from_pretrained`` (``MoE.from_pretrained``) builds the layer from config.json first.

Expert parallelism (a layer with an ``expert_map``): only this rank's experts are loaded; the other experts'
per-expert tensors are not read (``LoadReport.skipped``), the fused layouts' rows are selected after the read.
Tensor parallelism (``tp_size > 1``): each tensor is cut to the rank's slice of I after the read (gate and up rows
alike, w2's columns, w13_bias, per-row and block scales; w2_bias and per-tensor scales whole: see
``moekit.distributed.tensor_parallel``).

``expert_params_mapping`` gives the (param, checkpoint name, expert, shard) table for engines that drive
``RoutedExperts.weight_loader`` from their own loader, in the spirit of vLLM's ``make_expert_params_mapping``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit._checks import check_bool, check_choice, check_positive
from moekit._layout import deinterleave
from moekit.checkpoint import CODE_DTYPES, Checkpoint
from moekit.checkpoint_gguf import GGUFCheckpoint, is_gguf
from moekit.distributed import shard_intermediate
from moekit.layer import MoE
from moekit.loading_checks import (
    check_codes,
    check_correction_bias,
    check_input_scales,
    check_materialized,
    check_weight_scale,
    finite_in,
    no_nan_codes,
)
from moekit.loading_shared import check_e8m0_scale, check_group_scale, is_e8m0_scale, is_group_scale, load_shared
from moekit.quant.mxfp4 import MXFP4MoEMethod
from moekit.quant.w8a8 import W8A8MoEMethod
from moekit.quant.wna16 import WNA16MoEMethod
from moekit.routed_experts import RoutedExperts

LAYOUTS = ("auto", "per_expert", "fused", "gpt_oss", "transposed")
# config.json model_type -> the layout its fused experts are stored in (per-expert names are recognised first)
MODEL_LAYOUTS = {
    "gpt_oss": "gpt_oss",
    "llama4": "transposed",
    "llama4_text": "transposed",
    "openai_privacy_filter": "transposed",
}

# checkpoint projection name -> RoutedExperts shard id
_SHARDS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "w1": "w1", "w3": "w3", "w2": "w2"}
_ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class ExpertParamMapping:
    """One row of ``expert_params_mapping``: load ``weight_name`` into ``param_name`` as ``shard_id`` of
    ``expert_id`` via ``RoutedExperts.weight_loader``."""

    param_name: str
    weight_name: str
    expert_id: int
    shard_id: str


def expert_params_mapping(
    num_experts: int,
    *,
    gate: str = "gate_proj",
    up: str = "up_proj",
    down: str = "down_proj",
    param_prefix: str = "routed_experts.",
    weight_prefix: str = "experts.",
    tensors: Sequence[tuple[str, str]] = (("", "weight"),),
) -> list[ExpertParamMapping]:
    """The per-expert checkpoint names of one MoE block and where they load.

    ``experts.{e}.{gate}.weight`` -> ``routed_experts.w13`` shard ``w1``; ``{up}`` -> ``w13`` shard ``w3``;
    ``{down}`` -> ``w2`` shard ``w2``. Mixtral checkpoints use ``gate="w1", up="w3", down="w2"``. ``tensors``:
    ``(parameter suffix, checkpoint name)`` per tensor of a projection, e.g. a weight-only method's
    ``WNA16MoEMethod.checkpoint_tensors()`` (``("_qweight", "qweight")``: ``gate_proj.qweight`` -> ``w13_qweight``)
    or an 8-bit method's ``W8A8MoEMethod.checkpoint_tensors("weight_scale_inv")`` (codes, their scales, static input
    scales). The default lists the codes alone: an 8-bit layer then refuses ``process_weights_after_loading``.
    """
    check_positive("num_experts", num_experts)
    rows = []
    for e in range(num_experts):
        for proj, shard in ((gate, "w1"), (up, "w3"), (down, "w2")):
            param = "w2" if shard == "w2" else "w13"
            for suffix, name in tensors:
                rows.append(ExpertParamMapping(f"{param_prefix}{param}{suffix}", f"{weight_prefix}{e}.{proj}.{name}",
                                               e, shard))
    return rows


@dataclass
class LoadReport:
    """What ``load_moe`` did: checkpoint keys ``loaded``; ``missing`` (moekit tensors nothing filled, named by
    the checkpoint key expected for them); ``unexpected`` (keys under the prefix that nothing consumed);
    ``skipped`` (keys of experts held by other ranks under expert parallelism: known, not read)."""

    prefix: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected)


@torch.no_grad()
def load_moe(
    moe: MoE,
    checkpoint: Checkpoint | GGUFCheckpoint | str | os.PathLike,
    prefix: str,
    *,
    layout: str = "auto",
    strict: bool = True,
) -> LoadReport:
    """Load the block stored under ``prefix`` (e.g. ``model.layers.3.mlp``) into ``moe``.

    Every key, shape and dtype is checked from the checkpoint's headers, and every scale's values read, before
    anything is copied: when that raises, ``moe`` is unchanged. Float weights and biases are checked finite in the
    layer's dtype as each is read and copied (reading them all first would read the file twice): a refusal there
    leaves the tensors copied before it.

    Args:
        layout: ``auto`` (per-expert names if present; else the layout ``MODEL_LAYOUTS`` gives config.json's
            ``model_type``; else ``fused`` when ``gate_up_proj`` is [E, 2I, H], and a transposed [E, H, 2I] one is
            ``transposed``), or one of ``per_expert``, ``fused``, ``gpt_oss``, ``transposed``.
        strict: raise ``KeyError`` listing the missing and unexpected keys (or, when nothing is stored under
            ``prefix``, the checkpoint's MoE prefixes) instead of only reporting them.
    Raises:
        ValueError: a tensor's shape does not fit, a scale holds NaN, inf or a negative value or is stored as
            integers, a float weight/bias holds NaN/inf or a value beyond the layer's dtype (an fp16 layer: 65504)
            (the message names the checkpoint key), a shard is not a readable safetensors file (named), ``auto``
            cannot tell the layout from the shapes and there is no config.json to decide, or ``moe`` holds meta
            tensors (``moe.to_empty(device=...)`` first).

    A GGUF checkpoint (a ``GGUFCheckpoint``, a ``.gguf`` file, or a directory with one and no config.json) is
    loaded by ``moekit.loading_gguf.load_gguf`` (``prefix``: ``blk.L``), which returns a ``GGUFLoadReport``.
    """
    if is_gguf(checkpoint):
        check_choice("layout", layout, ("auto",))  # GGUF has one layout of its own
        from moekit.loading_gguf import load_gguf  # (it imports this module)

        return load_gguf(moe, checkpoint, prefix, strict=strict)
    if not isinstance(moe, MoE):
        raise TypeError(f"moe: expected a moekit.MoE, got {type(moe).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
    check_choice("layout", layout, LAYOUTS)
    check_bool("strict", strict)
    check_materialized(moe)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    prefix = prefix.rstrip(".") + "."
    # A decoder layer's or a dense MLP's prefix holds keys but no experts: named as such, not as missing keys.
    if strict and not any(k.startswith(prefix + "experts.") for k in ckpt.keys()):
        raise KeyError(_prefix_not_found(ckpt, prefix[:-1]))
    method = moe.routed_experts.quant_method
    mxfp4 = isinstance(method, MXFP4MoEMethod)
    if mxfp4 and layout == "auto" and f"{prefix}experts.gate_up_proj_blocks" in ckpt:
        layout = "gpt_oss"  # gpt-oss's mxfp4 tensors, which _detect_layout (bf16 names) does not know
    layout = _detect_layout(moe, ckpt, prefix) if layout == "auto" else layout
    if isinstance(method, W8A8MoEMethod):
        if layout != "per_expert":
            raise ValueError(f"layout: quantized experts load from per-expert tensors (experts.{{e}}.<proj>.weight "
                             f"+ scales), got the {layout!r} layout under {prefix[:-1]!r}")
        experts = moe.routed_experts
        merged = ((method.granularity == "tensor" and experts.activation.is_gated and experts.w13_scale.dim() == 1)
                  or (method.static_input_scales and experts.w13_input_scale.dim() == 0))
        if merged:
            raise ValueError("moe: its per-shard scales were merged by an earlier load "
                             "(process_weights_after_loading); load into a freshly built layer")
    if isinstance(method, (WNA16MoEMethod, MXFP4MoEMethod)):
        method.check_loadable(moe.routed_experts, layout=layout)
    report = LoadReport(prefix=prefix[:-1], layout=layout)
    plan = _Plan(ckpt, report)
    _load_router(moe, plan, prefix)
    if layout == "per_expert":
        _load_per_expert(moe, plan, prefix)
    elif mxfp4:
        _load_gpt_oss_mxfp4(moe, plan, prefix + "experts.")
    else:
        transposed = layout in ("gpt_oss", "transposed")
        _load_fused(moe, plan, prefix + "experts.", transposed=transposed, interleaved=layout == "gpt_oss")
    if moe.shared_experts is not None:
        load_shared(moe, plan, prefix)
    consumed = set(report.loaded) | set(report.skipped)
    report.unexpected = [k for k in ckpt.keys() if k.startswith(prefix) and k not in consumed]
    if strict and not report.ok:
        raise KeyError(f"load_moe({report.prefix!r}): missing {report.missing}, unexpected {report.unexpected}")
    plan.run()
    moe.routed_experts.process_weights_after_loading()  # e.g. per-shard fp8 scales merged per expert
    return report


def _prefix_not_found(ckpt: Checkpoint, prefix: str) -> str:
    found = ckpt.moe_prefixes()
    head = f"prefix {prefix!r}: no MoE block ('{prefix}.experts.' keys) in {ckpt.path}"
    if not found:
        return f"{head}; the checkpoint has no MoE blocks (no '.experts.' keys)"
    return f"{head}; the checkpoint has MoE blocks at: {_shown(found)}"


def _shown(prefixes: list[str]) -> str:
    return ", ".join(prefixes[:16]) + (f", ... ({len(prefixes)} in all)" if len(prefixes) > 16 else "")


class _Plan:
    """The copies of one ``load_moe`` call. Each is checked when planned, from the headers (its shape, after a
    conversion run on a meta tensor); ``run`` reads and copies them one at a time only once every check passed,
    so a failure leaves the module as it was."""

    def __init__(self, ckpt: Checkpoint, report: LoadReport) -> None:
        self.ckpt = ckpt
        self.report = report
        self._steps: list[tuple[str, Callable[[torch.Tensor], object]]] = []
        self._value_checks: list[Callable[[], None]] = []

    def first(self, keys: Iterable[str]) -> str | None:
        return next((k for k in keys if k in self.ckpt), None)

    def add(self, key: str, expected: Sequence[int], apply: Callable, transform: Callable | None = None,
            *, dtype: torch.dtype | None = None, finite: bool = True) -> None:
        """Plan ``apply(transform(tensor))`` for the tensor stored under ``key``, which must convert to ``expected``;
        with ``dtype`` (the destination's), 8-bit codes load only into codes of their own dtype and the other way,
        integers never into floats, and (``finite``) float values must stay finite in ``dtype`` (checked as the
        tensor is read: the copies before it stay)."""
        shape, expected, stored = self.ckpt.shape(key), tuple(expected), self.ckpt.dtype(key)
        if dtype is not None:
            check_codes(key, stored, dtype)
        if transform is None:
            if shape != expected:
                raise ValueError(f"checkpoint key {key!r}: expected shape {expected}, got {shape}")
        else:
            try:
                got = tuple(transform(torch.empty(shape, device="meta")).shape)
                if got != expected:
                    raise ValueError(f"expected shape {expected} after conversion, got {got}")
            except (RuntimeError, ValueError, IndexError) as err:
                raise ValueError(f"checkpoint key {key!r} (shape {shape}): {err}") from None
        values = dtype is not None and dtype.is_floating_point and dtype not in CODE_DTYPES.values()
        # fp8 codes are checked for NaN codes first, whether they stay codes or are dequantized (shared experts).
        nan_codes = no_nan_codes(key) if stored == "F8_E4M3" else None
        convert = _chain(nan_codes, transform, finite_in(key, dtype) if values and finite else None)
        if convert is not None:
            apply = _compose(apply, convert)
        self.report.loaded.append(key)
        self._steps.append((key, apply))

    def copy(self, dest: torch.Tensor, keys: list[str], transform: Callable | None = None, *,
             finite: bool = True) -> None:
        """Plan a copy of the first present key among ``keys`` into ``dest`` (after ``transform``); else report
        it missing."""
        key = self.first(keys)
        if key is None:
            self.report.missing.append(keys[0])
            return
        self.add(key, dest.shape, dest.copy_, transform, dtype=dest.dtype, finite=finite)

    def check_values(self, keys: list[str], check: Callable[[str, torch.Tensor], None]) -> None:
        """Run ``check(key, tensor)`` on the first present key among ``keys`` before anything is copied."""
        key = self.first(keys)
        if key is not None:
            self._value_checks.append(lambda: check(key, self.ckpt.get(key)))

    def check_together(self, keys: list[str], check: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """Run ``check({key: tensor})`` on the present keys among ``keys`` at once, before anything is copied: a
        condition on all of them (not every scale 0)."""
        present = [k for k in keys if k in self.ckpt]
        if present:
            self._value_checks.append(lambda: check({k: self.ckpt.get(k) for k in present}))

    def run(self) -> None:
        for check in self._value_checks:  # small tensors, read before the first copy
            check()
        for key, apply in self._steps:
            apply(self.ckpt.get(key))


def _compose(apply: Callable, transform: Callable) -> Callable:
    return lambda t: apply(transform(t))


def _detect_layout(moe: MoE, ckpt: Checkpoint, prefix: str) -> str:
    experts = prefix + "experts."
    if any(k.startswith(experts + "0.") for k in ckpt.keys()):
        return "per_expert"
    key = experts + "gate_up_proj"
    if key not in ckpt:
        return "per_expert"  # reported as missing per-expert keys
    types = ckpt.model_types()
    known = {MODEL_LAYOUTS[t] for t in types if t in MODEL_LAYOUTS}
    if len(known) == 1:
        # The family's own layout, whatever the shapes suggest: with 2I = H, gpt-oss's [E, H, 2I] has the shape of
        # a fused [E, 2I, H] and read as one gives silently wrong experts.
        return known.pop()
    cfg = moe.config
    num, hidden, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    rows = cfg.activation.w13_rows(inter)
    down = experts + "down_proj"
    down_shape = ckpt.shape(down) if down in ckpt else None
    fused = ckpt.shape(key) == (num, rows, hidden) and down_shape in (None, (num, hidden, inter))
    transposed = ckpt.shape(key) == (num, hidden, rows) and down_shape in (None, (num, inter, hidden))
    if fused and transposed:
        raise ValueError(
            f"layout: {key!r} {ckpt.shape(key)} reads as fused [E, 2I, H] and as transposed [E, H, 2I]; pass "
            "layout='fused', 'transposed' (gate columns, then up) or 'gpt_oss' (interleaved)"
        )
    if not transposed:
        return "fused"  # (shapes that fit neither are reported by the load, naming the key)
    # Llama4 and openai_privacy_filter store [E, H, 2I] with the gate columns first, gpt-oss interleaves them; the
    # shapes are the same, and de-interleaving concatenated columns gives silently wrong experts.
    if not types:
        raise ValueError(
            f"layout: {key!r} is stored transposed [E, H, 2I] and no config.json says whether its gate/up columns are "
            "interleaved; pass layout='gpt_oss' (interleaved) or layout='transposed' (gate columns, then up)"
        )
    return "transposed"


def _load_router(moe: MoE, plan: _Plan, prefix: str) -> None:
    weight_keys = [f"{prefix}{n}.weight" for n in _ROUTER_NAMES]
    key = plan.first(weight_keys)
    if key is not None and plan.ckpt.dtype(key) == "F32" and moe.gate.weight.dtype in (torch.bfloat16, torch.float16):
        # An fp32 router in a 16-bit checkpoint (DeepSeek-V3 style): rounded into the gate it would pick other
        # experts for some tokens. The gate (and its bias) turn fp32 when the plan runs, the same Parameter
        # objects; router_logits takes a gate whose dtype differs from the input's.
        plan.add(key, moe.gate.weight.shape, lambda t: _set_fp32(moe.gate, t), dtype=torch.float32)
    else:
        plan.copy(moe.gate.weight, weight_keys)
    if moe.gate.bias is not None:
        plan.copy(moe.gate.bias, [f"{prefix}{n}.bias" for n in _ROUTER_NAMES])
    if moe.e_score_correction_bias is not None:
        names = [f"{prefix}{n}.e_score_correction_bias" for n in _ROUTER_NAMES] + [f"{prefix}e_score_correction_bias"]
        plan.copy(moe.e_score_correction_bias, names, finite=False)  # -inf allowed: check_correction_bias
        plan.check_values(names, check_correction_bias)


@torch.no_grad()
def _set_fp32(gate: nn.Linear, weight: torch.Tensor) -> None:
    gate.weight.data = weight.to(device=gate.weight.device, dtype=torch.float32)
    if gate.bias is not None:  # F.linear needs the bias in the weight's dtype; its own copy follows
        gate.bias.data = gate.bias.data.float()


def _load_per_expert(moe: MoE, plan: _Plan, prefix: str) -> None:
    experts = moe.routed_experts
    method = experts.quant_method
    quantized = isinstance(method, W8A8MoEMethod)
    wna16 = isinstance(method, (WNA16MoEMethod, MXFP4MoEMethod))  # packed codes with their own loaders
    tensors = method.checkpoint_tensors() if wna16 else (("", "weight"),)
    # Mixtral names its projections w1/w3/w2; a weight-only checkpoint has no `.weight` beside them (qweight, ...).
    mixtral = plan.first(f"{prefix}experts.0.w1.{name}" for _, name in tensors)
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    if not experts.activation.is_gated:
        names = (names[1], names[2])  # non-gated: up -> all of w13, down -> w2
    # Global expert ids: under expert parallelism weight_loader keeps this rank's experts; the others' tensors
    # are not read (their keys, scales included, are reported as skipped).
    num_global, held = experts.held_experts()  # logical experts, also with redundant (EPLB) slots
    remote = set() if held is None else set(range(num_global)) - set(held)
    remote_names = {str(e) for e in remote}
    input_keys: dict[str, list[str]] = {"w13_input_scale": [], "w2_input_scale": []}
    plan.report.skipped += [k for k in plan.ckpt.keys() if k.startswith(prefix + "experts.")
                            and k.removeprefix(prefix + "experts.").split(".")[0] in remote_names]
    for row in expert_params_mapping(num_global, gate=names[0], up=names[1], down=names[-1], tensors=tensors):
        if (not experts.activation.is_gated and row.shard_id == "w3") or row.expert_id in remote:
            continue
        key = prefix + row.weight_name
        if wna16:
            _refuse_part_of_a_projection(plan, method, row.param_name.removeprefix("routed_experts."), key,
                                         dict(tensors))
        if key not in plan.ckpt:
            plan.report.missing.append(key)
            continue
        if wna16:
            # Each checkpoint tensor through its parameter's own weight_loader (N lies on a different axis per
            # tensor); process_weights_after_loading converts them.
            name = row.param_name.removeprefix("routed_experts.")
            param = getattr(experts, name)
            loader = functools.partial(param.weight_loader, param, shard_id=row.shard_id, expert_id=row.expert_id)
            tp = moe.parallel
            cut = method.tp_slicer(name.removeprefix("w13").removeprefix("w2"), row.shard_id,
                                   experts.intermediate_size * tp.tp_size, tp.tp_size, tp.tp_rank)
            plan.add(key, method.shard_shape(experts, name, row.shard_id), loader, cut, dtype=param.dtype)
            if is_group_scale(method, key):
                plan.check_values([key], check_group_scale)
            elif is_e8m0_scale(method, key):
                plan.check_values([key], check_e8m0_scale)
            continue
        w2 = row.shard_id == "w2"
        param = experts.w2 if w2 else experts.w13
        plan.add(key, _shard_shape(experts, param, row.shard_id), _expert_loader(experts, param, row),
                 _tp_slicer(moe, 1 if w2 else 0), dtype=param.dtype)
        if quantized:
            # Scales beside the codes: DeepSeek/Qwen fp8 ``weight_scale_inv`` (fp32), compressed-tensors and
            # ModelOpt ``weight_scale`` (any float dtype, copied into moekit's fp32 scales).
            base = key.removesuffix("weight")
            scale = experts.w2_scale if w2 else experts.w13_scale
            # Tensor parallelism: w1/w3's per-row scales and block scales go with the rows/columns they scale (MoE
            # refuses blocks that a slice would cut); w2's per-row and per-tensor scales are the whole expert's.
            sliced = method.granularity == "block" or (method.granularity == "channel" and not w2)
            _plan_scale(plan, experts, scale, row, [base + "weight_scale_inv", base + "weight_scale"],
                        _tp_slicer(moe, 1 if w2 else 0) if sliced else None, codes=key)
            plan.check_values([base + "weight_scale_inv", base + "weight_scale"], check_weight_scale)
            if method.static_input_scales:
                inputs = experts.w2_input_scale if w2 else experts.w13_input_scale
                _plan_scale(plan, experts, inputs, row, [base + "input_scale"])
                input_keys["w2_input_scale" if w2 else "w13_input_scale"].append(base + "input_scale")
    for name, keys in input_keys.items():  # checked before the copy: process_weights_after_loading merges them
        plan.check_together(keys, functools.partial(check_input_scales, name))
    if experts.w13_bias is not None:
        _plan_expert_biases(moe, plan, prefix, names, num_global, remote)


def _refuse_part_of_a_projection(plan: _Plan, method: object, name: str, key: str, names: dict[str, str]) -> None:
    """Refuse, before any copy (also under strict=False), a projection whose codes (``key``, of parameter ``name``)
    and the tensors the method needs with them (``companions``: scales, zero points) are only partly in the
    checkpoint: codes with the initial scales, or scales with the initial codes, compute a wrong projection.
    ``names``: the method's checkpoint tensor name per parameter suffix."""
    needs = method.companions.get(name, ())
    if not needs:
        return
    w = "w13" if name.startswith("w13") else "w2"
    stem = key.removesuffix(names[name.removeprefix(w)])
    group = [key, *(stem + names[c.removeprefix(w)] for c in needs)]
    absent = [k for k in group if k not in plan.ckpt]
    if absent and len(absent) < len(group):
        present = next(k for k in group if k in plan.ckpt)
        raise ValueError(f"{absent[0]}: missing from the checkpoint while {present} is there: {method.name} codes "
                         "load only with their scales (and zero points); strict=False leaves out whole projections, "
                         "not part of one")


def _plan_expert_biases(moe: MoE, plan: _Plan, prefix: str, names: tuple[str, ...], num_global: int,
                        remote: set[int]) -> None:
    """``experts.{e}.<proj>.bias`` of a per-expert checkpoint into w13_bias (gate, up halves; this rank's I slice
    under TP) and w2_bias (whole: TensorParallel adds it on one rank); a missing one is reported, not left zero."""
    experts = moe.routed_experts
    shards = ("w1", "w3", "w2") if experts.activation.is_gated else ("w1", "w2")
    for e in sorted(set(range(num_global)) - remote):
        for shard, proj in zip(shards, names):
            param = experts.w2_bias if shard == "w2" else experts.w13_bias
            key = f"{prefix}experts.{e}.{proj}.bias"
            if key not in plan.ckpt:
                plan.report.missing.append(key)
                continue
            loader = functools.partial(experts.weight_loader, param, shard_id=shard, expert_id=e)
            plan.add(key, _shard_shape(experts, param, shard), loader,
                     None if shard == "w2" else _tp_slicer(moe, 0), dtype=param.dtype)


def _plan_scale(plan: _Plan, experts: RoutedExperts, param: torch.Tensor, row: ExpertParamMapping,
                keys: list[str], transform: Callable | None = None, codes: str | None = None) -> None:
    """Plan ``param``'s shard from the first of ``keys`` present; ``codes``: the codes these scales belong to,
    which without them would compute with the scales' initial values (refused, also under strict=False)."""
    key = plan.first(keys)
    if key is None and codes is not None:
        raise ValueError(f"{' | '.join(keys)}: missing from the checkpoint while its codes {codes} are there: 8-bit "
                         "codes without their scales cannot be loaded (strict=False leaves out whole projections, "
                         "not the scales of a loaded one)")
    if key is None:
        # Several spellings (weight_scale_inv | weight_scale): name them all, the checkpoint's may be the second.
        plan.report.missing.append(keys[0] if len(keys) == 1 else " | ".join(keys))
        return
    shape = _shard_shape(experts, param, row.shard_id)
    # A per-tensor scale is stored 0-d (ModelOpt) or [1] (compressed-tensors): both load into one element. (A
    # tensor-parallel slicer, the other transform, is never given one.)
    if transform is None and math.prod(shape) == 1:
        transform = _reshape_to(shape)
    plan.add(key, shape, _expert_loader(experts, param, row), transform, dtype=param.dtype)


def _reshape_to(shape: tuple[int, ...]) -> Callable:
    return lambda t: t.reshape(shape)


def _shard_shape(experts: RoutedExperts, param: torch.Tensor, shard_id: str) -> tuple[int, ...]:
    """The shape ``RoutedExperts.weight_loader`` takes for one expert's ``shard_id`` of ``param`` (w1/w3: half of
    the w13* parameter's rows when gated, its scale rows included)."""
    shape = tuple(param.shape[1:])
    if shard_id != "w2" and experts.activation.is_gated:
        shape = (shape[0] // 2, *shape[1:])
    return shape


def _expert_loader(experts: RoutedExperts, param: torch.Tensor, row: ExpertParamMapping) -> Callable:
    return lambda t: experts.weight_loader(param, t, row.shard_id, row.expert_id)


def _load_fused(moe: MoE, plan: _Plan, experts_prefix: str, *, transposed: bool, interleaved: bool) -> None:
    experts = moe.routed_experts
    w13_from = w2_from = b13_from = None
    # Expert parallelism: this rank's rows of the [E_global, ...] tensors (a replicated expert's row once per slot).
    held = experts.held_experts()[1]
    local = None if held is None else torch.tensor(held, dtype=torch.int64)
    if transposed:

        def w13_from(t: torch.Tensor) -> torch.Tensor:
            t = t.transpose(1, 2)
            return deinterleave(t, dim=1) if interleaved else t

        def w2_from(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2)

    if interleaved:

        def b13_from(t: torch.Tensor) -> torch.Tensor:
            return deinterleave(t, dim=1)
    # Expert parallelism: this rank's experts (the whole tensor is still read); tensor parallelism: its I slice.
    rows = None if local is None else (lambda t: t.index_select(0, local))
    halves = 2 if experts.activation.is_gated else 1
    plan.copy(experts.w13, [experts_prefix + "gate_up_proj"], _chain(rows, w13_from, _tp_slicer(moe, 1, halves)))
    plan.copy(experts.w2, [experts_prefix + "down_proj"], _chain(rows, w2_from, _tp_slicer(moe, 2)))
    if experts.w13_bias is not None:  # w13_bias: this rank's I slice like w13's rows; w2_bias whole (H, no I)
        plan.copy(experts.w13_bias, [experts_prefix + "gate_up_proj_bias"],
                  _chain(rows, b13_from, _tp_slicer(moe, 1, halves)))
        plan.copy(experts.w2_bias, [experts_prefix + "down_proj_bias"], _chain(rows))


def _load_gpt_oss_mxfp4(moe: MoE, plan: _Plan, experts_prefix: str) -> None:
    """gpt-oss's fused mxfp4 tensors, converted whole (``MXFP4MoEMethod.gpt_oss_tensors``); this rank's experts
    and, under tensor parallelism, its share of I cut from the converted tensors: the gate and up halves of w13's
    rows (codes, scales, bias) alike, w2's bytes and scale groups along I (whole ones: ``check_tp_split``);
    w2_bias whole (``TensorParallel`` adds it on one rank)."""
    experts = moe.routed_experts
    held = experts.held_experts()[1]
    rows = None if held is None else functools.partial(torch.index_select, dim=0,
                                                        index=torch.tensor(held, dtype=torch.int64))
    cuts = {"w13": _tp_slicer(moe, 1, 2), "w13_scale": _tp_slicer(moe, 1, 2), "w13_bias": _tp_slicer(moe, 1, 2),
            "w2": _tp_slicer(moe, 2), "w2_scale": _tp_slicer(moe, 2)}
    for name, key, convert in experts.quant_method.gpt_oss_tensors(experts):
        dest, key = getattr(experts, name), experts_prefix + key
        if key in plan.ckpt and dest.dtype == torch.uint8 and plan.ckpt.dtype(key) != "U8":
            # copy_ would cast values into bytes: a bf16 checkpoint read as mxfp4.
            raise ValueError(f"checkpoint key {key!r}: expected mxfp4 bytes (U8), got {plan.ckpt.dtype(key)}")
        if is_e8m0_scale(experts.quant_method, key):
            plan.check_values([key], check_e8m0_scale)  # before any copy: the layer stays as it was on a refusal
        plan.copy(dest, [key], _chain(rows, convert, cuts.get(name)))


def _chain(*fns: Callable | None) -> Callable | None:
    """``fns`` applied in order (None entries skipped); None when all are None."""
    fns = [f for f in fns if f is not None]
    return (lambda t: functools.reduce(lambda acc, f: f(acc), fns, t)) if fns else None


def _tp_slicer(moe: MoE, dim: int, halves: int = 1) -> Callable | None:
    """This rank's slice of the intermediate dimension ``dim`` under tensor parallelism, else None."""
    tp_size, tp_rank = moe.parallel.tp_size, moe.parallel.tp_rank
    return None if tp_size == 1 else (lambda t: shard_intermediate(t, dim, tp_size, tp_rank, halves=halves))


def load_moes(checkpoint: Checkpoint | GGUFCheckpoint | str | os.PathLike, blocks: dict[str, MoE],
              **kwargs) -> list[LoadReport]:
    """``load_moe`` for several blocks of one checkpoint; ``blocks`` maps checkpoint prefix -> MoE."""
    if isinstance(checkpoint, (Checkpoint, GGUFCheckpoint)):
        ckpt = checkpoint
    else:
        ckpt = GGUFCheckpoint(checkpoint) if is_gguf(checkpoint) else Checkpoint(checkpoint)
    return [load_moe(moe, ckpt, prefix, **kwargs) for prefix, moe in blocks.items()]
