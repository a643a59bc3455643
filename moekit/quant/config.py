"""A checkpoint's ``quantization_config`` (config.json) -> the quant method of its routed experts.

    quant_method          scheme                                                     moekit method
    fp8                   weight_block_size [128, 128], activations dynamic          Fp8BlockMoEMethod
                          (DeepSeek-V3/R1, Qwen3-FP8; ``weight_scale_inv``)
                          no weight_block_size: per tensor (as vLLM reads it),       Fp8TensorMoEMethod
                          activation_scheme dynamic | static (``input_scale``)
    compressed-tensors    config_groups weights {num_bits 8, type float|int, strategy} and input_activations:
                          float block [128, 128] + dynamic group 128  (FP8_BLOCK)    Fp8BlockMoEMethod
                          float channel + dynamic token               (FP8_DYNAMIC)  Fp8ChannelMoEMethod
                          float tensor + tensor, static or dynamic    (FP8)          Fp8TensorMoEMethod
                          int channel (symmetric) + dynamic token     (W8A8)         Int8ChannelMoEMethod
                          format pack-quantized: int weights per group, no activations
                          (W4A16, W4A16_ASYM, W8A16; actorder null)                  WNA16MoEMethod
                          format mxfp4-pack-quantized: float 4-bit weights per group 32,
                          no activations (MXFP4A16)                                  MXFP4MoEMethod
    modelopt              quant_algo FP8 (static ``input_scale``)                    Fp8TensorMoEMethod
    gptq                  bits 4 | 8, group_size, sym, checkpoint_format gptq (v1);  WNA16MoEMethod
                          desc_act=True with groups is refused (act order)
    awq                   version gemm, bits 4, zero_point true                      WNA16MoEMethod
    mxfp4                 gpt-oss (``*_blocks`` / ``*_scales``, fused experts)       MXFP4MoEMethod

Everything else is refused with the scheme named: a known format moekit has no method for yet (NVFP4, MXFP4
with quantized activations, GPTQ v2, ...) says "not supported yet", an unknown ``quant_method`` says so.
"""

from __future__ import annotations

from collections.abc import Mapping

from moekit._checks import check_bool
from moekit.ops.quantize_wna16 import DESC_ACT_MESSAGE
from moekit.quant.base import MoEQuantMethod
from moekit.quant.fp8 import Fp8BlockMoEMethod, Fp8ChannelMoEMethod, Fp8TensorMoEMethod
from moekit.quant.int8 import Int8ChannelMoEMethod
from moekit.quant.mxfp4 import MXFP4MoEMethod
from moekit.quant.wna16 import WNA16MoEMethod

# Formats that exist in the wild but have no moekit method yet (refused as "not supported yet").
NOT_YET = ("bitsandbytes", "gguf", "hqq", "eetq", "fbgemm_fp8", "torchao", "quark",
           "auto-round", "bitnet", "higgs", "vptq", "aqlm", "spqr", "fp_quant", "mxfp8")
_BLOCK = [128, 128]


class UnsupportedQuantization(ValueError):
    """A ``quantization_config`` moekit cannot run (the message names the scheme and the field)."""


def get_quant_method(quantization_config: Mapping, *, dequantize_act_order: bool = False) -> MoEQuantMethod:
    """The quant method of the routed experts a ``quantization_config`` describes (see the module docstring).

    ``dequantize_act_order``: a GPTQ checkpoint with ``desc_act=True`` and groups (act order, which no packed
    kernel here runs) loads dequantized into the layer's dtype instead of being refused; the layer is then an
    unquantized one, with a float layer's memory.

    Raises:
        TypeError: ``quantization_config`` is not a mapping.
        UnsupportedQuantization (a ValueError): an unknown ``quant_method``, or a scheme moekit does not run yet;
            the message names the scheme and the field that decided.
    """
    if not isinstance(quantization_config, Mapping):
        raise TypeError(f"quantization_config: expected a dict, got {type(quantization_config).__name__}")
    check_bool("dequantize_act_order", dequantize_act_order)
    method = quantization_config.get("quant_method")
    if method == "fp8":
        return _fp8(quantization_config)
    if method == "compressed-tensors":
        return _compressed_tensors(quantization_config)
    if method == "modelopt":
        return _modelopt(quantization_config)
    if method == "gptq":
        return _gptq(quantization_config, dequantize_act_order)
    if method == "awq":
        return _awq(quantization_config)
    if method == "mxfp4":
        return MXFP4MoEMethod()  # gpt-oss: one format, nothing to choose
    if isinstance(method, str) and method.lower() in NOT_YET:
        raise UnsupportedQuantization(f"quantization_config.quant_method: {method!r} checkpoints are not supported "
                                      "yet (moekit runs fp8, compressed-tensors, modelopt FP8, gptq, awq and mxfp4)")
    raise UnsupportedQuantization(f"quantization_config.quant_method: unknown {method!r}; expected one of "
                                  "['fp8', 'compressed-tensors', 'modelopt', 'gptq', 'awq', 'mxfp4']")


