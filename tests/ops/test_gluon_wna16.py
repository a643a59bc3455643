"""The Gluon decode path of ``grouped_gemm_wna16`` ("gluon_pairs", ``moekit.ops.gluon_wna16``).

CPU: ``gather_pieces`` against its torch twin (interpreter), and the kernel's arithmetic emulated in torch on
``gather_pieces``' output -- pieces r of each 128-column group built from nibbles r and r + 4 of the int32 code
words, minus the zero point, summed per group, scaled in fp32 -- against the reference GEMM: the permutation of
A and the nibble order must agree, or this sum is wrong; the e2m1 pieces' bit arithmetic and two bf16 multiplies
against the e8m0 dequantization for every code and every scale. GPU (sm_90): the kernel itself against
``grouped_gemm_wna16_ref`` over the decode shapes (integer and mxfp4 codes, K tails, biases, swigluoai), each case
checked to run the Gluon kernel (not its fallback).
"""

from dataclasses import replace

import pytest
import torch

from moekit.ops.activation import Activation
from moekit.ops.align import align, align_ref, row_per_block
from moekit.ops.gluon_wna16 import gather_pieces, gather_pieces_ref, gluon_unsupported, piece_order
from moekit.ops.grouped_gemm_wna16 import MXFP4Weight, _as_words, grouped_gemm_wna16, grouped_gemm_wna16_ref
from moekit.ops.heuristics import GemmConfig
from moekit.ops.quantize_mxfp4 import E2M1_VALUES, quantize_mxfp4
from moekit.ops.quantize_wna16 import quantize_wna16
from moekit.testing import assert_close

SILU = Activation(name="silu")
DECODE = GemmConfig(block_n=128, block_k=256, num_warps=4, num_stages=4, variant="gluon_pairs")


def _layouts(num_tokens, top_k, num_experts, block_m, device="cpu", expert_map=None, one_expert=False):
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).int().to(device)
    if one_expert:  # every row on expert 0
        ids.zero_()
    if num_tokens == 1 and expert_map is None:
        return ids, row_per_block(ids, block_m)
    return ids, align(ids, num_experts, block_m, expert_map=expert_map)


