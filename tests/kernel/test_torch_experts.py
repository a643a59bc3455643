"""The torch backend's two forward paths on CPU: the serial per-expert loop and the worker pool
(``torch_experts._ExpertPool``), which the backend picks by the thread count and the number of experts hit.
Both must compute the reference's function; the pool must leave every other thread's torch thread count alone."""

import threading

import pytest
import torch

import moekit.kernel.torch_experts as te
from moekit.kernel import cpu_packed
from moekit.functional import fused_experts
from moekit.ops.activation import Activation
from moekit.testing import assert_close, make_moe_inputs, reference_experts


@pytest.fixture(params=["packed", "grouped_mm", "loop", "pool"])
def path(request, monkeypatch):
    """Force one path whatever the dtype and this machine's thread count (a 1-core runner never picks the pool
    itself): the GEMMs on oneDNN-packed weights (``cpu_packed``; where this CPU's oneDNN lacks the dtype, e.g.
    fp16 without AVX512-FP16, the backend falls back and the case checks that), the serial path on
    torch._grouped_mm, on its Python loop (torch without _grouped_mm for the dtype or strides), or the worker
    pool."""
    if request.param == "packed":  # bare tensors run plain: mark them, as a RoutedExperts layer does its own
        usable = cpu_packed.usable
        monkeypatch.setattr(cpu_packed, "usable", lambda x, *w: (cpu_packed.track(*w), usable(x, *w))[1])
        return request.param
    monkeypatch.setattr(cpu_packed, "usable", lambda *args: False)
    if request.param == "pool":
        monkeypatch.setattr(te, "_pool_for", lambda *args: te._ExpertPool.get(2))
    else:
        monkeypatch.setattr(te, "_pool_for", lambda *args: None)
    if request.param == "loop":
        monkeypatch.setattr(te, "_grouped_mm_runs", lambda *args: False)
    return request.param


def _args(d):
    return d["hidden_states"], d["w13"], d["w2"], d["topk_weights"], d["topk_ids"]


@pytest.mark.parametrize(
    "num_tokens, activation, bias, dtype",
    [
        (1, "silu", False, torch.float32),  # decode: K experts of one row each
        (1, "silu", True, torch.bfloat16),  # bf16 decode: single rows computed twice (src_P / keep_M)
        (3, "gelu", False, torch.float16),  # fp16: one- and two-row experts side by side
        (37, "silu", False, torch.bfloat16),  # several rows per expert, odd T, bf16 GEMMs with fp32 sums
        (19, "swigluoai", True, torch.float32),  # both biases, clamped activation
        (11, "relu2", False, torch.float32),  # non-gated: w13 has I rows
    ],
)
def test_paths_match_reference(path, num_tokens, activation, bias, dtype):
    d = make_moe_inputs(num_tokens, 8, 48, 40, 3, dtype=dtype, activation=activation, bias=bias, empty_experts=(5,))
    kw = {"w13_bias": d.get("w13_bias"), "w2_bias": d.get("w2_bias")}
    out = fused_experts(*_args(d), activation=activation, backend="torch", **kw)
    ref = reference_experts(*_args(d), activation=activation, w13_bias_E2I=kw["w13_bias"], w2_bias_EH=kw["w2_bias"])
    assert out.dtype == dtype
    assert_close(out, ref, dtype)


def test_paths_skip_remote_experts(path):
    # Expert parallelism: rows of experts another rank holds (-1) contribute nothing and are never computed.
    d = make_moe_inputs(23, 8, 32, 24, 2)
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1], dtype=torch.int32)
    local = {**d, "w13": d["w13"][[1, 3, 4, 6]], "w2": d["w2"][[1, 3, 4, 6]]}
    out = fused_experts(*_args(local), expert_map=expert_map, backend="torch")
    assert_close(out, reference_experts(*_args(local), expert_map=expert_map), torch.float32)


def test_pool_keeps_grad_and_inference_modes(path):
    # Workers run in the caller's modes: under inference_mode on parameters (requires_grad) nothing is recorded,
    # and an inference-mode result equals a no_grad one.
    d = make_moe_inputs(9, 8, 32, 24, 2)
    w13, w2 = torch.nn.Parameter(d["w13"]), torch.nn.Parameter(d["w2"])
    args = (d["hidden_states"], w13, w2, d["topk_weights"], d["topk_ids"])
    with torch.inference_mode():
        inf = fused_experts(*args, backend="torch")
    with torch.no_grad():
        plain = fused_experts(*args, backend="torch")
    assert not plain.requires_grad
    torch.testing.assert_close(inf, plain, rtol=0, atol=0)