def _fp8(cfg: Mapping) -> MoEQuantMethod:
    fmt = cfg.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedQuantization(f"quantization_config.fmt: fp8 {fmt!r} is not supported yet (e4m3 only)")
    scheme = cfg.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise UnsupportedQuantization(f"quantization_config.activation_scheme: expected 'dynamic' or 'static', "
                                      f"got {scheme!r}")
    block = cfg.get("weight_block_size")
    if block is None:
        # vLLM reads an fp8 checkpoint without blocks as per-tensor weights (a weight_scale per projection).
        return Fp8TensorMoEMethod(static_input_scales=scheme == "static")
    if _block_size(block, "quantization_config.weight_block_size") != _BLOCK:
        raise UnsupportedQuantization(f"quantization_config.weight_block_size: fp8 blocks {list(block)} are not "
                                      f"supported yet (expected {_BLOCK})")
    if scheme != "dynamic":
        raise UnsupportedQuantization("quantization_config.activation_scheme: fp8 block weights with static "
                                      "activation scales are not supported yet (expected 'dynamic')")
    return Fp8BlockMoEMethod()


def _modelopt(cfg: Mapping) -> MoEQuantMethod:
    # config.json carries the fields at the top level; hf_quant_config.json nests them under "quantization".
    inner = cfg.get("quantization", cfg)
    algo = inner.get("quant_algo") if isinstance(inner, Mapping) else None
    if algo == "FP8":
        return Fp8TensorMoEMethod(static_input_scales=True)
    raise UnsupportedQuantization(f"quantization_config.quant_algo: modelopt {algo!r} is not supported yet "
                                  "(moekit runs modelopt 'FP8')")


