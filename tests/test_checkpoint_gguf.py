"""moekit.checkpoint_gguf: the Q8_0 / Q4_0 block converters bit-exact against gguf.quants.dequantize, the MoEConfig
read from each architecture's metadata, and what is refused."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from moekit.checkpoint_gguf import GGUFCheckpoint, gguf_config, q4_0_to_wna16, q8_0_to_wna16  # noqa: E402
from moekit.ops.quantize_wna16 import dequantize_wna16  # noqa: E402
from tests.gguf_files import E, H, I, K, T, write_gguf  # noqa: E402


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q4_0])
def test_block_converters_bit_exact_against_gguf(kind):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((3, 40, 96)) * rng.uniform(0.01, 10, (3, 40, 1))).astype(np.float32)
    w[0, 0, :32] = 0  # an all-zero block: d = 0
    raw = gguf.quants.quantize(w, kind)
    if kind == T.Q8_0:
        raw[1, 2, 2] = 0x80  # int8 -128 (llama.cpp writes [-127, 127], a file may hold -128)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, kind).copy())
    raw_t = torch.from_numpy(raw.copy())
    variants = [q8_0_to_wna16(raw_t)] if kind == T.Q8_0 else [q4_0_to_wna16(raw_t), q4_0_to_wna16(raw_t, bits=8)]
    for q in variants:
        assert q.group_size == 32 and q.zeros is None and q.scales.dtype == torch.float16
        assert torch.equal(dequantize_wna16(q), expected)
    # The quantization error of each type on N(0,1) data within 20 % of QUANT_FORMATS.md's figures: a wrong nibble
    # order or scale axis reads ~1.4 and would pass a self-consistency check.
    x = np.random.default_rng(2).standard_normal((512, 1024)).astype(np.float32)
    conv = q8_0_to_wna16 if kind == T.Q8_0 else q4_0_to_wna16
    w_hat = dequantize_wna16(conv(torch.from_numpy(gguf.quants.quantize(x, kind))))
    err = float((w_hat - torch.from_numpy(x)).norm() / torch.from_numpy(x).norm())
    assert abs(err - (0.005 if kind == T.Q8_0 else 0.086)) <= 0.2 * (0.005 if kind == T.Q8_0 else 0.086), err


def test_block_converters_refuse_bad_raw():
    with pytest.raises(ValueError, match="raw: expected Q8_0 blocks uint8"):
        q8_0_to_wna16(torch.zeros(4, 34, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 18"):
        q4_0_to_wna16(torch.zeros(4, 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"bits: expected one of \[4, 8\], got 2"):
        q4_0_to_wna16(torch.zeros(4, 18, dtype=torch.uint8), bits=2)
    for bits in (8.0, True, "8"):  # 8.0 == 8 passed a plain membership test
        with pytest.raises(TypeError, match="bits: expected an int"):
            q4_0_to_wna16(torch.zeros(4, 18, dtype=torch.uint8), bits=bits)


def test_config_per_arch(tmp_path):
    write_gguf(tmp_path / "q3.gguf")
    cfg = gguf_config(tmp_path / "q3.gguf")
    assert (cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size) == (E, K, H, I)
    assert cfg.routing.scoring_func == "softmax" and cfg.routing.renormalize and cfg.activation.name == "silu"

    write_gguf(tmp_path / "mixtral.gguf", arch="llama")
    assert gguf_config(tmp_path / "mixtral.gguf").routing.renormalize

    write_gguf(tmp_path / "ds3.gguf", arch="deepseek2", extra=[("exp_probs_b.bias", ((E,), T.F32))],
               meta={"expert_gating_func": 2, "expert_weights_norm": True, "expert_weights_scale": 2.5,
                     "expert_shared_count": 1, "expert_group_count": 3, "expert_group_used_count": 2})
    cfg = gguf_config(tmp_path / "ds3.gguf", 1)
    r = cfg.routing
    assert (r.scoring_func, r.renormalize, r.routed_scaling_factor, r.correction_bias) == ("sigmoid", True, 2.5, True)
    assert (r.num_expert_group, r.topk_group, r.group_score) == (3, 2, "top2_sum")
    assert cfg.shared_intermediate_size == I and cfg.router_fp32

    write_gguf(tmp_path / "oss.gguf", arch="gpt-oss")
    cfg = gguf_config(tmp_path / "oss.gguf")
    assert cfg.activation.name == "swigluoai" and cfg.bias and cfg.router_bias and cfg.routing.topk_before_score



def test_routing_constants_follow_llama_cpp(tmp_path):
    # qwen3moe renormalizes whatever expert_weights_norm says (llama.cpp's graph passes true), and a weights
    # scale of 0 means unset; Qwen2-MoE never renormalizes and takes a set scale.
    write_gguf(tmp_path / "q3.gguf", meta={"expert_weights_norm": False, "expert_weights_scale": 0.0})
    r = gguf_config(tmp_path / "q3.gguf").routing
    assert r.renormalize and r.routed_scaling_factor == 1.0
    write_gguf(tmp_path / "q2.gguf", arch="qwen2moe", meta={"expert_weights_scale": 2.0})
    r = gguf_config(tmp_path / "q2.gguf").routing
    assert not r.renormalize and r.routed_scaling_factor == 2.0
    write_gguf(tmp_path / "neg.gguf", meta={"expert_weights_scale": -1.0})
    with pytest.raises(ValueError, match="qwen3moe.expert_weights_scale: expected >= 0"):
        gguf_config(tmp_path / "neg.gguf")


def test_config_refusals(tmp_path):
    write_gguf(tmp_path / "phi.gguf", arch="phimoe")
    with pytest.raises(ValueError, match="general.architecture: 'phimoe'"):
        gguf_config(tmp_path / "phi.gguf")
    write_gguf(tmp_path / "m.gguf", layers=(1, 3))
    with pytest.raises(ValueError, match=r"layer: decoder layer 2 .* MoE layers: \[1, 3\]"):
        gguf_config(tmp_path / "m.gguf", 2)
    with pytest.raises(FileNotFoundError, match="exactly one .gguf file"):
        GGUFCheckpoint(tmp_path)  # two files


def test_gguf_missing_names_the_extra(monkeypatch, tmp_path):
    import sys

    path = tmp_path / "model.gguf"
    write_gguf(path)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"pip install 'moekit\[gguf\]'"):
        GGUFCheckpoint(path)

