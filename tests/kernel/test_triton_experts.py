"""TritonExperts against the fp64 reference MoE (CPU: interpreter, fp16/fp32) and the torch backend (GPU: bf16)."""

import pytest
import torch

from moekit.kernel.torch_experts import TorchExperts
from moekit.kernel.triton_experts import TritonExperts
from moekit.ops.activation import ACTIVATIONS, Activation
from moekit.ops.heuristics import FusedDecodeConfig, GemmConfig, MoEKernelConfig
from moekit.quant.params import UNQUANTIZED
from moekit.testing import assert_close, make_moe_inputs, reference_experts

# Pinned configs so the CPU tests cover both regimes at tiny sizes: decode (fp32 y, split-K GEMM2) and prefill
# (activation-dtype y).
DECODE = MoEKernelConfig(
    block_m=16,
    gemm1=GemmConfig(block_n=32, block_k=32, num_stages=2),
    gemm2=GemmConfig(block_n=32, block_k=16, split_k=2, num_stages=2),
    y_fp32=True,
)
PREFILL = MoEKernelConfig(
    block_m=32,
    gemm1=GemmConfig(block_n=64, block_k=32, group_m=4, num_stages=2),
    gemm2=GemmConfig(block_n=32, block_k=32, group_m=4, num_stages=2),
    y_fp32=False,
)

# Prefill tiles with half-height tail blocks (block 32 → 16-row tiles where a block's second half is padding).
PREFILL_HALF = MoEKernelConfig(
    block_m=32,
    gemm1=GemmConfig(block_n=64, block_k=32, group_m=4, num_stages=2, half_tail=True),
    gemm2=GemmConfig(block_n=32, block_k=32, group_m=4, num_stages=2, half_tail=True),
)

# Both GEMMs in one launch per (routed row, slice of I) (moekit.ops.fused_decode), ragged slices at odd I.
FUSED = MoEKernelConfig(
    block_m=16, gemm1=DECODE.gemm1, gemm2=DECODE.gemm2,
    fused=FusedDecodeConfig(block_i=16, block_k=32, block_h=16, num_stages=2),
)


def _apply(experts, inp, *, activation="silu", expert_map=None, out_dtype=None):
    x = inp["hidden_states"]
    return experts.apply(
        x, inp["w13"], inp["w2"], inp["topk_weights"], inp["topk_ids"],
        activation=Activation(name=activation), w13_bias_E2I=inp.get("w13_bias"), w2_bias_EH=inp.get("w2_bias"),
        expert_map_E=expert_map, quant=UNQUANTIZED, hidden_scale=None, out_dtype=out_dtype or x.dtype,
    )


def _ref(inp, *, activation="silu", expert_map=None):
    return reference_experts(
        inp["hidden_states"], inp["w13"], inp["w2"], inp["topk_weights"], inp["topk_ids"],
        activation=activation, w13_bias_E2I=inp.get("w13_bias"), w2_bias_EH=inp.get("w2_bias"),
        expert_map=expert_map,
    )


