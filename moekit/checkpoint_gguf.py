"""GGUF files (llama.cpp): metadata -> ``MoEConfig``, MoE tensors as raw blocks or dequantized, read lazily.

    ckpt = GGUFCheckpoint("model.gguf")      a .gguf file, or a directory holding exactly one (memory-mapped by the
                                             ``gguf`` package, the optional extra ``moekit[gguf]``; nothing is read yet)
    gguf_config(ckpt, layer)                 the MoEConfig of block ``layer`` from the ``<arch>.*`` metadata
    ckpt.type_name(key), ckpt.shape(key)     the ggml type ("Q8_0", "Q4_K", "F32", ...) and the logical shape
    ckpt.raw(key, index)                     uint8 blocks [..., N, bytes per row] (one expert with ``index``)
    ckpt.dequantize(key, index)              float32, by ``gguf.quants.dequantize`` (the reference for every type)
    q8_0_to_wna16 / q4_0_to_wna16            Q8_0 / Q4_0 blocks -> the WNA16 layout, exact (no rounding)

Tensors of the MoE block of decoder layer L (``gguf/constants.py``; E experts, H hidden, I intermediate):

    blk.L.ffn_gate_inp.weight [E, H] (+ .bias: gpt-oss)        router
    blk.L.exp_probs_b.bias [E]                                 correction bias (DeepSeek-V3)
    blk.L.ffn_{gate,up}_exps.weight [E, I, H], ffn_down_exps.weight [E, H, I] (+ .bias: gpt-oss)
    blk.L.ffn_{gate,up}_shexp.weight [Is, H], ffn_down_shexp.weight [H, Is]   shared experts
    blk.L.ffn_gate_inp_shexp.weight [H]                        shared-expert gate (Qwen2-MoE)

Shapes: GGUF lists a tensor's ``ne`` fastest dimension first ([K, N, E]); numpy/torch order is its reverse,
[E, N, K], which is already moekit's N-first layout: no transpose. Block types (``GGML_QUANT_SIZES``):

    Q8_0   32 elements in 34 bytes: fp16 d, 32 int8 q                     W = q · d
    Q4_0   32 elements in 18 bytes: fp16 d, 16 bytes; element j in the low nibble of byte j, element j + 16 in its
           high nibble                                                    W = (q − 8) · d
    K-quants (Q4_K, Q5_K, Q6_K, ...), IQ*, MXFP4, ...: dequantized by ``gguf.quants`` (blocks of 256 / 32)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moekit._checks import check_choice
from moekit.config import MoEConfig, RoutingConfig
from moekit.ops.activation import Activation
from moekit.ops.quantize_wna16 import WNA16Weight

GGUF_BLOCK = 32  # elements per Q8_0 / Q4_0 block: the group size of the WNA16 layout they map onto
ARCHS = ("qwen3moe", "qwen2moe", "llama", "deepseek2", "gpt-oss")
_FLOAT_TYPES = ("F32", "F16", "BF16")


def _gguf():
    """The ``gguf`` package, imported on first use: an optional dependency, named with its extra when missing."""
    try:
        import gguf
    except ImportError as err:
        raise ImportError("moekit reads GGUF files with the gguf package: pip install 'moekit[gguf]'") from err
    return gguf


class GGUFCheckpoint:
    """Lazy, read-only view of one GGUF file: its metadata, and its tensors by name (``blk.L.ffn_gate_exps.weight``).

    ``path``: a ``.gguf`` file, or a directory holding exactly one (split files ``*-00001-of-0000N.gguf`` are refused:
    merge them with llama.cpp's ``gguf-split --merge``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a .gguf file or a directory, got {type(path).__name__}")
        self.path = gguf_file(path)
        gguf = _gguf()
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError) as err:
            raise ValueError(f"checkpoint file {self.path}: not a readable GGUF file: {err}") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.arch = self.metadata("general.architecture")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def metadata(self, key: str, default: object = ...) -> object:
        """The value of metadata ``key`` (a str, number, bool or list); ``default`` when absent, else KeyError."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is ...:
                raise KeyError(f"GGUF metadata {key!r} not found in {self.path}")
            return default
        return field.contents()

    def _tensor(self, key: str):
        if key not in self._tensors:
            raise KeyError(f"checkpoint key {key!r} not found in {self.path}")
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """The logical shape in numpy/torch order (``ne`` reversed): ``[E, N, K]`` for expert tensors."""
        return tuple(int(n) for n in reversed(self._tensor(key).shape))

    def type_name(self, key: str) -> str:
        """The ggml type of ``key``: ``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``, ``Q4_K``, ..."""
        return self._tensor(key).tensor_type.name

    def raw(self, key: str, index: int | None = None) -> torch.Tensor:
        """The stored blocks of ``key`` (or of its row ``index`` along the first dim) as uint8 [..., N, bytes per
        row], copied out of the mapped file."""
        import numpy as np  # (gguf's dependency; moekit's core does not need numpy)

        data = self._tensor(key).data
        data = data if index is None else data[index]
        return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).copy())

    def dequantize(self, key: str, index: int | None = None) -> torch.Tensor:
        """float32 values of ``key`` (or of its row ``index`` along the first dim) by ``gguf.quants.dequantize``.

        Raises:
            ValueError: a type the gguf package cannot dequantize (named with the key).
        """
        import numpy as np

        t = self._tensor(key)
        data = t.data if index is None else t.data[index]
        try:
            values = _gguf().quants.dequantize(np.asarray(data), t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"checkpoint key {key!r}: ggml type {t.tensor_type.name} cannot be dequantized by the "
                             f"gguf package") from None
        shape = self.shape(key) if index is None else self.shape(key)[1:]
        return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)

    def moe_layers(self) -> list[int]:
        """The decoder layers whose block has routed experts (a router ``blk.L.ffn_gate_inp.weight``), in order."""
        found = {int(k.split(".")[1]) for k in self._tensors
                 if k.startswith("blk.") and k.endswith(".ffn_gate_inp.weight")}
        return sorted(found)


def gguf_file(path: str | os.PathLike) -> Path:
    """The one ``.gguf`` file ``path`` names: the file itself, or the only one in a directory."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"path: {path} is neither a .gguf file nor a directory")
    files = sorted(path.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"path: expected exactly one .gguf file in {path}, found "
                                f"{[f.name for f in files] or 'none'} (split GGUF files are not supported: merge "
                                f"them with gguf-split --merge)")
    return files[0]


