"""``MoE.from_pretrained``: one MoE block of a transformers checkpoint directory, built from its config.json and
loaded with ``moekit.loading.load_moe``."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from moekit.config import MoEConfig, ParallelConfig
from moekit.families import read_hf_config, text_config
from moekit.layer import MoE
from moekit.loading import Checkpoint, _shown, load_moe
from moekit.quant.config import get_quant_method

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
) -> MoE:
    """``MoE.from_pretrained``: one MoE block of a checkpoint directory, built from its ``config.json`` and loaded
    with ``load_moe`` (only the tensors under the block's prefix are read; with ``parallel``, only this rank's
    experts among them)."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        raise FileNotFoundError(f"path: expected a checkpoint directory with config.json, got {path!r}")
    cfg = read_hf_config(path)
    # layer: the decoder layer index, as MoEConfig.from_hf reads it (a dense layer is refused there, naming the
    # sparse ones).
    config = replace(MoEConfig.from_hf(cfg, layer), backend=backend)  # validated again: backend is checked
    quant = cfg.get("quantization_config", text_config(cfg).get("quantization_config"))
    method = get_quant_method(quant) if quant is not None else None
    if dtype is None:
        named = cfg.get("dtype") or cfg.get("torch_dtype") or text_config(cfg).get("dtype")
        dtype = _CONFIG_DTYPES.get(named, torch.get_default_dtype())
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
    moe = MoE(config, dtype=dtype, device=device, quant_method=method, parallel=parallel, process_group=process_group)
    load_moe(moe, ckpt, prefix)
    return moe


def _decoder_layer(prefix: str) -> int | None:
    """The decoder layer index in a block prefix (``model.layers.7.mlp`` -> 7), or None."""
    m = re.search(r"(?:^|\.)(?:layers|h|blocks|blk)\.(\d+)(?:\.|$)", prefix)
    return int(m.group(1)) if m else None