def _block_size(value: object, where: str) -> list[int]:
    """A block shape as two positive ints (a bare 128, a float or a bool is a malformed config, not a block)."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)):
        raise UnsupportedQuantization(f"{where}: expected a list of two positive ints, got {value!r}")
    return list(value)


def _flag(group: Mapping, name: str, where: str) -> bool:
    """A bool field of a compressed-tensors scheme (default False): a string or None would be read by its
    truthiness, one branch one way and another the other."""
    value = group.get(name, False)
    if not isinstance(value, bool):
        raise UnsupportedQuantization(f"{where}.{name}: expected a bool, got {value!r}")
    return value


def _group_size(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (value <= 0 and value != -1):
        raise UnsupportedQuantization(f"{where}: expected a positive int or -1, got {value!r}")
    return value


def _gptq(cfg: Mapping, dequantize_act_order: bool = False) -> MoEQuantMethod:
    bits, group = cfg.get("bits"), _group_size(cfg.get("group_size", 128), "quantization_config.group_size")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (4, 8):  # 4.0 == 4: refuse the float
        raise UnsupportedQuantization(f"quantization_config.bits: gptq {bits}-bit weights are not supported yet "
                                      "(moekit runs 4 and 8)")
    fmt = cfg.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise UnsupportedQuantization(f"quantization_config.checkpoint_format: gptq {fmt!r} is not supported yet "
                                      "(moekit reads the v1 'gptq' storage)")
    act_order = bool(cfg.get("desc_act", False)) and group != -1
    if act_order and not dequantize_act_order:
        raise UnsupportedQuantization(f"quantization_config.desc_act: {DESC_ACT_MESSAGE} (pass "
                                      "dequantize_act_order=True to load such experts dequantized to the layer dtype)")
    sym = cfg.get("sym", True)
    if not isinstance(sym, bool):
        raise UnsupportedQuantization(f"quantization_config.sym: expected a bool, got {sym!r}")
    return WNA16MoEMethod(bits=bits, group_size=group, sym=sym, checkpoint_format="gptq", dequantize=act_order)


def _awq(cfg: Mapping) -> MoEQuantMethod:
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedQuantization(f"quantization_config.version: awq {version!r} is not supported yet "
                                      "(moekit reads 'gemm')")
    if cfg.get("bits", cfg.get("w_bit", 4)) != 4:
        raise UnsupportedQuantization(f"quantization_config.bits: awq {cfg.get('bits', cfg.get('w_bit'))}-bit "
                                      "weights are not supported (AWQ GEMM is 4-bit)")
    if not cfg.get("zero_point", True):
        raise UnsupportedQuantization("quantization_config.zero_point: awq without zero points is not supported yet")
    group = _group_size(cfg.get("group_size", cfg.get("q_group_size", 128)), "quantization_config.group_size")
    return WNA16MoEMethod(bits=4, group_size=group, sym=False, checkpoint_format="awq")


def _compressed_tensors(cfg: Mapping) -> MoEQuantMethod:
    if cfg.get("transform_config"):
        # Online rotations (e.g. Hadamard, SpinQuant): the weights were quantized in a rotated basis that the
        # model undoes at run time; loaded without it, every expert would compute in the wrong basis.
        raise UnsupportedQuantization("quantization_config.transform_config: compressed-tensors online transforms "
                                      "(rotations) are not supported")
    fmt = cfg.get("format")
    if fmt == "pack-quantized":
        return _ct_packed(cfg)
    if fmt == "mxfp4-pack-quantized":
        return _ct_mxfp4(cfg)
    if fmt in ("marlin-24", "nvfp4-pack-quantized"):
        raise UnsupportedQuantization(f"quantization_config.format: compressed-tensors {fmt!r} is not supported yet")
    groups = cfg.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise UnsupportedQuantization("quantization_config.config_groups: expected a non-empty object of "
                                      "compressed-tensors schemes")
    schemes = [_ct_scheme(name, g) for name, g in groups.items()]
    if any(type(s) is not type(schemes[0]) or s.static_input_scales != schemes[0].static_input_scales
           for s in schemes):
        raise UnsupportedQuantization(f"quantization_config.config_groups: groups {list(groups)} use different "
                                      "schemes; moekit needs one scheme for every expert")
    return schemes[0]


def _ct_scheme(name: str, group: object) -> MoEQuantMethod:
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(group, Mapping):
        raise UnsupportedQuantization(f"{where}: expected an object, got {type(group).__name__}")
    w, a = group.get("weights"), group.get("input_activations")
    if not isinstance(w, Mapping):
        raise UnsupportedQuantization(f"{where}.weights: expected an object, got {w!r}")
    bits, kind, strategy = w.get("num_bits"), w.get("type"), w.get("strategy")
    if bits != 8 or kind not in ("float", "int"):
        raise UnsupportedQuantization(f"{where}.weights: {kind} {bits}-bit weights ({strategy}) are not supported "
                                      "yet (moekit runs 8-bit float/int)")
    if not w.get("symmetric", True):
        raise UnsupportedQuantization(f"{where}.weights.symmetric: asymmetric 8-bit weights are not supported yet")
    if _flag(w, "dynamic", f"{where}.weights"):
        raise UnsupportedQuantization(f"{where}.weights.dynamic: dynamic weight scales are not supported")
    if not isinstance(a, Mapping):
        raise UnsupportedQuantization(f"{where}.input_activations: weight-only {kind} 8-bit (W8A16) is not "
                                      "supported yet")
    if a.get("num_bits") != 8 or a.get("type") != kind:
        raise UnsupportedQuantization(f"{where}.input_activations: {a.get('type')} {a.get('num_bits')}-bit "
                                      f"activations with {kind} 8-bit weights are not supported")
    if not a.get("symmetric", True):
        raise UnsupportedQuantization(f"{where}.input_activations.symmetric: asymmetric activations are not "
                                      "supported yet")
    act, dynamic = a.get("strategy"), _flag(a, "dynamic", f"{where}.input_activations")
    # (weight strategy, activation strategy, dynamic) -> method; static scales exist only per tensor.
    if kind == "float" and strategy == "block":
        block = w.get("block_structure")
        if _block_size(block, f"{where}.weights.block_structure") != _BLOCK:
            raise UnsupportedQuantization(f"{where}.weights.block_structure: fp8 blocks {block} are not supported "
                                          f"yet (expected {_BLOCK})")
        if act == "group" and dynamic and a.get("group_size") == _BLOCK[1]:
            return Fp8BlockMoEMethod()
    elif strategy == "channel" and act == "token" and dynamic:
        return Fp8ChannelMoEMethod() if kind == "float" else Int8ChannelMoEMethod()
    elif kind == "float" and strategy == "tensor" and act == "tensor":
        return Fp8TensorMoEMethod(static_input_scales=not dynamic)
    raise UnsupportedQuantization(f"{where}: {kind} 8-bit weights per {strategy} with "
                                  f"{'dynamic' if dynamic else 'static'} activations per {act} are not supported yet")


def _ct_packed(cfg: Mapping) -> MoEQuantMethod:
    """compressed-tensors ``pack-quantized``: one W4A16 / W4A16_ASYM / W8A16 group scheme for every expert."""
    groups = cfg.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise UnsupportedQuantization("quantization_config.config_groups: expected a non-empty object of "
                                      "compressed-tensors schemes")
    methods = []
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        w = group.get("weights") if isinstance(group, Mapping) else None
        if not isinstance(w, Mapping):
            raise UnsupportedQuantization(f"{where}.weights: expected an object, got {w!r}")
        bits, kind, strategy = w.get("num_bits"), w.get("type"), w.get("strategy")
        scheme = f"{kind} {bits}-bit weights per {strategy}"
        if group.get("input_activations") is not None:
            raise UnsupportedQuantization(f"{where}.input_activations: pack-quantized {scheme} with quantized "
                                          "activations is not supported yet (moekit runs W4A16, W4A16_ASYM, W8A16)")
        if kind != "int" or type(bits) is not int or bits not in (4, 8) or strategy not in ("group", "channel"):
            raise UnsupportedQuantization(f"{where}.weights: pack-quantized {scheme} is not supported yet (moekit "
                                          "runs int 4/8-bit per group: W4A16, W4A16_ASYM, W8A16)")
        if w.get("actorder") not in (None, "static", "weight"):
            raise UnsupportedQuantization(f"{where}.weights.actorder: {w.get('actorder')!r} (group activation "
                                          f"ordering) is not supported: {DESC_ACT_MESSAGE}")
        if w.get("dynamic", False):
            raise UnsupportedQuantization(f"{where}.weights.dynamic: dynamic weight scales are not supported")
        size = -1 if strategy == "channel" else _group_size(w.get("group_size"), f"{where}.weights.group_size")
        methods.append(WNA16MoEMethod(bits=bits, group_size=size, sym=bool(w.get("symmetric", True)),
                                      checkpoint_format="compressed-tensors"))
    if any(m.name != methods[0].name for m in methods):
        raise UnsupportedQuantization(f"quantization_config.config_groups: groups {list(groups)} use different "
                                      f"schemes ({[m.name for m in methods]}); moekit needs one for every expert")
    return methods[0]


def _ct_mxfp4(cfg: Mapping) -> MoEQuantMethod:
    """compressed-tensors ``mxfp4-pack-quantized``: MXFP4A16 (e2m1 weights, e8m0 scales per 32) for every expert."""
    groups = cfg.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise UnsupportedQuantization("quantization_config.config_groups: expected a non-empty object of "
                                      "compressed-tensors schemes")
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        w = group.get("weights") if isinstance(group, Mapping) else None
        if not isinstance(w, Mapping):
            raise UnsupportedQuantization(f"{where}.weights: expected an object, got {w!r}")
        got = (w.get("num_bits"), w.get("type"), w.get("strategy"), w.get("group_size"))
        if got != (4, "float", "group", 32) or not w.get("symmetric", True):
            raise UnsupportedQuantization(f"{where}.weights: mxfp4-pack-quantized {got[1]} {got[0]}-bit weights per "
                                          f"{got[2]} {got[3]} are not supported (moekit runs MXFP4A16: float 4-bit, "
                                          "symmetric, group 32)")
        if group.get("input_activations") is not None:
            raise UnsupportedQuantization(f"{where}.input_activations: MXFP4 with quantized activations is not "
                                          "supported yet (moekit runs MXFP4A16)")
    return MXFP4MoEMethod()