def is_gguf(path: object) -> bool:
    """Whether ``path`` is a GGUF checkpoint: a ``GGUFCheckpoint``, a ``.gguf`` file, or a directory holding
    ``.gguf`` files and no ``config.json`` (a transformers checkpoint with its GGUF export beside it stays one)."""
    if isinstance(path, GGUFCheckpoint):
        return True
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = Path(path)
    if p.is_dir():
        return not (p / "config.json").is_file() and any(p.glob("*.gguf"))
    return p.suffix == ".gguf"


# ------------------------------------------------------------------------------------------------------ config


def gguf_config(checkpoint: GGUFCheckpoint | str | os.PathLike, layer: int | None = None) -> MoEConfig:
    """The ``MoEConfig`` of a GGUF model's MoE blocks from its ``<arch>.*`` metadata.

    Args:
        layer: a decoder layer index; it must hold an MoE block (a router tensor). None: the first MoE block's
            tensors decide what is per block (a correction bias, a shared-expert gate).
    Raises:
        ValueError: an architecture not in ``ARCHS``, a dense ``layer`` (the message names the MoE layers), or
            metadata moekit cannot express (named).

    Per architecture (``general.architecture``; what llama.cpp computes for it):

        qwen3moe   softmax, renormalized
        qwen2moe   softmax, not renormalized; shared MLP ``expert_shared_feed_forward_length`` + its sigmoid gate
        llama      Mixtral (``expert_count`` > 0): softmax, renormalized; I = ``expert_feed_forward_length`` or
                   ``feed_forward_length``
        deepseek2  ``expert_gating_func`` (1 softmax, 2 sigmoid; default softmax), ``expert_weights_norm``
                   (default false), groups when
                   ``expert_group_count`` > 1 (sigmoid: top2_sum, softmax: max), correction bias when the block
                   has ``exp_probs_b``; shared: ``expert_shared_count`` × I
        gpt-oss    top-k then softmax; swigluoai with llama.cpp's constants (alpha 1.702, limit 7); biases

    ``expert_weights_scale`` (0 or absent: 1) scales the routing weights of all but gpt-oss.
    """
    ckpt = checkpoint if isinstance(checkpoint, GGUFCheckpoint) else GGUFCheckpoint(checkpoint)
    arch = ckpt.arch
    if arch not in ARCHS:
        raise ValueError(f"general.architecture: {arch!r} has no MoE config reader in moekit; expected one of "
                         f"{list(ARCHS)}")
    layers = ckpt.moe_layers()
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
    if not layers:
        raise ValueError(f"{ckpt.path}: no MoE blocks (no blk.L.ffn_gate_inp.weight tensor); {arch!r} is dense here")
    if layer is not None and layer not in layers:
        raise ValueError(f"layer: decoder layer {layer} of {ckpt.path} has no MoE block; MoE layers: "
                         f"{layers[:16]}{' ...' if len(layers) > 16 else ''}")
    block = f"blk.{layers[0] if layer is None else layer}."
    meta = _Meta(ckpt, arch)
    experts = meta.int("expert_count")
    top_k = meta.int("expert_used_count")
    hidden = meta.int("embedding_length")
    if arch == "llama":
        if experts == 0:
            raise ValueError(f"{arch}.expert_count: 0, a dense llama model")
        inter = meta.int("expert_feed_forward_length", default=None) or meta.int("feed_forward_length")
    else:
        inter = meta.int("expert_feed_forward_length")
    common = {"num_experts": experts, "top_k": top_k, "hidden_size": hidden, "intermediate_size": inter}
    if arch == "gpt-oss":
        # llama.cpp's build_moe_ffn for gpt-oss: swiglu_oai(alpha 1.702, limit 7.0), constants not in the metadata.
        return MoEConfig(**common, activation=Activation(name="swigluoai", alpha=1.702, limit=7.0),
                         routing=RoutingConfig(scoring_func="softmax", topk_before_score=True), bias=True,
                         router_bias=True)
    if arch == "deepseek2":
        return MoEConfig(**common, **_deepseek2(ckpt, meta, block, inter))
    # llama.cpp's build_moe_ffn for these: renormalized top-k for qwen3moe and Mixtral, never for Qwen2-MoE (a
    # constant of the graph, whatever expert_weights_norm says), times expert_weights_scale when set.
    routing = RoutingConfig(scoring_func="softmax", renormalize=arch != "qwen2moe",
                            routed_scaling_factor=_weights_scale(meta))
    shared = {}
    if arch == "qwen2moe" and block + "ffn_down_shexp.weight" in ckpt:
        shared = {"shared_intermediate_size": meta.int("expert_shared_feed_forward_length"),
                  "shared_expert_gate": block + "ffn_gate_inp_shexp.weight" in ckpt}
    return MoEConfig(**common, routing=routing, **shared)