def test_run_under_autograd_recording_stays_serial(monkeypatch):
    # Experts.apply runs `run` without recording (autograd.Function), so the pool serves training too; a direct
    # `run` call whose inputs require grad records a graph, which is not built across threads: the serial loop.
    picked = []
    real = te._pool_for
    monkeypatch.setattr(te, "_pool_for", lambda *args: picked.append(real(*args)) or picked[-1])
    d = make_moe_inputs(9, 8, 32, 24, 2)
    x = d["hidden_states"].requires_grad_()
    out = te.TorchExperts().run(x, d["w13"], d["w2"], d["topk_weights"], d["topk_ids"], activation=Activation(),
                                w13_bias_E2I=None, w2_bias_EH=None, expert_map_E=None, out_dtype=torch.float32)
    assert picked == [None] and out.grad_fn is not None
    (grad,) = torch.autograd.grad(out.sum(), x)
    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(reference_experts(x64, *_args(d)[1:]).sum(), x64)
    assert_close(grad, ref, torch.float32)


def test_pool_is_picked_by_threads_experts_and_dtype(monkeypatch):
    monkeypatch.setattr(te._ExpertPool, "get", lambda workers: f"pool of {workers}")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = torch.randn(4, 8)
    w13, w2 = torch.randn(4, 16, 8), torch.randn(4, 8, 8)  # 768 bytes an expert in fp32
    two, one = [(0, 0, 2), (3, 2, 4)], [(1, 0, 4)]
    assert te._pool_for(x, two, w13, w2) == "pool of 2"
    assert te._pool_for(x, one, w13, w2) is None  # one expert: its GEMMs use both threads in the serial loop
    assert te._pool_for(x.to("meta"), two, w13.to("meta"), w2.to("meta")) is None  # not a CPU tensor
    # bf16/fp16: oneDNN's GEMMs use every thread already (module docstring)
    for half in (torch.bfloat16, torch.float16):
        assert te._pool_for(x.to(half), two, w13.to(half), w2.to(half)) is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert te._pool_for(x, two, w13, w2) is None


def test_pool_workers_are_single_threaded_and_others_unchanged():
    before = torch.get_num_threads()
    pool = te._ExpertPool(2)
    try:
        assert pool.worker_threads == [1, 1]
        assert torch.get_num_threads() == before
        # A thread started afterwards begins with the process-wide count, which the pool put back.
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [before]
        assert pool.map(lambda a, b: a + b, [(1, 2), (3, 4)]) == [3, 7]
    finally:
        pool._executor.shutdown()


def test_pool_raises_a_workers_error():
    pool = te._ExpertPool.get(2)

    def boom():
        raise ValueError("from a worker")

    with pytest.raises(ValueError, match="from a worker"):
        pool.map(boom, [()])


def test_8bit_activations_must_be_codes():
    # With an activation dtype, prepare hands over codes; float activations given directly were read as codes.
    from moekit.ops.quantize import quantize_weight
    from moekit.quant.params import QuantParams

    d = make_moe_inputs(3, 4, 64, 32, 2)
    (q13, s13), (q2, s2) = (quantize_weight(w, "fp8_e4m3", "channel") for w in (d["w13"], d["w2"]))
    quant = QuantParams(weight_dtype="fp8_e4m3", act_dtype="fp8_e4m3", granularity="channel", w13_scale=s13,
                        w2_scale=s2)
    with pytest.raises(ValueError, match=r"expected hidden_states as torch.float8_e4m3fn codes"):
        te.TorchExperts().apply(d["hidden_states"], q13, q2, d["topk_weights"], d["topk_ids"],
                                activation=Activation(name="silu"), w13_bias_E2I=None, w2_bias_EH=None,
                                expert_map_E=None, quant=quant, hidden_scale=torch.ones(3, 1),
                                out_dtype=torch.float32)


def test_unchecked_ids_outside_the_map_are_dropped():
    # With an expert_map, an unchecked id of -1 indexed the map from its end and ran global expert E - 1 when that
    # one was local; ids outside [0, E_global) are dropped, as they are without a map.
    torch.manual_seed(0)
    x, w13, w2 = torch.randn(3, 32), torch.randn(2, 32, 32), torch.randn(2, 32, 16)
    expert_map = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)  # global experts 2 and 3 are local
    ids = torch.tensor([[-1], [4], [2]], dtype=torch.int32)
    out = fused_experts(x, w13, w2, torch.ones(3, 1), ids, expert_map=expert_map, check_ids=False, backend="torch")
    assert torch.equal(out[:2], torch.zeros(2, 32))
    want = fused_experts(x[2:], w13, w2, torch.ones(1, 1), torch.tensor([[2]], dtype=torch.int32),
                         expert_map=expert_map, backend="torch")
    assert torch.equal(out[2:], want)
