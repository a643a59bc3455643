"""select_experts: every routing variant against hand-computed or independently computed results."""

import math

import pytest
import torch

from moekit import RoutingConfig, select_experts
from moekit.router import route


def test_softmax_topk_hand_computed():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w, ids = select_experts(logits, 2)
    e = [math.exp(v) for v in (1.0, 3.0, 2.0, 0.0)]
    s = sum(e)
    assert ids.tolist() == [[1, 2]]
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([[e[1] / s, e[2] / s]]))


def test_softmax_renormalize_equals_softmax_over_picked():
    logits = torch.randn(7, 16)
    w, ids = select_experts(logits, 4, renormalize=True)
    picked = logits.gather(1, ids.long())
    torch.testing.assert_close(w, torch.softmax(picked, dim=-1))
    torch.testing.assert_close(w.sum(-1), torch.ones(7))


def test_topk_before_score_softmax_gpt_oss():
    logits = torch.tensor([[0.5, -1.0, 2.0, 1.5]])
    w, ids = select_experts(logits, 2, topk_before_score=True)
    assert ids.tolist() == [[2, 3]]
    a, b = math.exp(2.0), math.exp(1.5)
    torch.testing.assert_close(w, torch.tensor([[a / (a + b), b / (a + b)]]))


def test_topk_before_score_sigmoid_llama4():
    logits = torch.tensor([[0.5, -1.0, 2.0, 1.5]])
    w, ids = select_experts(logits, 1, scoring_func="sigmoid", topk_before_score=True)
    assert ids.tolist() == [[2]]
    torch.testing.assert_close(w, torch.tensor([[1 / (1 + math.exp(-2.0))]]))


def test_topk_before_score_with_correction_bias_kolibri():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 4.0])
    w, ids = select_experts(logits, 2, scoring_func="sigmoid", topk_before_score=True, e_score_correction_bias=bias,
                            renormalize=True)
    assert ids.tolist() == [[3, 0]]  # -1 + 4 beats 2 + 0: the bias decides the choice ...
    s3, s0 = 1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-2.0))  # ... but the weights are the raw logits'
    torch.testing.assert_close(w, torch.tensor([[s3 / (s3 + s0), s0 / (s3 + s0)]]))


def test_sigmoid_scores_and_renormalize():
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    w, ids = select_experts(logits, 2, scoring_func="sigmoid")
    sig = torch.sigmoid(logits)
    assert ids.tolist() == [[1, 0]]
    torch.testing.assert_close(w, sig[:, [1, 0]])
    w2, _ = select_experts(logits, 2, scoring_func="sigmoid", renormalize=True)
    torch.testing.assert_close(w2, sig[:, [1, 0]] / sig[:, [1, 0]].sum())


def test_correction_bias_affects_selection_only():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    w, ids = select_experts(logits, 2, scoring_func="sigmoid", e_score_correction_bias=bias)
    assert sorted(ids.tolist()[0]) == [0, 3]
    sig = torch.sigmoid(logits)[0]
    got = dict(zip(ids.tolist()[0], w.tolist()[0]))
    assert got[3] == pytest.approx(float(sig[3]))  # weight is the unbiased score
    assert got[0] == pytest.approx(float(sig[0]))