def _deepseek2(ckpt: GGUFCheckpoint, meta: _Meta, block: str, inter: int) -> dict:
    gating = meta.int("expert_gating_func", default=1)
    if gating not in (1, 2):
        raise ValueError(f"deepseek2.expert_gating_func: expected 1 (softmax) or 2 (sigmoid), got {gating}")
    sigmoid = gating == 2
    groups = meta.int("expert_group_count", default=1)
    grouped = {}
    if groups > 1:
        grouped = {"num_expert_group": groups, "topk_group": meta.int("expert_group_used_count"),
                   "group_score": "top2_sum" if sigmoid else "max"}
    routing = RoutingConfig(
        scoring_func="sigmoid" if sigmoid else "softmax",
        renormalize=meta.bool("expert_weights_norm", default=False),
        correction_bias=block + "exp_probs_b.bias" in ckpt,
        routed_scaling_factor=_weights_scale(meta),
        **grouped,
    )
    shared = meta.int("expert_shared_count", default=0) * inter
    return {"routing": routing, "shared_intermediate_size": shared, "router_fp32": sigmoid}


def _weights_scale(meta: _Meta) -> float:
    """``expert_weights_scale``, the factor on the routing weights; llama.cpp reads 0 (or absent) as unset: 1."""
    scale = meta.float("expert_weights_scale", default=0.0)
    if scale < 0:
        raise ValueError(f"GGUF metadata {meta.arch}.expert_weights_scale: expected >= 0, got {scale}")
    return scale or 1.0


