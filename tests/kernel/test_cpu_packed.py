"""The torch backend's GEMMs on oneDNN-packed expert weights (``moekit.kernel.cpu_packed``): taken for a layer's
weights where the CPU supports the dtype, equal to the plain GEMMs within the dtype's rounding, never stale (every
way moekit changes the weights after a forward is seen by the next one), and never for bare tensors."""

import copy
import gc
import io
import weakref

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.functional import fused_experts
from moekit.kernel import cpu_packed
from moekit.router import select_experts
from moekit.testing import assert_close, make_moe_inputs, reference_experts

PACKED_DTYPES = [d for d in (torch.float32, torch.bfloat16, torch.float16) if cpu_packed._dtype_supported(d)]
needs_packing = pytest.mark.skipif(not PACKED_DTYPES, reason="this torch/CPU packs no dtype for oneDNN")


def _args(d):
    return d["hidden_states"], d["w13"], d["w2"], d["topk_weights"], d["topk_ids"]


@pytest.fixture
def packs(monkeypatch):
    """The shapes of the expert weights packed (each call of ``cpu_packed._pack``)."""
    calls = []
    real = cpu_packed._pack

    def counting(w_NK):
        calls.append(tuple(w_NK.shape))
        return real(w_NK)

    monkeypatch.setattr(cpu_packed, "_pack", counting)
    return calls


@needs_packing
@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(0, 8, 2), (1, 8, 2), (37, 8, 3), (5, 4, 4)])
def test_packed_matches_the_plain_gemms(monkeypatch, dtype, num_tokens, num_experts, top_k):
    # T = 0, one token, odd T with an expert that gets nothing, top_k = E; gated activation with both biases.
    d = make_moe_inputs(num_tokens, num_experts, 48, 40, top_k, dtype=dtype, activation="swigluoai", bias=True,
                        empty_experts=(1,) if num_experts > top_k else ())
    kw = {"activation": "swigluoai", "w13_bias": d["w13_bias"], "w2_bias": d["w2_bias"], "backend": "torch"}
    assert not cpu_packed.usable(d["hidden_states"], d["w13"], d["w2"])  # bare tensors: plain GEMMs
    plain = fused_experts(*_args(d), **kw)
    cpu_packed.track(d["w13"], d["w2"])
    assert cpu_packed.usable(d["hidden_states"], d["w13"], d["w2"])
    packed = fused_experts(*_args(d), **kw)
    monkeypatch.setenv("MOEKIT_CPU_PREPACK", "0")
    assert not cpu_packed.usable(d["hidden_states"], d["w13"], d["w2"])
    ref = reference_experts(*_args(d), activation="swigluoai", w13_bias_E2I=d["w13_bias"], w2_bias_EH=d["w2_bias"])
    assert packed.dtype == dtype and packed.shape == plain.shape
    assert_close(packed, ref, dtype)
    assert_close(packed, plain.double(), dtype)


@needs_packing
def test_each_expert_is_packed_once_and_only_when_used(packs):
    d = make_moe_inputs(6, 8, 32, 24, 2, dtype=PACKED_DTYPES[-1], empty_experts=(2, 5))
    used = int(torch.unique(d["topk_ids"]).numel())
    cpu_packed.track(d["w13"], d["w2"])
    for _ in range(3):
        fused_experts(*_args(d), backend="torch")
    assert len(packs) == 2 * used  # w13 and w2 of each routed expert, on the first call only