def _grouped_reference(logits, k, groups, topk_group, group_score, bias, renorm, scale):
    """Independent per-token Python implementation of grouped top-k."""
    out_w, out_ids = [], []
    for row in logits.tolist():
        scores = [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + float(b) for s, b in zip(scores, bias)]
        per = len(row) // groups
        gscore = []
        for g in range(groups):
            vals = sorted(choice[g * per : (g + 1) * per], reverse=True)
            gscore.append(vals[0] if group_score == "max" else vals[0] + vals[1])
        keep = sorted(range(groups), key=lambda g: -gscore[g])[:topk_group]
        cand = [e for e in range(len(row)) if e // per in keep]
        ids = sorted(cand, key=lambda e: -choice[e])[:k]
        w = [scores[e] for e in ids]
        if renorm:
            w = [v / sum(w) for v in w]
        out_w.append([v * scale for v in w])
        out_ids.append(ids)
    return torch.tensor(out_w), torch.tensor(out_ids)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_grouped_topk_matches_python_reference(group_score):
    torch.manual_seed(1)
    logits = torch.randn(9, 32)
    bias = torch.randn(32) * 0.3
    w, ids = select_experts(
        logits, 4, scoring_func="sigmoid", renormalize=True, num_expert_group=8, topk_group=3,
        group_score=group_score, e_score_correction_bias=bias, routed_scaling_factor=2.5,
    )
    rw, rids = _grouped_reference(logits, 4, 8, 3, group_score, bias, True, 2.5)
    assert ids.long().tolist() == rids.tolist()
    torch.testing.assert_close(w, rw)


def test_grouped_topk_only_picks_from_kept_groups():
    # Group 1 (experts 2,3) has the single largest logit but group 0 wins on top2_sum.
    logits = torch.tensor([[3.0, 3.0, 3.5, -5.0]])
    _, ids = select_experts(logits, 2, num_expert_group=2, topk_group=1, group_score="top2_sum")
    assert sorted(ids.tolist()[0]) == [0, 1]
    _, ids = select_experts(logits, 2, num_expert_group=2, topk_group=1, group_score="max")
    assert sorted(ids.tolist()[0]) == [2, 3]


def test_routed_scaling_factor():
    logits = torch.randn(5, 8)
    w1, ids1 = select_experts(logits, 2, renormalize=True)
    w2, ids2 = select_experts(logits, 2, renormalize=True, routed_scaling_factor=2.5)
    assert torch.equal(ids1, ids2)
    torch.testing.assert_close(w2, w1 * 2.5)


def test_custom_routing_function_gets_its_arguments():
    seen = {}

    def fn(hidden_states, router_logits, top_k, renormalize):
        seen.update(h=hidden_states, k=top_k, r=renormalize)
        ids = torch.zeros(router_logits.shape[0], top_k, dtype=torch.int64)
        return torch.full((router_logits.shape[0], top_k), 0.5, dtype=torch.float16), ids

    x = torch.randn(3, 4)
    w, ids = select_experts(torch.randn(3, 6), 2, custom_routing_function=fn, hidden_states=x, renormalize=True,
                            routed_scaling_factor=2.0)
    assert seen["h"] is x and seen["k"] == 2 and seen["r"] is True
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    torch.testing.assert_close(w, torch.ones(3, 2))


def test_custom_routing_function_bad_output_is_rejected():
    def fn(h, logits, k, r):
        return torch.ones(logits.shape[0], k), torch.full((logits.shape[0], k), 99)

    with pytest.raises(ValueError, match="topk_ids"):
        select_experts(torch.randn(3, 6), 2, custom_routing_function=fn)


def test_custom_routing_function_refuses_the_arguments_it_would_ignore():
    # It receives the logits, top_k and renormalize only: sigmoid scores, groups or a correction bias beside it
    # were silently dropped.
    def fn(h, logits, k, r):
        return torch.ones(logits.shape[0], k), torch.zeros(logits.shape[0], k, dtype=torch.int64)

    for kw, name in ((dict(scoring_func="sigmoid"), "scoring_func"), (dict(topk_before_score=True), "topk_before"),
                     (dict(num_expert_group=2, topk_group=1), "num_expert_group"),
                     (dict(e_score_correction_bias=torch.zeros(6)), "e_score_correction_bias")):
        with pytest.raises(ValueError, match=f"{name}.*has no effect with custom_routing_function"):
            select_experts(torch.randn(3, 6), 2, custom_routing_function=fn, **kw)
    with pytest.raises(ValueError, match="routing.correction_bias: True has no effect with a custom_routing_function"):
        RoutingConfig(custom_routing_function=fn, correction_bias=True)
    with pytest.raises(ValueError, match="routing.scoring_func: 'sigmoid' has no effect"):
        RoutingConfig(custom_routing_function=fn, scoring_func="sigmoid")
    # Configs with different functions are different routings.
    assert RoutingConfig(custom_routing_function=fn) != RoutingConfig()


def test_group_score_without_groups_is_refused():
    # Probably a config whose n_group/topk_group went missing: its group score would be ignored.
    with pytest.raises(ValueError, match="routing.group_score: 'top2_sum' scores expert groups"):
        RoutingConfig(group_score="top2_sum")
    with pytest.raises(ValueError, match="group_score: 'top2_sum' scores expert groups"):
        select_experts(torch.randn(3, 8), 2, group_score="top2_sum")


def test_precomputed_int64_ids_past_int32_do_not_wrap():
    # 2**32 + 3 cast to int32 is 3, a valid expert: it must stay out of range.
    ids = torch.tensor([[2**32 + 3, 1], [0, -(2**32) + 2]])
    _, got = select_experts(None, 2, topk_weights=torch.rand(2, 2), topk_ids=ids)
    assert got.tolist() == [[2**31 - 1, 1], [0, -(2**31)]]
    with pytest.raises(ValueError, match="topk_ids: expected values in"):
        select_experts(torch.randn(2, 8), 2, topk_weights=torch.rand(2, 2), topk_ids=ids)


def test_precomputed_passthrough():
    w = torch.rand(4, 2, dtype=torch.bfloat16)
    ids = torch.randint(0, 8, (4, 2))
    gw, gids = select_experts(None, 2, topk_weights=w, topk_ids=ids)
    assert gw.dtype == torch.float32 and gids.dtype == torch.int32
    assert torch.equal(gids.long(), ids) and torch.equal(gw, w.float())


def test_route_uses_routing_config():
    logits = torch.randn(6, 16)
    cfg = RoutingConfig(scoring_func="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                        group_score="top2_sum", routed_scaling_factor=1.5)
    w, ids = route(logits, 3, cfg)
    w2, ids2 = select_experts(logits, 3, scoring_func="sigmoid", renormalize=True, num_expert_group=4,
                              topk_group=2, group_score="top2_sum", routed_scaling_factor=1.5)
    assert torch.equal(ids, ids2) and torch.equal(w, w2)


def test_top_k_equals_num_experts():
    logits = torch.randn(3, 5)
    w, ids = select_experts(logits, 5)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(w.sum(-1), torch.ones(3))


def test_empty_input():
    w, ids = select_experts(torch.randn(0, 8), 2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


def test_minus_inf_logits_are_never_picked():
    logits = torch.randn(50, 8)
    logits[:, [1, 5]] = float("-inf")
    _, ids = select_experts(logits, 3, renormalize=True)
    assert not torch.isin(ids, torch.tensor([1, 5], dtype=torch.int32)).any()


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_minus_inf_logits_stay_out_with_a_correction_bias(scoring_func):
    logits = torch.tensor([[float("-inf"), float("-inf"), 0.0, 0.3]])
    bias = torch.tensor([5.0, 5.0, 0.0, 0.0])
    w, ids = select_experts(logits, 2, scoring_func=scoring_func, renormalize=True, e_score_correction_bias=bias)
    assert sorted(ids.tolist()[0]) == [2, 3] and torch.isfinite(w).all()
    _, ids = select_experts(logits, 2, scoring_func=scoring_func, e_score_correction_bias=bias,
                            num_expert_group=2, topk_group=1, group_score="top2_sum")
    assert sorted(ids.tolist()[0]) == [2, 3]


def test_custom_routing_compiles_without_graph_break():
    def fn(hidden_states, logits, k, renormalize):
        return torch.topk(logits.softmax(-1), k)

    compiled = torch.compile(lambda logits: select_experts(logits, 2, custom_routing_function=fn),
                             backend="eager", fullgraph=True)
    logits = torch.randn(4, 8)
    w, ids = compiled(logits)
    torch.testing.assert_close(w, torch.topk(logits.softmax(-1), 2).values)


def test_nan_logits_stay_in_range_and_in_their_row():
    # Documented: ids stay valid; the NaN reaches only that token's weights.
    logits = torch.randn(4, 8)
    logits[2, 3] = float("nan")
    w, ids = select_experts(logits, 2, renormalize=True)
    assert int(ids.min()) >= 0 and int(ids.max()) < 8
    assert torch.isnan(w[2]).any()
    assert torch.isfinite(w[[0, 1, 3]]).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 9}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"scoring_func": "tanh"}, "scoring_func"),
        ({"num_expert_group": 3, "topk_group": 1}, "num_expert_group"),
        ({"num_expert_group": 4, "topk_group": 5}, "topk_group"),
        ({"num_expert_group": 4, "topk_group": 1, "top_k": 3}, "top_k"),
        ({"e_score_correction_bias": torch.zeros(7)}, "e_score_correction_bias"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        ({"routed_scaling_factor": float("inf")}, "routed_scaling_factor"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"top_k": 2, **kwargs}
    top_k = args.pop("top_k")
    with pytest.raises(ValueError, match=match):
        select_experts(torch.randn(3, 8), top_k, **args)


def test_bad_logits():
    with pytest.raises(ValueError, match=r"router_logits: expected a 2-d tensor"):
        select_experts(torch.randn(8), 2)
    with pytest.raises(TypeError, match="router_logits: expected dtype"):
        select_experts(torch.zeros(3, 8, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="topk_ids: expected an integer dtype"):
        select_experts(None, 2, topk_weights=torch.rand(3, 2), topk_ids=torch.rand(3, 2))
    with pytest.raises(ValueError, match="topk_ids: expected the shape of topk_weights"):
        select_experts(None, 2, topk_weights=torch.rand(3, 2), topk_ids=torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="given together"):
        select_experts(None, 2, topk_ids=torch.zeros(3, 2, dtype=torch.int64))


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_minus_inf_logits_lose_to_finite_logits_whose_scores_underflow(scoring_func):
    # softmax(-300 - 0) and sigmoid(-300) are exactly 0 in fp32, the same score as a -inf logit: the tie must
    # still go to the finite logits (the documented contract), with or without grouped top-k.
    inf = float("inf")
    logits = torch.full((1, 64), -inf)
    finite = torch.arange(1, 64, 3)
    logits[0, finite] = -300.0 - torch.arange(finite.numel()).float()
    logits[0, 0] = 0.0
    finite = torch.cat([torch.tensor([0]), finite])
    for kw in ({}, {"num_expert_group": 8, "topk_group": 8}):
        _, ids = select_experts(logits, 8, scoring_func=scoring_func, **kw)
        assert torch.isin(ids.long(), finite).all(), (kw, ids)


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_top2_sum_keeps_a_group_whose_only_finite_expert_is_needed(scoring_func):
    # Group 0 holds only -inf logits, group 1 one finite logit. Ranking groups by a -inf sum tied them and could
    # keep group 0, so the token lost its only real expert and got weight 0 (a zero output row).
    inf = float("inf")
    logits = torch.tensor([[-inf, -inf, -inf, 0.5]])
    w, ids = select_experts(logits, 1, scoring_func=scoring_func, e_score_correction_bias=torch.zeros(4),
                            num_expert_group=2, topk_group=1, group_score="top2_sum")
    assert ids.tolist() == [[3]] and float(w[0, 0]) > 0


@pytest.mark.parametrize("topk_before_score", [False, True])
def test_sigmoid_renormalize_when_scores_underflow(topk_before_score):
    # sigmoid(l) for l < ~-104 underflows to 0 in fp32; renormalizing must not turn finite logits into 0/0 = NaN.
    # The exact ratio sigmoid(a) / (sigmoid(a) + sigmoid(b)) is exp(a) / (exp(a) + exp(b)) down there.
    logits = torch.tensor([[-200.0, -201.0, -250.0, -300.0], [0.0, 1.0, -1.0, 2.0]])
    w, ids = select_experts(logits, 2, scoring_func="sigmoid", renormalize=True, topk_before_score=topk_before_score,
                            routed_scaling_factor=2.0)
    assert ids[0].tolist() == [0, 1]
    e = math.exp(-1.0)
    torch.testing.assert_close(w[0], torch.tensor([2 / (1 + e), 2 * e / (1 + e)]))
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(w[1], 2 * s / s.sum())


def test_precomputed_with_malformed_router_logits():
    with pytest.raises(ValueError, match=r"router_logits: expected a 2-d tensor"):
        select_experts(torch.randn(3), 2, topk_weights=torch.rand(3, 2), topk_ids=torch.zeros(3, 2, dtype=torch.int64))


@pytest.mark.parametrize("flag", ["renormalize", "topk_before_score"])
def test_flags_must_be_bools(flag):
    # "no" is truthy: a string flag would silently switch the behaviour on.
    with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
        select_experts(torch.randn(3, 8), 2, **{flag: "no"})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("topk_before_score", [False, True])
def test_nonfinite_correction_bias_is_rejected(bad, topk_before_score):
    # A NaN/+inf bias entry won every token's choice with finite weights: a corrupted checkpoint, never routed.
    bias = torch.zeros(8)
    bias[[2, 6]] = bad
    with pytest.raises(ValueError, match=r"e_score_correction_bias: .*NaN/\+inf at experts \[2, 6\]"):
        select_experts(torch.randn(4, 8), 2, scoring_func="sigmoid", topk_before_score=topk_before_score,
                       e_score_correction_bias=bias)


@pytest.mark.parametrize("grouped", [{}, {"num_expert_group": 4, "topk_group": 2, "group_score": "top2_sum"}])
def test_nonfinite_correction_bias_gives_nan_weights_when_values_cannot_be_checked(monkeypatch, grouped):
    # While compiling or capturing a graph nothing may sync: the tokens that picked the bad expert get NaN weights,
    # a token that cannot pick it (its logit is -inf) keeps its finite, correct weights.
    import moekit.router

    monkeypatch.setattr(moekit.router, "values_checkable", lambda: False)
    logits = torch.randn(4, 8)
    logits[3, 5] = float("-inf")
    bias = torch.zeros(8)
    bias[5] = float("nan")
    kw = {"scoring_func": "sigmoid", "renormalize": True, **grouped}
    w, ids = select_experts(logits, 2, e_score_correction_bias=bias, **kw)
    assert (ids[:3] == 5).any(dim=-1).all() and torch.isnan(w[:3]).all()
    expected_w, expected_ids = select_experts(logits[3:], 2, e_score_correction_bias=torch.zeros(8), **kw)
    assert torch.equal(ids[3:], expected_ids) and torch.equal(w[3:], expected_w)


@pytest.mark.parametrize("topk_before_score", [False, True])
def test_minus_inf_correction_bias_never_picks_the_expert(topk_before_score):
    logits = torch.randn(16, 8)
    logits[:, 4] = 10.0
    bias = torch.zeros(8)
    bias[4] = float("-inf")
    w, ids = select_experts(logits, 2, scoring_func="sigmoid", topk_before_score=topk_before_score,
                            e_score_correction_bias=bias)
    assert not (ids == 4).any() and torch.isfinite(w).all()


def test_topk_ids_dtype_matches_the_message():
    # The message lists what is accepted: every integer dtype (each consumer converts before indexing, so uint8
    # never indexes as a mask); floats and bools are refused.
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        w, ids = select_experts(None, 2, topk_weights=torch.rand(3, 2), topk_ids=torch.ones(3, 2, dtype=dtype))
        assert ids.dtype == torch.int32 and bool((ids == 1).all())
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(TypeError, match=r"topk_ids: expected an integer dtype \(int8, int16, int32, int64 or uint8\)"):
            select_experts(None, 2, topk_weights=torch.rand(3, 2), topk_ids=torch.ones(3, 2, dtype=dtype))


def test_small_int_ids_give_the_int32_result():
    # int8/int16/uint8 ids worked before the dtype check tightened, and must keep working on every backend.
    from moekit import fused_experts
    from moekit.kernel import available_backends
    from moekit.testing import make_moe_inputs

    d = make_moe_inputs(5, 4, 16, 8, 2)
    for backend in available_backends("cpu"):
        want = fused_experts(d["hidden_states"], d["w13"], d["w2"], d["topk_weights"], d["topk_ids"], backend=backend)
        for dtype in (torch.int8, torch.int16, torch.uint8):
            got = fused_experts(d["hidden_states"], d["w13"], d["w2"], d["topk_weights"], d["topk_ids"].to(dtype),
                                backend=backend)
            assert torch.equal(got, want), (backend, dtype)


def test_numbers_from_numpy_and_0d_tensors_are_accepted():
    import numpy as np

    from moekit import Activation, MoEConfig, RoutingConfig

    assert RoutingConfig(routed_scaling_factor=torch.tensor(2.5)).routed_scaling_factor == 2.5
    assert type(RoutingConfig(routed_scaling_factor=np.float32(2.5)).routed_scaling_factor) is float
    assert Activation(name="swigluoai", alpha=torch.tensor(1.5), limit=7).alpha == 1.5
    w, _ = select_experts(torch.randn(3, 4), 2, routed_scaling_factor=torch.tensor(2.0), renormalize=True)
    torch.testing.assert_close(w.sum(-1), torch.full((3,), 2.0))
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=4, bias=np.bool_(True))
    assert cfg.bias
    with pytest.raises(TypeError, match="router_fp32: expected a bool, got int 1"):
        MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=4, router_fp32=1)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"routed_scaling_factor": "2.5"}, TypeError, "routed_scaling_factor: expected a float, got str"),
        ({"routed_scaling_factor": float("nan")}, ValueError, "routed_scaling_factor"),
        ({"num_expert_group": 2.0, "topk_group": 1}, TypeError, "num_expert_group: expected an int"),
        ({"topk_group": 1}, ValueError, "set both"),
        ({"num_expert_group": 2, "topk_group": 1, "topk_before_score": True}, ValueError, "topk_before_score"),
        ({"e_score_correction_bias": torch.zeros(8, dtype=torch.int64)}, TypeError, "e_score_correction_bias"),
    ],
)
def test_bad_argument_types(kwargs, err, match):
    with pytest.raises(err, match=match):
        select_experts(torch.randn(3, 8), 2, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_nonfinite_correction_bias_gives_nan_weights_without_a_sync():
    # On the GPU no value check runs per call: the tokens that picked the corrupt expert get NaN weights.
    logits = torch.randn(16, 8, device="cuda")
    bias = torch.zeros(8, device="cuda")
    bias[5] = float("nan")
    weights, ids = select_experts(logits, 2, scoring_func="sigmoid", e_score_correction_bias=bias)
    picked = (ids == 5).any(dim=-1)
    assert bool(weights[picked].isnan().all()) and bool(weights[~picked].isfinite().all())


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("topk_before_score", [False, True])
def test_plus_inf_logit_saturates_sigmoid_and_breaks_softmax(topk_before_score, renormalize):
    # Documented: under sigmoid scoring +inf is a saturated score (sigmoid = 1), picked with finite weights; under
    # softmax it gives the token NaN weights (inf - inf), as a NaN logit does.
    logits = torch.tensor([[float("inf"), 0.5, 0.1, -1.0], [0.1, 0.2, 0.3, 0.4]])
    kw = {"topk_before_score": topk_before_score, "renormalize": renormalize}
    w, ids = select_experts(logits, 2, scoring_func="sigmoid", **kw)
    assert ids[0].tolist() == [0, 1] and torch.isfinite(w).all()
    if not renormalize:
        assert w[0, 0] == 1.0
    w, ids = select_experts(logits, 2, scoring_func="softmax", **kw)
    assert torch.isnan(w[0]).all() and torch.isfinite(w[1]).all() and ids[0].tolist() == [0, 1]


@pytest.mark.parametrize("kwargs", [
    {"routed_scaling_factor": 2.5}, {"renormalize": True}, {"num_expert_group": 2, "topk_group": 1},
    {"group_score": "top2_sum"}, {"e_score_correction_bias": torch.zeros(8)}, {"scoring_func": "sigmoid"},
    {"topk_before_score": True}, {"custom_routing_function": lambda *a: None},
], ids=lambda kw: next(iter(kw)))
def test_precomputed_routing_refuses_routing_arguments(kwargs):
    # Precomputed weights/ids skip routing: a scaling factor, renormalization, grouping or bias given beside them
    # was silently ignored.
    w, ids = torch.rand(4, 2), torch.randint(0, 8, (4, 2))
    with pytest.raises(ValueError, match=rf"select_experts: {next(iter(kwargs))}=.* given with precomputed"):
        select_experts(None, 2, topk_weights=w, topk_ids=ids, **kwargs)
    select_experts(None, 2, topk_weights=w, topk_ids=ids, routed_scaling_factor=1.0, renormalize=False)  # defaults
