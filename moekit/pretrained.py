"""``MoE.from_pretrained``: one MoE block of a transformers checkpoint directory (built from its config.json) or of a
GGUF file (built from its metadata), loaded with ``moekit.loading.load_moe``."""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from moekit.config import MoEConfig, ParallelConfig
from moekit.families import read_hf_config, read_json, text_config
from moekit.layer import MoE
from moekit.checkpoint_gguf import GGUFCheckpoint, gguf_config, is_gguf
from moekit.loading import Checkpoint, _shown, load_moe
from moekit.checkpoint import CODE_DTYPES
from moekit.quant.base import weights_from_checkpoint
from moekit.quant.config import UnsupportedQuantization, get_quant_method
from moekit.quant.exclusions import experts_excluded

# config.json "dtype" / "torch_dtype" -> the layer's activation dtype
_CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def from_pretrained(
    path: str | os.PathLike,
    layer: int | None = None,
    *,
    prefix: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
    parallel: ParallelConfig | None = None,
    process_group: dist.ProcessGroup | None = None,
    dequantize_act_order: bool = False,
) -> MoE:
    """``MoE.from_pretrained``: one MoE block of a checkpoint directory, built from its ``config.json`` and loaded
    with ``load_moe`` (only the tensors under the block's prefix are read; with ``parallel``, only this rank's
    experts among them).

    ``path`` may also be a ``.gguf`` file (or a directory holding one and no config.json): the config comes from
    its metadata (``moekit.checkpoint_gguf.gguf_config``), the block is ``blk.{layer}`` and the experts' ggml types
    pick the weight format (``moekit.loading_gguf.gguf_quant_method``: Q4_0 -> w4a16 g32, Q8_0 (+ Q4_0) -> w8a16
    g32, exact; anything else is dequantized into ``dtype`` at load, with a warning naming the tensors). ``dtype``
    defaults to torch's default dtype there.

    The ``quantization_config``'s exclusion lists are read (``moekit.quant.exclusions``): a block whose routed
    experts the checkpoint keeps unquantized is built as an unquantized layer. A ModelOpt export that states its
    quantization only in ``hf_quant_config.json`` (none in config.json) is read from that file.

    ``dtype`` defaults to config.json's ``dtype`` (or ``torch_dtype``) when it names bfloat16, float16 or float32,
    else to torch's default dtype (with a warning when config.json names another value, e.g. ``"auto"``).
    ``device="meta"`` is refused: the weights are loaded (build ``MoE(config, device="meta")`` for an empty layer).
    """
    if device is not None and str(device).split(":")[0] == "meta":  # load_moe would refuse it, naming a parameter
        raise ValueError("device: 'meta' holds no values to load the checkpoint into; build MoE(config, "
                         "device='meta') for an empty layer, or pass a real device")
    if is_gguf(path):
        return _from_gguf(path, layer, prefix=prefix, dtype=dtype, device=device, backend=backend, parallel=parallel,
                          process_group=process_group)
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        raise FileNotFoundError(f"path: expected a checkpoint directory with config.json, got {path!r}")
    cfg = read_hf_config(path)
    # layer: the decoder layer index, as MoEConfig.from_hf reads it (a dense layer is refused there, naming the
    # sparse ones).
    config = replace(MoEConfig.from_hf(cfg, layer), backend=backend)  # validated again: backend is checked
    quant = cfg.get("quantization_config", text_config(cfg).get("quantization_config"))
    modelopt = Path(path) / "hf_quant_config.json"
    if quant is None and modelopt.is_file():  # get_quant_method / exclusions read its fields under "quantization"
        quant = {"quant_method": "modelopt", **read_json(modelopt)}
    if dtype is None:
        dtype = _config_dtype(cfg)
    ckpt = Checkpoint(path)
    found = ckpt.moe_prefixes()
    if prefix is not None and layer is not None:
        raise ValueError(f"layer/prefix: give one, got layer={layer!r} and prefix={prefix!r}")
    if prefix is None:
        if layer is None:
            if len(found) != 1:
                raise ValueError(f"layer: the checkpoint has {len(found)} MoE blocks; pick one with layer= (its "
                                 f"decoder layer index) or prefix=: {_shown(found)}")
            prefix = found[0]
        else:
            matches = [p for p in found if _decoder_layer(p) == layer]
            if len(matches) != 1:
                raise ValueError(f"layer: expected one MoE block of decoder layer {layer} in the checkpoint, found "
                                 f"{len(matches)} among {_shown(found)}; pass prefix=")
            prefix = matches[0]
    method = None
    if quant is not None:
        why = experts_excluded(quant, prefix, _expert_modules(ckpt, prefix))
        if why is None:
            method = get_quant_method(quant, dequantize_act_order=dequantize_act_order)
        else:  # the checkpoint keeps this block's experts unquantized: an unquantized layer, if the tensors agree
            _check_unquantized(ckpt, prefix, f"quantization_config keeps the experts of {prefix!r} unquantized "
                                             f"({why})")
    else:  # codes without a quantization_config: say so (load_moe's hint would point back at from_pretrained)
        _check_unquantized(ckpt, prefix, "config.json has no quantization_config (and no hf_quant_config.json is "
                                         "beside it): its experts are read as unquantized")
    with weights_from_checkpoint():  # the strict load below fills every routed weight, or raises
        moe = MoE(config, dtype=dtype, device=device, quant_method=method, parallel=parallel,
                  process_group=process_group)
    load_moe(moe, ckpt, prefix)
    return moe