@pytest.mark.parametrize(
    "num_tokens, num_experts, hidden, inter, top_k, config",
    [
        (1, 8, 64, 32, 2, None),        # T = 1, heuristic config
        (1, 8, 64, 32, 2, DECODE),      # T = 1 with split-K GEMM2
        (13, 6, 40, 24, 6, DECODE),     # top_k = E, odd T
        (21, 5, 33, 19, 2, PREFILL),    # odd H and I: ragged K and N tiles in both GEMMs
        (29, 5, 33, 19, 2, PREFILL_HALF),  # half-height tiles for tail blocks, ragged K and N
        (3, 256, 32, 16, 8, None),      # E >= 256, most experts empty
        (1, 8, 64, 32, 2, FUSED),       # the fused decode
        (13, 6, 40, 24, 6, FUSED),      # top_k = E, odd T: rows share experts
        (21, 5, 33, 19, 2, FUSED),      # odd H and I: ragged K tiles, output chunks and the last slice
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matches_reference(num_tokens, num_experts, hidden, inter, top_k, config, dtype):
    inp = make_moe_inputs(num_tokens, num_experts, hidden, inter, top_k, dtype=dtype, seed=num_tokens)
    assert_close(_apply(TritonExperts(config), inp), _ref(inp), dtype)


@pytest.mark.parametrize("config", [DECODE, FUSED], ids=["decode", "fused"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_with_biases(activation, config):
    inp = make_moe_inputs(9, 4, 32, 24, 2, dtype=torch.float16, activation=activation, bias=True, seed=3)
    assert_close(_apply(TritonExperts(config), inp, activation=activation), _ref(inp, activation=activation),
                 torch.float16)


def test_empty_expert_and_one_hot_expert():
    # Experts 0 and 2 get no token (-inf logits); with top_k = 1 and E = 3, expert 1 then gets every token.
    inp = make_moe_inputs(17, 3, 32, 16, 1, dtype=torch.float16, empty_experts=(0, 2), seed=1)
    assert bool((inp["topk_ids"] == 1).all())
    assert_close(_apply(TritonExperts(PREFILL), inp), _ref(inp), torch.float16)


@pytest.mark.parametrize("config", [DECODE, FUSED], ids=["decode", "fused"])
def test_expert_map_with_remote_experts(config):
    # 8 global experts, 3 local; tokens whose experts are all remote come back as zeros.
    inp = make_moe_inputs(11, 8, 32, 16, 2, dtype=torch.float16, seed=2)
    emap = torch.tensor([-1, 0, -1, -1, 1, -1, 2, -1], dtype=torch.int32)
    local = {k: v[:3] if k in ("w13", "w2") else v for k, v in inp.items()}
    out = _apply(TritonExperts(config), local, expert_map=emap)
    assert_close(out, _ref(local, expert_map=emap), torch.float16)
    remote_only = (emap[inp["topk_ids"].long()] < 0).all(dim=1)
    assert bool((out[remote_only] == 0).all())


def test_workspace_cache_is_bounded(monkeypatch):
    import moekit.kernel.triton_experts as te

    experts = TritonExperts(DECODE)
    inp = make_moe_inputs(3, 4, 32, 16, 2, dtype=torch.float16, seed=6)
    first = experts._buffer(torch.device("cpu"), 64)
    monkeypatch.setattr(te, "_MAX_WORKSPACES", 1)
    experts._workspace[("other", 1)] = torch.empty(8, dtype=torch.uint8)  # a second stream's buffer
    assert experts._buffer(torch.device("cpu"), 32) is first  # reused, and the other (older) one dropped
    assert list(experts._workspace) == [(torch.device("cpu"), 0)]
    assert_close(_apply(experts, inp), _ref(inp), torch.float16)


def test_out_dtype_and_workspace_reuse():
    # A second, smaller call reuses the cached workspace; out_dtype differs from x.
    experts = TritonExperts(DECODE)
    big = make_moe_inputs(12, 4, 32, 16, 2, dtype=torch.float16, seed=4)
    small = make_moe_inputs(2, 4, 32, 16, 2, dtype=torch.float16, seed=5)
    _apply(experts, big)
    out = _apply(experts, small, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close(out, _ref(small), torch.float16)


# --------------------------------------------------------------------------------------------------- GPU
PRESETS = {  # name: (E, H, I, K, activation, biases) — MEASURING.md
    "mixtral-8x7b": (8, 4096, 14336, 2, "silu", False),
    "qwen3-30b-a3b": (128, 2048, 768, 8, "silu", False),
    "deepseek-v3": (256, 7168, 2048, 8, "silu", False),
    "gpt-oss-120b": (128, 2880, 2880, 4, "swigluoai", True),
    "olmoe-1b-7b": (64, 2048, 1024, 8, "silu", False),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", list(PRESETS))
def test_gpu_presets_match_torch_backend(preset):
    E, H, I, K, act, bias = PRESETS[preset]
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):  # on the GPU: deepseek-v3's weights are 22 GB
        return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()

    weights = {"w13": rand(E, 2 * I, H, scale=H**-0.5), "w2": rand(E, H, I, scale=I**-0.5)}
    if bias:
        weights.update(w13_bias=rand(E, 2 * I, scale=0.1), w2_bias=rand(E, H, scale=0.1))
    for num_tokens in (1, 7, 64, 1024):  # decode configs, odd T, the prefill configs
        routing = make_moe_inputs(num_tokens, E, 16, 16, K, dtype=torch.bfloat16, device="cuda", seed=num_tokens)
        inp = {**weights, "hidden_states": rand(num_tokens, H), "topk_weights": routing["topk_weights"],
               "topk_ids": routing["topk_ids"]}
        out = _apply(TritonExperts(), inp, activation=act)
        want = _apply(TorchExperts(), inp, activation=act)
        assert_close(out, want.double(), torch.bfloat16, name=f"{preset} T={num_tokens}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_capture_and_replay():
    inp = make_moe_inputs(16, 32, 256, 128, 4, dtype=torch.bfloat16, device="cuda", seed=7)
    experts = TritonExperts()
    static = {k: v.clone() for k, v in inp.items()}
    _apply(experts, static)  # compile + warm the workspace outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _apply(experts, static)
    for seed in (8, 9):  # new tokens and routing copied into the captured inputs, then replay
        new = make_moe_inputs(16, 32, 256, 128, 4, dtype=torch.bfloat16, device="cuda", seed=seed)
        for k in ("hidden_states", "topk_weights", "topk_ids"):
            static[k].copy_(new[k])
        graph.replay()
        assert_close(out, _apply(TorchExperts(), static).double(), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_fused_decode_graph_replay_and_expert_map(dtype):
    # The heuristic's fused decode (T = 2, K = 8, 64 experts, I = 256) in every float dtype: captured in a CUDA
    # graph and replayed on new routing, and with an expert map (32 of the 64 experts local), against the torch
    # backend.
    from moekit.ops.heuristics import MoEShape, choose_config

    shape = MoEShape(num_tokens=2, top_k=8, num_experts=64, hidden=512, inter=256, elem_bytes=dtype.itemsize,
                     weights=str(dtype).removeprefix("torch."))
    assert choose_config(shape).fused is not None
    inp = make_moe_inputs(2, 64, 512, 256, 8, dtype=dtype, device="cuda", bias=True, seed=11)
    experts = TritonExperts()
    static = {k: v.clone() for k, v in inp.items()}
    _apply(experts, static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _apply(experts, static)
    for seed in (12, 13):
        new = make_moe_inputs(2, 64, 512, 256, 8, dtype=dtype, device="cuda", seed=seed)
        for k in ("hidden_states", "topk_weights", "topk_ids"):
            static[k].copy_(new[k])
        graph.replay()
        assert_close(out, _apply(TorchExperts(), static).double(), dtype)
    emap = torch.full((64,), -1, dtype=torch.int32, device="cuda")
    emap[::2] = torch.arange(32, dtype=torch.int32, device="cuda")
    local = {k: v[::2].contiguous() if k in ("w13", "w2", "w13_bias", "w2_bias") else v for k, v in inp.items()}
    out = _apply(experts, local, expert_map=emap)
    assert_close(out, _apply(TorchExperts(), local, expert_map=emap).double(), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_torch_compile_no_graph_break():
    inp = make_moe_inputs(8, 16, 128, 64, 2, dtype=torch.bfloat16, device="cuda", seed=10)
    experts = TritonExperts()

    def layer(x, w13, w2, tw, ids):
        y = experts.apply(x * 2, w13, w2, tw, ids, activation=Activation(name="silu"), w13_bias_E2I=None,
                          w2_bias_EH=None, expert_map_E=None, quant=UNQUANTIZED, hidden_scale=None,
                          out_dtype=x.dtype)
        return y + 1

    args = (inp["hidden_states"], inp["w13"], inp["w2"], inp["topk_weights"], inp["topk_ids"])
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True)(*args)  # fullgraph: a graph break raises
    assert_close(out, layer(*args).double(), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_concurrent_streams_share_one_instance():
    # Two streams run the same instance at once (what a compiled model does through the custom op): each stream
    # must get its own workspace, or one call's intermediates overwrite the other's.
    experts = TritonExperts()
    inps = [make_moe_inputs(2048, 16, 1024, 512, 4, dtype=torch.bfloat16, device="cuda", seed=s) for s in (20, 21)]
    want = [_apply(TorchExperts(), inp) for inp in inps]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(3):
        outs = []
        for s, inp in zip(streams, inps, strict=True):
            with torch.cuda.stream(s):
                outs.append(_apply(experts, inp))
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
        for out, ref in zip(outs, want, strict=True):
            assert_close(out, ref.double(), torch.bfloat16)
    assert len(experts._workspace) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_deterministic():
    inp = make_moe_inputs(300, 64, 512, 256, 8, dtype=torch.bfloat16, device="cuda", seed=11)
    experts = TritonExperts()
    assert torch.equal(_apply(experts, inp), _apply(experts, inp))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_int64_indexing():
    # N·H = 2**31 + 2**24 elements: y's row offsets overflow int32 unless computed in int64.
    num_tokens, top_k, hidden = 34816, 8, 8192
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs ~40 GiB")
    inp = make_moe_inputs(num_tokens, 8, hidden, 32, top_k, dtype=torch.bfloat16, device="cuda", seed=12)
    out = _apply(TritonExperts(), inp)
    tail = slice(num_tokens - 64, num_tokens)  # the rows past 2**31 elements
    sub = {k: (v[tail] if k in ("hidden_states", "topk_weights", "topk_ids") else v) for k, v in inp.items()}
    assert_close(out[tail], _apply(TorchExperts(), sub).double(), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("block_m", [64, 128])
def test_gpu_half_tail_tiles(block_m):
    # bf16 half-height tail tiles on the tensor cores (wgmma M = 64 / 32): ~37 rows an expert, so tails of every
    # size; gated GEMM1 and weighted GEMM2 both pinned to half_tail.
    E, H, I, K, T = 8, 512, 1024, 2, 150
    g = torch.Generator(device="cuda").manual_seed(1)
    gemm = (GemmConfig(block_n=256, block_k=64, num_warps=8, num_stages=3, half_tail=True) if block_m == 128
            else GemmConfig(block_n=128, block_k=64, num_warps=4, num_stages=4, half_tail=True))
    cfg = MoEKernelConfig(block_m=block_m, gemm1=gemm, gemm2=gemm, y_fp32=False)
    routing = make_moe_inputs(T, E, 16, 16, K, dtype=torch.bfloat16, device="cuda", seed=3)
    inp = {"w13": (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H**-0.5).bfloat16(),
           "w2": (torch.randn(E, H, I, device="cuda", generator=g) * I**-0.5).bfloat16(),
           "hidden_states": torch.randn(T, H, device="cuda", generator=g).bfloat16(),
           "topk_weights": routing["topk_weights"], "topk_ids": routing["topk_ids"]}
    out = _apply(TritonExperts(cfg), inp, activation="silu")
    want = _apply(TorchExperts(), inp, activation="silu")
    assert_close(out, want.double(), torch.bfloat16, name=f"half_tail block_m={block_m}")



@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter on CPU tensors")
@pytest.mark.parametrize("scheme", [None, "w4a16_g128"])
def test_interpreter_refuses_bf16_activations(scheme):
    # Triton's interpreter computes bf16 tl.dot wrongly: the layer returned ~1e10 where the reference is ~1.
    from moekit import RoutedExperts, quantize

    layer = RoutedExperts(4, 64, 32, backend="triton", dtype=torch.bfloat16)
    if scheme is not None:
        quantize(layer, scheme)
    inp = make_moe_inputs(2, 4, 64, 32, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="hidden_states in bfloat16 on cpu .*float16/float32 .*backend 'torch'"):
        layer(inp["hidden_states"], inp["topk_weights"], inp["topk_ids"])