class _Meta:
    """Typed reads of ``<arch>.<name>`` metadata; errors name the key."""

    def __init__(self, ckpt: GGUFCheckpoint, arch: str) -> None:
        self.ckpt, self.arch = ckpt, arch

    def _get(self, name: str, default: object) -> object:
        value = self.ckpt.metadata(f"{self.arch}.{name}", default)
        return value.item() if hasattr(value, "item") else value  # a numpy scalar -> its Python value

    def int(self, name: str, default: object = ...) -> int:
        value = self._get(name, default)
        if value is default and default is not ...:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"GGUF metadata {self.arch}.{name}: expected an integer, got {value!r}")
        return int(value)

    def float(self, name: str, default: float) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"GGUF metadata {self.arch}.{name}: expected a number, got {value!r}")
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise ValueError(f"GGUF metadata {self.arch}.{name}: expected true or false, got {value!r}")
        return bool(value)


# ------------------------------------------------------------------------------------------ packed conversions


def q8_0_to_wna16(raw: torch.Tensor) -> WNA16Weight:
    """Q8_0 blocks uint8 [..., N, K/32 · 34] -> 8-bit WNA16, group 32, symmetric, exactly.

    Each block is fp16 d then 32 int8 q, W = q · d. The WNA16 8-bit code is unsigned with zero 128, so the code is
    q + 128 (q's byte with its top bit flipped) and the scale is d: (code − 128) · d = q · d.
    """
    blocks, d = _blocks(raw, 34, "Q8_0")
    codes = blocks[..., 2:].reshape(*blocks.shape[:-2], -1) ^ 0x80
    return WNA16Weight(codes, d, None, 8, GGUF_BLOCK, codes.shape[-1])


def q4_0_to_wna16(raw: torch.Tensor, bits: int = 4) -> WNA16Weight:
    """Q4_0 blocks uint8 [..., N, K/32 · 18] -> 4-bit (or, widened, 8-bit) WNA16, group 32, symmetric, exactly.

    Each block is fp16 d then 16 bytes: element j (< 16) in the low nibble of byte j, element j + 16 in its high
    nibble; W = (q − 8) · d. The 4-bit WNA16 zero is 8 too, so the codes are q, repacked two per byte in k order
    (k = 2j low nibble, 2j + 1 high); ``bits=8`` stores q + 120 (zero 128), for a layer whose other projections
    are Q8_0.
    """
    check_choice("bits", bits, (4, 8))  # type-strict: 8.0 or True is refused
    blocks, d = _blocks(raw, 18, "Q4_0")
    qs = blocks[..., 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(*blocks.shape[:-2], -1)  # [..., N, K], k in order
    codes = q[..., 0::2] | (q[..., 1::2] << 4) if bits == 4 else q + 120
    return WNA16Weight(codes, d, None, bits, GGUF_BLOCK, q.shape[-1])


def _blocks(raw: torch.Tensor, size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``raw`` [..., N, G·size] -> (blocks uint8 [..., N, G, size], d fp16 [..., N, G]), checked."""
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() < 2:
        got = f"{raw.dtype} {tuple(raw.shape)}" if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise ValueError(f"raw: expected {name} blocks uint8 [..., N, K/32 · {size}], got {got}")
    if raw.shape[-1] % size:
        raise ValueError(f"raw: expected a last dim that is a multiple of {size} ({name} block bytes), got "
                         f"{tuple(raw.shape)}")
    blocks = raw.reshape(*raw.shape[:-1], raw.shape[-1] // size, size)
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)
    return blocks, d