def _from_gguf(path: str | os.PathLike, layer: int | None, *, prefix: str | None, dtype: torch.dtype | None,
               device: torch.device | str | None, backend: str, parallel: ParallelConfig | None,
               process_group: dist.ProcessGroup | None) -> MoE:
    from moekit.loading_gguf import gguf_quant_method  # (imports moekit.loading)

    ckpt = GGUFCheckpoint(path)
    found = ckpt.moe_layers()
    if prefix is not None and layer is not None:
        raise ValueError(f"layer/prefix: give one, got layer={layer!r} and prefix={prefix!r}")
    if prefix is not None:
        layer = _decoder_layer(prefix)
        if layer is None:
            raise ValueError(f"prefix: expected a GGUF block name 'blk.L', got {prefix!r}")
    if layer is None:
        if len(found) != 1:
            raise ValueError(f"layer: the GGUF file has {len(found)} MoE blocks; pick one with layer= (its decoder "
                             f"layer index): {_shown([f'blk.{i}' for i in found])}")
        layer = found[0]
    config = replace(gguf_config(ckpt, layer), backend=backend)
    block = f"blk.{layer}"
    method = gguf_quant_method(ckpt, block)
    with weights_from_checkpoint():  # the strict load below fills every routed weight, or raises
        moe = MoE(config, dtype=dtype or torch.get_default_dtype(), device=device, quant_method=method,
                  parallel=parallel, process_group=process_group)
    report = load_moe(moe, ckpt, block)
    quantized = {k: v for k, v in report.dequantized.items() if report.types[k] not in ("F32", "F16", "BF16")}
    if quantized:
        # Not silent: these tensors now take the memory of unquantized ones, and a narrower dtype rounds them.
        shown = ", ".join(f"{k} ({v})" for k, v in list(quantized.items())[:8])
        more = f", ... ({len(quantized)} in all)" if len(quantized) > 8 else ""
        warnings.warn(f"{ckpt.path.name} {block}: dequantized at load: {shown}{more}", stacklevel=3)
    return moe


def _expert_modules(ckpt: Checkpoint, prefix: str) -> list[str]:
    """The modules holding ``prefix``'s expert tensors: ``{prefix}.experts.{e}.{proj}`` per expert, or
    ``{prefix}.experts`` for fused tensors."""
    head = prefix + ".experts."
    return list(dict.fromkeys(k.rpartition(".")[0] for k in ckpt.keys() if k.startswith(head)))


# safetensors dtypes of float tensors; anything else under an excluded block's experts is a code.
_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")


def _check_unquantized(ckpt: Checkpoint, prefix: str, why: str) -> None:
    """Refuse a block read as unquantized (``why``: an exclusion list, or no quantization_config) that the checkpoint
    contradicts: routed experts holding codes, or shared experts stored packed (their dequantization needs the
    routed experts' quant method)."""
    for key in ckpt.keys():
        if not key.startswith(prefix + "."):
            continue
        stored = ckpt.dtype(key)
        if stored in _FLOAT_DTYPES:
            continue
        if key.startswith(prefix + ".experts."):
            raise UnsupportedQuantization(f"{why}, but checkpoint key {key!r} holds {stored} codes")
        if stored not in CODE_DTYPES:
            raise UnsupportedQuantization(f"checkpoint key {key!r}: packed {stored} shared-expert tensors in "
                                          f"a block whose routed experts are unquantized ({why}) are not supported")


def _config_dtype(cfg: dict) -> torch.dtype:
    """The layer dtype config.json names (``dtype``, older ``torch_dtype``); torch's default dtype otherwise."""
    named = cfg.get("dtype") or cfg.get("torch_dtype") or text_config(cfg).get("dtype")
    if named is None or (isinstance(named, str) and named in _CONFIG_DTYPES):
        return _CONFIG_DTYPES.get(named, torch.get_default_dtype())
    # "auto" (transformers: the checkpoint's own dtype) or a dtype no activation runs in (float8_e4m3fn, the
    # weights' codes): not silent, since the layer's dtype decides how every weight is rounded.
    default = torch.get_default_dtype()
    warnings.warn(f"config.json dtype {named!r} is not one of {sorted(_CONFIG_DTYPES)}; the layer is built in "
                  f"torch's default dtype {str(default).removeprefix('torch.')} (pass dtype= to choose)", stacklevel=3)
    return default


def _decoder_layer(prefix: str) -> int | None:
    """The decoder layer index in a block prefix (``model.layers.7.mlp`` -> 7), or None."""
    m = re.search(r"(?:^|\.)(?:layers|h|blocks|blk)\.(\d+)(?:\.|$)", prefix)
    return int(m.group(1)) if m else None
