"""Tiny GGUF files for the GGUF tests, written with gguf.GGUFWriter (import only after importorskip("gguf")), and
gguf's own dequantization of a stored tensor: the independent reference every loaded weight is compared with."""

import gguf
import numpy as np
import torch

T = gguf.GGMLQuantizationType
E, K, H, I = 6, 2, 256, 256  # H, I multiples of 256: K-quant blocks fit; E = 6: not a power of two
# write_gguf(hidden=, inter=) gives other sizes: a test with H != I catches a swapped [N, K] (H == I cannot).


def _q4_k_raw(shape, rng):
    """Random Q4_K blocks [E, N, K/256 · 144] with finite fp16 d / dmin (any other bytes are valid codes)."""
    e, n, k = shape
    raw = rng.integers(0, 256, size=(e, n, k // 256, 144), dtype=np.uint8)
    raw[..., 0:2] = np.full((e, n, k // 256, 1), 0.002, np.float16).view(np.uint8)
    raw[..., 2:4] = np.full((e, n, k // 256, 1), 0.001, np.float16).view(np.uint8)
    return raw.reshape(e, n, -1)


def _tensor(writer, name, values, kind, rng):
    if kind == T.F32:
        writer.add_tensor(name, values.astype(np.float32))
    elif kind == T.F16:
        writer.add_tensor(name, values.astype(np.float16))
    elif kind == T.Q4_K:
        writer.add_tensor(name, _q4_k_raw(values.shape, rng), raw_dtype=kind)
    elif kind == T.Q8_1:  # a type gguf-py cannot dequantize: random raw blocks
        e, n, k = values.shape
        block, size = gguf.GGML_QUANT_SIZES[kind]
        writer.add_tensor(name, rng.integers(0, 256, size=(e, n, k // block * size), dtype=np.uint8), raw_dtype=kind)
    else:
        writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)


def write_gguf(path, *, arch="qwen3moe", types=(T.Q4_0, T.Q4_0, T.Q4_0), layers=(1,), shared=0, meta=None,
               skip=(), extra=(), seed=0, hidden=H, inter=I):
    """A tiny GGUF file: MoE blocks at ``layers`` (gate, up, down of ``types``; ``hidden`` H, ``inter`` I),
    F32 router; returns the float source weights by tensor name (what was quantized)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(max(layers) + 1)
    w.add_embedding_length(hidden)
    w.add_expert_count(E)
    w.add_expert_used_count(K)
    w.add_expert_feed_forward_length(inter)
    for key, value in (meta or {}).items():
        add = w.add_bool if isinstance(value, bool) else w.add_float32 if isinstance(value, float) else w.add_uint32
        add(f"{arch}.{key}", value)
    src = {}
    for layer in layers:
        b = f"blk.{layer}."
        tensors = {b + "ffn_gate_inp.weight": (rng.standard_normal((E, hidden)), T.F32)}
        for proj, kind in zip(("gate", "up", "down"), types):
            shape = (E, hidden, inter) if proj == "down" else (E, inter, hidden)
            tensors[f"{b}ffn_{proj}_exps.weight"] = (rng.standard_normal(shape) / 16, kind)
        if shared:
            tensors[b + "ffn_gate_shexp.weight"] = (rng.standard_normal((shared, hidden)) / 16, T.Q8_0)
            tensors[b + "ffn_up_shexp.weight"] = (rng.standard_normal((shared, hidden)) / 16, T.Q8_0)
            tensors[b + "ffn_down_shexp.weight"] = (rng.standard_normal((hidden, shared)) / 16, T.Q8_0)
            tensors[b + "ffn_gate_inp_shexp.weight"] = (rng.standard_normal(hidden), T.F32)
        tensors[b + "ffn_norm.weight"] = (np.ones(hidden), T.F32)  # the decoder layer's norm: not the MoE block's
        for name, (shape_or_values, kind) in extra:  # a shape (random values) or the values themselves
            values = shape_or_values if isinstance(shape_or_values, np.ndarray) else rng.standard_normal(shape_or_values)
            tensors[b + name] = (values, kind)
        for name, (values, kind) in tensors.items():
            if name.removeprefix(b) not in skip:
                src[name] = values.astype(np.float32)
                _tensor(w, name, src[name], kind, rng)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return src


def gguf_dequantize(path, key):
    """gguf's own dequantization of the stored tensor ``key``: the oracle."""
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == key)
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