def _layer(dtype: torch.dtype) -> MoE:
    """A serving layer: frozen weights (only those are packed)."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(num_experts=4, hidden_size=32, intermediate_size=16, top_k=2), dtype=dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe.requires_grad_(False)


def _routing(num_tokens: int):
    weights, ids = select_experts(torch.randn(num_tokens, 4), 2)
    ids[:, 0] = 0  # every token uses expert 0
    return weights.contiguous(), ids.contiguous()


@needs_packing
def test_a_layer_packs_its_weights_and_drops_them_with_a_move(packs):
    dtype = PACKED_DTYPES[-1]
    moe = _layer(dtype)
    e = moe.routed_experts
    x = torch.randn(9, 32, dtype=dtype)
    weights, ids = _routing(9)
    with torch.no_grad():
        out = e(x, weights, ids)
        e(x, weights, ids)
    assert len(packs) == 2 * int(torch.unique(ids).numel())  # packed once
    assert_close(out, reference_experts(x, e.w13, e.w2, weights, ids), dtype)
    w13 = e.w13
    assert cpu_packed._packs(w13).entry is not None
    moe.to(torch.float16 if dtype != torch.float16 else torch.float32)  # a cast: the packs of the old weights
    # are dropped at once, not at the next CPU call
    assert cpu_packed._packs(w13).entry is None


@needs_packing
def test_packs_die_with_the_layer():
    # The packs hang off the weights themselves: nothing global keeps them (or the weights) alive.
    moe = _layer(PACKED_DTYPES[-1])
    x = torch.randn(3, 32, dtype=PACKED_DTYPES[-1])
    with torch.no_grad():
        moe.routed_experts(x, *_routing(3))
    entry = weakref.ref(cpu_packed._packs(moe.routed_experts.w13).entry)
    del moe
    gc.collect()
    assert entry() is None


@needs_packing
def test_swapped_conversion_after_a_forward(monkeypatch):
    # torch.__future__.set_swap_module_params_on_conversion(True): module.to() swaps each parameter's contents
    # with torch.utils.swap_tensors, which refuses tensors with weak references: a CPU forward must not leave one.
    # The cast layer computes as a fresh layer of its dtype; copies and pickles of a packed layer carry no packs.
    dtype = PACKED_DTYPES[-1]
    moe = _layer(dtype)
    x = torch.randn(5, 32, dtype=dtype)
    with torch.no_grad():
        moe(x)
    copied = copy.deepcopy(moe)
    assert getattr(cpu_packed._packs(copied.routed_experts.w13), "entry", None) is None
    buf = io.BytesIO()
    torch.save(moe, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert getattr(cpu_packed._packs(loaded.routed_experts.w13), "entry", None) is None
    monkeypatch.setattr(torch.__future__, "_swap_module_params_on_conversion", True)
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    moe.to(other)
    fresh = _layer(other)
    fresh.load_state_dict(moe.state_dict())
    with torch.no_grad():
        assert torch.equal(moe(x.to(other)), fresh(x.to(other)))


@needs_packing
@pytest.mark.parametrize("change", ["no_grad in place", "weight_loader", "data replaced", "state_dict",
                                    "data write + weights_changed"])
def test_weights_changed_after_a_forward_are_seen(change):
    # One element of expert 0 changes after a forward packed it: the next forward must see it.
    dtype = PACKED_DTYPES[-1]
    moe = _layer(dtype)
    e = moe.routed_experts
    x = torch.randn(9, 32, dtype=dtype)
    weights, ids = _routing(9)
    with torch.no_grad():
        e(x, weights, ids)  # packs the routed experts
        new_w13 = e.w13.detach().clone()
        new_w13[0, 0, 1] += 4.0
        if change == "no_grad in place":
            e.w13[0, 0, 1] += 4.0
        elif change == "weight_loader":  # writes through .data: the loader says so itself
            e.weight_loader(e.w13, new_w13[0, :16], "w1", 0)
        elif change == "data replaced":  # same shape and dtype, a new storage, the version counter as it was
            e.w13.data = new_w13.clone()
        elif change == "state_dict":
            moe.load_state_dict({**moe.state_dict(), "routed_experts.w13": new_w13})
        else:  # what a caller writing through .data (or a collective) must do after it
            e.w13.data[0, 0, 1] += 4.0
            e.weights_changed()
        assert torch.equal(e.w13, new_w13)
        assert_close(e(x, weights, ids), reference_experts(x, e.w13, e.w2, weights, ids), dtype)


@needs_packing
def test_inference_mode_runs_and_inference_weights_take_the_plain_path():
    # Weights made under inference_mode have no version counter, so their packs could not be checked: plain path.
    # Weights made outside and run under it are packed as usual.
    dtype = PACKED_DTYPES[-1]
    d = make_moe_inputs(5, 4, 16, 8, 2, dtype=dtype)
    cpu_packed.track(d["w13"], d["w2"])
    with torch.inference_mode():
        out = fused_experts(*_args(d), backend="torch")
        assert cpu_packed.usable(d["hidden_states"], d["w13"], d["w2"])
        inf = make_moe_inputs(5, 4, 16, 8, 2, dtype=dtype)
        cpu_packed.track(inf["w13"], inf["w2"])
        assert not cpu_packed.usable(inf["hidden_states"], inf["w13"], inf["w2"])
        out_inf = fused_experts(*_args(inf), backend="torch")
    assert_close(out, reference_experts(*_args(d)), dtype)
    assert_close(out_inf, reference_experts(*_args(d)), dtype)


def test_autograd_and_other_dtypes_take_the_plain_path():
    d = make_moe_inputs(3, 4, 16, 8, 2, dtype=torch.float32)
    w13 = d["w13"].clone().requires_grad_()
    cpu_packed.track(w13, d["w13"], d["w2"])
    assert not cpu_packed.usable(d["hidden_states"], w13, d["w2"])
    with torch.no_grad():  # trainable weights never, not even where nothing is recorded (.data writes go unseen)
        assert not cpu_packed.usable(d["hidden_states"], w13, d["w2"])
        assert cpu_packed.usable(d["hidden_states"], d["w13"], d["w2"]) == (torch.float32 in PACKED_DTYPES)
    out = fused_experts(d["hidden_states"], w13, d["w2"], d["topk_weights"], d["topk_ids"], backend="torch")
    out.sum().backward()
    assert w13.grad is not None and torch.isfinite(w13.grad).all()
    w64 = d["w13"].double()
    cpu_packed.track(w64)
    assert not cpu_packed.usable(d["hidden_states"], w64, d["w2"])  # mixed dtypes
    assert not cpu_packed.usable(d["hidden_states"].double(), w64, d["w2"].double())  # fp64: oneDNN has none


@needs_packing
@pytest.mark.parametrize("step", ["adam_fused", "adam", "data_write"])
def test_training_never_uses_stale_packs(monkeypatch, packs, step):
    # A fused optimizer step writes the weights without moving their version counters, and so does a hand-written
    # step through .data (p.data.sub_(lr * p.grad)): an evaluation between steps ran on packs of the first weights
    # (40-70% off after the .data steps). Trainable weights are never packed; frozen ones are, and evaluate right.
    if not cpu_packed._dtype_supported(torch.float32):
        pytest.skip("fp32 not packed here")
    torch.manual_seed(0)
    moe = MoE(MoEConfig(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16, backend="torch"))
    x = torch.randn(6, 32)
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2, fused=step == "adam_fused") if step != "data_write" else None
    for _ in range(3):
        with torch.no_grad():  # an evaluation between steps
            got = moe(x)
            monkeypatch.setenv("MOEKIT_CPU_PREPACK", "0")
            plain = moe(x)
            monkeypatch.delenv("MOEKIT_CPU_PREPACK")
        assert_close(got, plain.double(), torch.float32)
        moe.zero_grad()
        moe(x).square().sum().backward()
        if opt is not None:
            opt.step()
        else:
            for p in moe.parameters():
                p.data.sub_(0.5 * p.grad)
    assert len(packs) == 0  # trainable: never packed
    moe.requires_grad_(False)  # frozen for serving: packed, and right
    with torch.no_grad():
        packed = moe(x)
        monkeypatch.setenv("MOEKIT_CPU_PREPACK", "0")
        plain = moe(x)
    assert len(packs) > 0
    assert_close(packed, plain.double(), torch.float32)


@needs_packing
def test_packs_of_frozen_weights_do_not_outlive_a_round_of_training(monkeypatch, packs):
    # Frozen and evaluated (packed), then unfrozen, trained through .data (no version counter moves) and frozen
    # again: the evaluation after ran on the packs of the first weights. The first forward as trainable weights
    # drops them.
    if not cpu_packed._dtype_supported(torch.float32):
        pytest.skip("fp32 not packed here")
    torch.manual_seed(0)
    moe = MoE(MoEConfig(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16, backend="torch"))
    moe.requires_grad_(False)
    x = torch.randn(6, 32)
    with torch.no_grad():
        moe(x)
    assert len(packs) > 0
    moe.requires_grad_(True)
    moe.zero_grad()
    moe(x).square().sum().backward()
    for p in moe.parameters():
        p.data.sub_(0.5 * p.grad)
    moe.requires_grad_(False)
    with torch.no_grad():
        packed = moe(x)
        monkeypatch.setenv("MOEKIT_CPU_PREPACK", "0")
        plain = moe(x)
    assert_close(packed, plain.double(), torch.float32)