@pytest.mark.parametrize("num_tokens, top_k, block_m, a_row_div, bm, k_dim", [
    (1, 2, 16, 2, 8, 384),     # one row a block, 8 slots a block (the kernel's BM at one token)
    (5, 2, 16, 2, None, 384),  # gathered by token (GEMM 1), padding slots zero
    (7, 3, 16, 1, None, 384),  # gathered by routed row (GEMM 2)
    (0, 2, 16, 2, None, 384),  # no tokens
    (5, 2, 16, 2, None, 352),  # K = 2·128 + 96: the last group's columns past K are zeros
])
def test_gather_pieces_matches_reference(num_tokens, top_k, block_m, a_row_div, bm, k_dim):
    num_experts = 4
    _, layout = _layouts(num_tokens, top_k, num_experts, block_m) if num_tokens else (
        None, align_ref(torch.zeros(0, top_k, dtype=torch.int32), num_experts, block_m))
    num_rows = num_tokens * top_k
    a = torch.randn(max(num_rows // a_row_div, 1), k_dim).half()
    got = gather_pieces(a, layout, num_rows=num_rows, a_row_div=a_row_div, block_m=bm)
    want = gather_pieces_ref(a, layout, num_rows=num_rows, a_row_div=a_row_div, block_m=bm)
    assert got.shape == (-(-k_dim // 128) * 4, layout.expert_ids.numel() * (bm or block_m), 32)
    assert torch.equal(got, want)
    if k_dim % 128:  # the padded columns, wherever the piece order put them
        cols = piece_order()[None, :].repeat(got.shape[1], 1)  # [slots, 128] source column of each position
        last = got[-4:].permute(1, 0, 2).reshape(got.shape[1], 128)
        assert torch.equal(last[cols >= k_dim % 128], torch.zeros_like(last[cols >= k_dim % 128]))


def test_piece_order_is_a_permutation_of_each_group():
    assert torch.equal(piece_order().sort().values, torch.arange(128))


def _emulate(a, w, layout, num_rows, a_row_div, bm=None):
    """The kernel's sum in torch: [slots, n_b] fp32, from code words and ``gather_pieces``."""
    bm = bm or layout.block_m
    pieces = gather_pieces(a, layout, num_rows=num_rows, a_row_div=a_row_div, block_m=bm).float()
    num_slots = pieces.shape[1]
    words = _as_words(w.qweight).to(torch.int64) & 0xFFFFFFFF  # [E, n_b, K / 8]
    num_experts, n_b, k_dim = w.qweight.shape[0], w.qweight.shape[1], w.k
    group = w.group_size if 0 < w.group_size < k_dim else k_dim
    out = torch.zeros(num_slots, n_b)
    for blk in range(layout.expert_ids.numel()):
        e = int(layout.expert_ids[blk])
        if e < 0:
            continue
        acc = torch.zeros(n_b, bm)
        for g in range(k_dim // 128):
            wg = words[e, :, 16 * g:16 * g + 16]  # [n_b, 16]
            i_grp = 128 * g // group
            z = 8.0 if w.zeros is None else w.zeros[e, :, i_grp].float()[:, None]
            prod = torch.zeros(n_b, bm)
            for r in range(4):
                lo, hi = (wg >> (4 * r)) & 15, (wg >> (4 * r + 16)) & 15
                piece = torch.stack([lo, hi], -1).reshape(n_b, 32).float() - z  # column 2w + h
                prod += piece @ pieces[4 * g + r, blk * bm:(blk + 1) * bm].T
            acc += prod * w.scales[e, :, i_grp].float()[:, None]
        out[blk * bm:(blk + 1) * bm] = acc.T
    return out


@pytest.mark.parametrize("group_size, sym", [(128, True), (256, False), (-1, True)])
@pytest.mark.parametrize("one_token", [False, True])
def test_emulated_kernel_sum_matches_reference(group_size, sym, one_token):
    num_tokens, top_k, num_experts, k_dim, n_b = (1 if one_token else 6), 2, 4, 512, 24
    ids, layout = _layouts(num_tokens, top_k, num_experts, 16)
    w = quantize_wna16(torch.randn(num_experts, n_b, k_dim) / 10, 4, group_size, sym)
    x = (torch.randn(num_tokens, k_dim) / 10).half()
    num_rows = ids.numel()
    got = _emulate(x, w, layout, num_rows, top_k, bm=8 if one_token else None)
    want = grouped_gemm_wna16_ref(x, w, layout, torch.empty(num_rows, n_b), num_rows=num_rows, a_row_div=top_k)
    bm = 8 if one_token else layout.block_m
    if layout.row_per_block:
        slots = torch.arange(num_rows) * bm
        rows = torch.arange(num_rows)
    else:
        slots = torch.nonzero(layout.sorted_ids[:layout.expert_ids.numel() * bm] < num_rows).flatten()
        rows = layout.sorted_ids[slots].long()
    torch.testing.assert_close(got[slots], want[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case, want", [
    ("supported", None),
    ("bias", None),
    ("relu2", "activation relu2"),
    ("swigluoai", None),
    ("group64", "K = 512 not a multiple of 32 or group size 64 not a multiple of 128"),
    ("k384_group128", None),
    ("k352_group128", None),  # a last K step of 96 columns
    ("8bit", "not 4-bit codes in aligned int32 words"),
    ("fp32", "activations torch.float32"),
    ("mxfp4", None),
    ("mxfp4_fp16", "activations torch.float16 (mxfp4: bf16 only)"),
    ("block64", "row blocks of 64 slots"),
    ("narrow_gated", "tile of 64 rows on 4 warps for 256 outputs"),
    ("split_gated", "split-K with an activation"),
    ("wide", "tile of 512 rows on 8 warps for 512 outputs"),
    ("strided_scales", "scales or zero points with a last stride other than 1"),
    ("offset_codes", "codes not 16-byte aligned (TMA)"),
])
def test_unsupported_names_what_the_kernel_cannot_do(monkeypatch, case, want):
    # The shape rules of gluon_unsupported, with the device check (CUDA sm_90, Triton with Gluon) passed.
    import moekit.ops.gluon_wna16 as op
    monkeypatch.setattr(op, "_device_unsupported", lambda a: None)
    k_dim = int(case[1:4]) if case.startswith("k3") else 512
    bits, group = (8, 128) if case == "8bit" else (4, 64 if case == "group64" else 128)
    dtype = {"fp32": torch.float32, "mxfp4": torch.bfloat16}.get(case, torch.float16)
    e2m1 = case.startswith("mxfp4")
    if e2m1:
        qweight, scales = quantize_mxfp4(torch.randn(4, 512, k_dim) / 10)
        group = 32
    else:
        w = quantize_wna16(torch.randn(4, 512, k_dim) / 10, bits, group, True)
        qweight, scales = w.qweight, w.scales
    if case == "strided_scales":
        scales = scales.transpose(1, 2).contiguous().transpose(1, 2)
    if case == "offset_codes":
        qweight = torch.empty(qweight.numel() + 4, dtype=torch.uint8)[4:].view(qweight.shape)
    words = _as_words(qweight) if bits == 4 else None
    _, layout = _layouts(6, 2, 4, 64 if case == "block64" else 16)
    cfg = DECODE
    act = {"relu2": Activation(name="relu2"), "swigluoai": Activation(name="swigluoai")}.get(case, SILU)
    n_out = 256
    if case == "narrow_gated":
        cfg = replace(DECODE, block_n=64)
    if case == "split_gated":
        cfg = replace(DECODE, split_k=2)
    if case == "wide":
        cfg, act, n_out = replace(DECODE, block_n=512, num_warps=8), None, 512
    a = torch.randn(6, k_dim).to(dtype)
    why = gluon_unsupported(a, qweight, words, bits, e2m1, group, k_dim, n_out, layout, cfg, act, scales, None)
    assert why == want


def test_e2m1_pieces_are_the_exact_weights():
    # The kernel's e2m1 pair for every code (sign to bit 15, magnitude to bits 6-8) times the bf16 factor
    # 2^(E - M + 127) of its group, then the fp32 step factor 2^(M - 128) (M: the row's largest byte in the step),
    # against E2M1[q] · 2^(E - 127): exact for every group down to 2^-126 below its row's largest, for rows whose
    # largest byte is anywhere in 0-254 (255 is refused at load).
    codes = torch.arange(16, dtype=torch.int64)
    bits = ((codes & 7) << 6) | ((codes & 8) << 12)  # one 16-bit half of the pair
    raw = bits.to(torch.int16).view(torch.bfloat16)[None, :]
    values = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    for emax in range(255):
        e = torch.arange(emax + 1, dtype=torch.int64)
        f = ((e - emax + 254).clamp(min=0) << 7).to(torch.int16).view(torch.bfloat16)[:, None]
        # The kernel's bits: (M - 1) << 23, or the subnormals 1 << (M + 21) for M = 0, 1.
        post = torch.tensor((emax - 1) << 23 if emax > 1 else 1 << (emax + 21), dtype=torch.int32).view(torch.float32)
        assert post.item() == 2.0 ** (emax - 128)
        got = (raw * f).float() * post  # one bf16 multiply, then the fp32 factor
        want = values[None, :] * torch.exp2(e[:, None].double() - 127)
        near = (e >= emax - 126)[:, None] & (want.abs() <= torch.finfo(torch.float32).max)
        assert torch.equal(got.double()[near], want[near]), emax
        assert torch.isinf(got[(e >= emax - 126)[:, None] & ~near]).all()  # past fp32's range (E = 253-254) as in fp32
        # Groups further below their row's largest flush towards zero, by less than their own tiny size.
        far = (e < emax - 126)[:, None].expand_as(want)
        assert ((got.double() - want).abs()[far] <= want.abs()[far]).all()


def test_stage_width_divides_every_split():
    # K = 384 in two splits of 256 would end the second split half a stage early: 128-wide stages there.
    from moekit.ops.gluon_wna16 import GluonTiles
    _, layout = _layouts(3, 1, 2, 16)
    for k_dim, split, want in ((384, 2, 128), (512, 2, 256), (2432, 2, 128), (4096, 1, 256), (768, 3, 256)):
        tiles = GluonTiles(replace(DECODE, split_k=split), layout, k_dim, gated=False)
        assert tiles.bk == want and tiles.k_per_split % tiles.bk == 0 and k_dim % tiles.bk == 0


def test_unsupported_off_gpu_names_why():
    w = quantize_wna16(torch.randn(2, 128, 256) / 10, 4, 128, True)
    _, layout = _layouts(3, 1, 2, 16)
    why = gluon_unsupported(torch.randn(3, 256).half(), w.qweight, _as_words(w.qweight), 4, False, 128, 256, 64,
                            layout, DECODE, SILU)
    assert why == "not an NVIDIA GPU"


# GPU: (num_tokens, top_k, num_experts, hidden, inter, group, sym, dtype, block_m, block_n, warps, split, act)
GPU_CASES = [
    (9, 2, 4, 512, 256, 128, True, torch.bfloat16, 16, 128, 4, 1, "silu"),
    (9, 2, 4, 512, 256, 256, False, torch.float16, 16, 128, 4, 1, "silu"),       # zero points, fp16
    (1, 2, 4, 384, 128, -1, True, torch.bfloat16, 16, 128, 4, 1, "silu"),         # one token: 8-slot blocks
    (1, 8, 16, 512, 128, 128, False, torch.bfloat16, 16, 256, 8, 1, "gelu_tanh"),  # two warpgroups
    (20, 1, 4, 256, 128, 128, True, torch.bfloat16, 32, 128, 4, 2, "silu"),      # all on one expert, split GEMM 2
    (5, 2, 8, 768, 256, 128, False, torch.bfloat16, 16, 128, 4, 3, "gelu"),      # empty experts, split 3
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"T{c[0]}k{c[1]}E{c[2]}g{c[5]}{'s' if c[6] else 'a'}")
def test_gluon_gemms_match_reference_on_gpu(case):
    num_tokens, top_k, num_experts, hidden, inter, group, sym, dtype, block_m, block_n, warps, split, act = case
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel runs on sm_90 only")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    ids, layout = _layouts(num_tokens, top_k, num_experts, block_m, device=dev, one_expert=num_tokens == 20)
    w13 = quantize_wna16(torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=dtype) / 10, 4, group, sym)
    w2 = quantize_wna16(torch.randn(num_experts, hidden, inter, device=dev, dtype=dtype) / 10, 4, group, sym)
    x = torch.randn(num_tokens, hidden, device=dev, dtype=dtype) / 10
    num_rows = ids.numel()
    activation = Activation(name=act)
    cfg1 = replace(DECODE, block_n=block_n, num_warps=warps)
    cfg2 = replace(cfg1, block_n=block_n // 2 if warps == 4 else block_n, split_k=split)
    for w, cfg, k_dim, n_out, act_ in ((w13, cfg1, hidden, inter, activation), (w2, cfg2, inter, hidden, None)):
        assert gluon_unsupported(x, w.qweight, _as_words(w.qweight), 4, False, w.group_size, k_dim, n_out,
                                 layout, cfg, act_) is None
    a = torch.full((num_rows, inter), float("nan"), device=dev, dtype=dtype)
    kw1 = dict(num_rows=num_rows, a_row_div=top_k, activation=activation)
    grouped_gemm_wna16(x, w13, layout, a, cfg1, **kw1)
    want_a = grouped_gemm_wna16_ref(x, w13, layout, torch.empty(num_rows, inter, device=dev), **kw1)
    assert_close(a, want_a, dtype, name="gemm1")
    weights = torch.rand(num_rows, device=dev)
    y = torch.full((split, num_rows, hidden), float("nan"), device=dev)
    grouped_gemm_wna16(a, w2, layout, y if split > 1 else y[0], cfg2, num_rows=num_rows, weights_N=weights)
    want_y = grouped_gemm_wna16_ref(a, w2, layout, torch.empty(num_rows, hidden, device=dev), num_rows=num_rows,
                                    weights_N=weights)
    assert_close(y.sum(0), want_y, torch.float16, name="gemm2")  # exact (q - z)·a products, fp32 sums


@pytest.mark.gpu
def test_gluon_falls_back_with_relu2_on_gpu():
    # What the Gluon epilogue lacks (relu2, not gated) runs as "dequant_pairs", still right.
    dev = torch.device("cuda")
    ids, layout = _layouts(5, 2, 4, 16, device=dev)
    w = quantize_wna16(torch.randn(4, 128, 256, device=dev, dtype=torch.bfloat16) / 10, 4, 128, True)
    x = torch.randn(5, 256, device=dev, dtype=torch.bfloat16) / 10
    relu2 = Activation(name="relu2")
    assert gluon_unsupported(x, w.qweight, _as_words(w.qweight), 4, False, 128, 256, 128, layout, DECODE,
                             relu2) == "activation relu2"
    kw = dict(num_rows=10, a_row_div=2, activation=relu2, bias_EN=torch.randn(4, 128, device=dev))
    out = torch.empty(10, 128, device=dev, dtype=torch.bfloat16)
    grouped_gemm_wna16(x, w, layout, out, DECODE, **kw)
    assert_close(out, grouped_gemm_wna16_ref(x, w, layout, torch.empty(10, 128, device=dev), **kw), torch.bfloat16)


# mxfp4 on GPU: (num_tokens, top_k, num_experts, hidden, inter, block_m, split, activation, bias, extreme scales)
MXFP4_CASES = [
    (1, 4, 8, 320, 192, 16, 2, "swigluoai", True, False),   # gpt-oss's epilogue at one token, K tails 64 / 64
    # GEMM 1's K = 352 (a 96-column last step), scales 0-254; GEMM 2's 352 outputs are no multiple of its 64-row
    # tile: it runs the byte loads
    (7, 2, 8, 352, 128, 16, 1, "swigluoai", True, True),
    (20, 1, 4, 256, 256, 32, 2, "silu", False, False),      # all on one expert, split GEMM 2, no bias
    (9, 2, 4, 384, 192, 16, 3, "clamped_silu", True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", MXFP4_CASES, ids=lambda c: f"T{c[0]}H{c[3]}I{c[4]}{c[7]}")
def test_gluon_mxfp4_gemms_match_reference_on_gpu(case):
    num_tokens, top_k, num_experts, hidden, inter, block_m, split, act, has_bias, extreme = case
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel runs on sm_90 only")
    dev = torch.device("cuda")
    torch.manual_seed(2)
    ids, layout = _layouts(num_tokens, top_k, num_experts, block_m, device=dev, one_expert=num_tokens == 20)
    w13 = MXFP4Weight(*quantize_mxfp4(torch.randn(num_experts, 2 * inter, hidden, device=dev) / 10))
    w2 = MXFP4Weight(*quantize_mxfp4(torch.randn(num_experts, hidden, inter, device=dev) / 10))
    if extreme:  # the scale bytes' ends: subnormal bf16 weights (E <= 1) and large ones, beside ordinary groups
        for w in (w13, w2):
            w.scales[:, ::3, 0] = torch.tensor([0, 1, 2, 150], dtype=torch.uint8, device=dev).repeat(
                w.scales.shape[1] // 3 + 1)[:w.scales[:, ::3].shape[1]]
    x = torch.randn(num_tokens, hidden, device=dev, dtype=torch.bfloat16) / 10
    num_rows = ids.numel()
    activation = (Activation(name="silu", limit=7.0) if act == "clamped_silu" else
                  Activation(name=act, alpha=1.702, limit=7.0) if act == "swigluoai" else Activation(name=act))
    b13 = torch.randn(num_experts, 2 * inter, device=dev) if has_bias else None
    b2 = torch.randn(num_experts, hidden, device=dev) if has_bias else None
    cfg1 = replace(DECODE, block_k=128)
    cfg2 = replace(DECODE, block_k=128, block_n=64, split_k=split)
    for w, cfg, k_dim, n_out, act_ in ((w13, cfg1, hidden, inter, activation), (w2, cfg2, inter, hidden, None)):
        why = gluon_unsupported(x, w.qweight, _as_words(w.qweight), 4, True, 32, k_dim, n_out, layout, cfg, act_,
                                w.scales)
        assert why == (f"tile of 64 rows on 4 warps for {n_out} outputs" if n_out % 64 else None)
    a = torch.full((num_rows, inter), float("nan"), device=dev, dtype=torch.bfloat16)
    kw1 = dict(num_rows=num_rows, a_row_div=top_k, activation=activation, bias_EN=b13)
    grouped_gemm_wna16(x, w13, layout, a, cfg1, **kw1)
    want_a = grouped_gemm_wna16_ref(x, w13, layout, torch.empty(num_rows, inter, device=dev), **kw1)
    assert_close(a, want_a, torch.bfloat16, name="gemm1")
    weights = torch.rand(num_rows, device=dev)
    y = torch.full((split, num_rows, hidden), float("nan"), device=dev)
    kw2 = dict(num_rows=num_rows, weights_N=weights, bias_EN=b2)
    grouped_gemm_wna16(a, w2, layout, y if split > 1 else y[0], cfg2, **kw2)
    want_y = grouped_gemm_wna16_ref(a, w2, layout, torch.empty(num_rows, hidden, device=dev), **kw2)
    assert_close(y.sum(0), want_y, torch.float16, name="gemm2")  # exact weights, fp32 sums


def test_gather_pieces_names_bad_arguments():
    _, layout = _layouts(3, 2, 4, 16)
    a = torch.randn(3, 256).half()
    with pytest.raises(ValueError, match="a: expected K a multiple of 32"):
        gather_pieces(torch.randn(3, 200).half(), layout, num_rows=6, a_row_div=2)
    with pytest.raises(ValueError, match="a: expected at least 3 rows"):
        gather_pieces(a[:2], layout, num_rows=6, a_row_div=2)
    with pytest.raises(ValueError, match="block_m"):
        gather_pieces(a, layout, num_rows=6, a_row_div=2, block_m=8)  # not a one-row-a-block layout
    with pytest.raises(TypeError, match="a"):
        gather_pieces(a.int(), layout, num_rows=6, a_row_div=2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["k384_split2", "int64_ids_one_token", "expert_map", "fp16_sym", "fp32_scales"])
def test_gluon_edge_cases_on_gpu(case):
    # A split whose K is not a whole number of 256-wide stages, flat int64 topk_ids at one token, an expert map
    # (this rank holds experts 4-7 of 8: blocks of other ranks' rows are dropped), fp16's 1024 + q, fp32 scales:
    # GEMM 1 (gated) and GEMM 2 (routing weights, split-K) against the reference, each on the Gluon kernel.
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel runs on sm_90 only")
    dev = torch.device("cuda")
    torch.manual_seed(1)
    dtype = torch.float16 if case == "fp16_sym" else torch.bfloat16
    num_tokens, top_k, num_global = (1, 4, 8) if case == "int64_ids_one_token" else (7, 2, 8)
    hidden, inter, split = (384, 128, 2) if case == "k384_split2" else (512, 256, 2)
    ids = torch.stack([torch.randperm(num_global)[:top_k] for _ in range(num_tokens)]).to(dev)
    expert_map = None
    num_experts = num_global
    if case == "expert_map":
        num_experts = 4
        expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], device=dev, dtype=torch.int32)
    if case == "int64_ids_one_token":
        layout = row_per_block(ids, 16)  # int64 ids: the flat topk_ids are the blocks' experts
        assert layout.expert_ids.dtype == torch.int64
    else:
        layout = align(ids.int(), num_experts, 16, expert_map=expert_map)
    wdt = torch.float32 if case == "fp32_scales" else dtype
    w13 = quantize_wna16(torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=wdt) / 10, 4, 128,
                         case != "fp16_sym" and case != "k384_split2")
    w2 = quantize_wna16(torch.randn(num_experts, hidden, inter, device=dev, dtype=wdt) / 10, 4, 128, True)
    x = torch.randn(num_tokens, hidden, device=dev, dtype=dtype) / 10
    num_rows = ids.numel()
    cfg2 = replace(DECODE, block_n=64, split_k=split)
    for w, cfg, k_dim, n_out, act in ((w13, DECODE, hidden, inter, SILU), (w2, cfg2, inter, hidden, None)):
        assert gluon_unsupported(x, w.qweight, _as_words(w.qweight), 4, False, 128, k_dim, n_out, layout, cfg, act,
                                 w.scales, w.zeros) is None
    kw1 = dict(num_rows=num_rows, a_row_div=top_k, activation=SILU)
    a = torch.zeros(num_rows, inter, device=dev, dtype=dtype)  # rows of other ranks' experts stay unwritten: 0
    grouped_gemm_wna16(x, w13, layout, a, DECODE, **kw1)
    want_a = grouped_gemm_wna16_ref(x, w13, layout, torch.zeros(num_rows, inter, device=dev), **kw1)
    assert_close(a, want_a, dtype, name="gemm1")
    if case == "k384_split2":  # GEMM 1 of K = 384 in two splits too (no activation: split partials)
        y1 = torch.full((2, num_rows, 2 * inter), float("nan"), device=dev)
        grouped_gemm_wna16(x, w13, layout, y1, replace(DECODE, split_k=2), num_rows=num_rows, a_row_div=top_k)
        want1 = grouped_gemm_wna16_ref(x, w13, layout, torch.empty(num_rows, 2 * inter, device=dev),
                                       num_rows=num_rows, a_row_div=top_k)
        assert_close(y1.sum(0), want1, torch.float16, name="gemm1 split")
    weights = torch.rand(num_rows, device=dev)
    y = torch.zeros((split, num_rows, hidden), device=dev)
    grouped_gemm_wna16(a, w2, layout, y, cfg2, num_rows=num_rows, weights_N=weights)
    want_y = grouped_gemm_wna16_ref(a, w2, layout, torch.zeros(num_rows, hidden, device=dev), num_rows=num_rows,
                                    weights_N=weights)
    assert_close(y.sum(0), want_y, torch.float16, name="gemm2")
