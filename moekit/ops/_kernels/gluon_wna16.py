"""Gluon body of ``moekit.ops.gluon_wna16``: the decode tiles of ``grouped_gemm_wna16`` for 4-bit codes (integer, or
mxfp4's e2m1) on Hopper (sm_90), with the wgmmas that read the dequantized weights from registers left in flight.

Why Gluon: Triton 3.6 waits for every wgmma whose A operand is in registers before it builds the next one, so the
tensor cores, the integer units and the loads take turns ("dequant_pairs"); here each wgmma is waited on with one
group outstanding. Measured on an H200 (docs/perf/NOTES.md, "4-bit decode in Gluon"): mixtral's decode GEMMs
1.5-2.4x faster than "dequant_pairs".

One program: row block ``i_m`` of the padded layout (BM slots of one expert) x BN weight rows (gated: OUT_N gate
rows, then the OUT_N up rows of the same outputs) x one K split. Swapped: acc^T [BN, BM] = W [BN, K] · A^T.
- A K step of 128 columns is four pieces r = 0..3: piece r is the weight columns {8w + r, 8w + r + 4 : w < 16} --
  nibbles r and r + 4 of a row's 16 int32 words, the two halves of each word -- in (w, h) order. One shift and
  one ``lop3`` make the packed pair (128 + q, 128 + q') in bf16 (1024 + q in fp16), one HADD2 subtracts
  (128 + z) exactly: the pieces hold the small integers q - z.
- The words are loaded from shared memory in ``_word_layout``, element for element the register layout of
  wgmma's A operand for the [BN, 32] piece (asserted: ``convert_layout(assert_trivial=True)``), so no tile goes
  through shared memory. A's columns come in the same piece order from ``gather_pieces`` ([K / 32, P, 32]: a
  piece's activations are one whole [BM, 32] plane of a TMA stage).
- A group's pieces accumulate into their own fp32 product, scaled into the accumulator (one FMA an element) once
  the group is done, while the next group's first wgmma runs. The weights are never rounded to the activations'
  dtype (the Triton variants round W = (q - z)·s first): closer to the exact product, not bit-equal to them.
E2M1 (mxfp4 codes, bf16 activations): the same words and pieces; the packed pair of a piece is the e2m1 pair with
its sign at bit 15 and its three magnitude bits at bf16's exponent/mantissa boundary (bits 6-8), i.e. e2m1 · 2^-126,
times the bf16 power of two 2^(E - M + 127) for the group's e8m0 byte E, M the largest of the row's four bytes in
the step (a word's eight codes lie in one group of 32, a step's four groups are a thread's four words of the row:
the bytes are loaded in the words' layout, a step ahead). The piece then holds e2m1 · 2^(E - M + 1), exactly
(normal bf16 down to groups 2^-126 below the row's largest), and the step's product is scaled by 2^(M - 128) in
fp32 like an integer group's. One multiply a pair; the weights are never rounded.
Loads: TMA stages of the code words ([BN, BK / 8] int32, gated: two boxes) and of A, S - 1 ahead. A K that is
not a multiple of BK: the last step's boxes run past the rows' ends and TMA fills zeros (A's gather pads with zeros
too), so the tail adds nothing.
Epilogue: the activation (gated: act(gate)·up), the routing weight, stores to the slots' routed rows (split-K:
partial sums, as ``grouped_gemm``).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

# ACTIVATION codes: ``moekit.ops.activation.activation_code`` (0 none, 1 silu, 2 gelu, 3 gelu_tanh, 5 swigluoai,
# 6 clamped silu; the launcher sends relu2 to the Triton kernel).


@gluon.constexpr_function
def _word_layout(BN, WG):
    """[BN, 16] int32 words of one 128-column step, WG warpgroups. wgmma's A fragment of a [64, 32] 16-bit piece:
    lane (g, t) = (lane // 4, lane % 4) holds rows g and g + 8 of its warp's 16 and k pairs (2t, 2t + 1),
    (2t + 8, 2t + 9) of each 16-wide k chunk; with k = 2w + h those are words t, t + 4, t + 8, t + 12. So:
    registers (row + 8, w + 4, w + 8), lanes (w + 1, w + 2, row + 1, row + 2, row + 4), warps (row + 16,
    row + 32, then + 64 a warpgroup), and rows past 64·WG repeat in registers (wgmma's M repeats)."""
    reg = [[8, 0], [0, 4], [0, 8]]
    for i in range((BN // (64 * WG)).bit_length() - 1):
        reg.append([64 * WG * (1 << i), 0])
    warps = [[16, 0], [32, 0]] + [[64 * (1 << i), 0] for i in range((WG - 1).bit_length())]
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=warps, block_bases=[], shape=[BN, 16])


@gluon.jit
def _piece(words, z2, R: gl.constexpr, BN: gl.constexpr, FP16: gl.constexpr):
    """Piece R as a 16-bit [BN, 32] tile: element (n, 2w + h) = nibble R + 4h of word (n, w) minus its zero point.
    Each asm call gets its word twice (h = 0, 1: adjacent registers) and the row's (base + z) pair, and emits the
    packed pair: shift, and-or into the mantissa of the base (``lop3`` 0xea = (a & b) | c), subtract."""
    x = gl.reshape(gl.join(words, words), [BN, 32])
    z = gl.reshape(gl.join(z2, z2), [BN, 32])
    SH: gl.constexpr = f"shr.u32 t, $1, {4 * R}; " if R > 0 else "mov.b32 t, $1; "
    if FP16:  # 1024 + q: fp16's unit step at 1024
        asm: gl.constexpr = ("{ .reg .b32 t; " + SH + "lop3.b32 t, t, 0x000F000F, 0x64006400, 0xea; "
                             "sub.f16x2 $0, t, $3; }")
        return gl.inline_asm_elementwise(asm, "=r,r,r,r,r", [x, z], dtype=gl.float16, is_pure=True, pack=2)
    else:  # 128 + q: bf16's unit step at 128
        asm: gl.constexpr = ("{ .reg .b32 t; " + SH + "lop3.b32 t, t, 0x000F000F, 0x43004300, 0xea; "
                             "sub.rn.bf16x2 $0, t, $3; }")
        return gl.inline_asm_elementwise(asm, "=r,r,r,r,r", [x, z], dtype=gl.bfloat16, is_pure=True, pack=2)


@gluon.jit
def _piece_e2m1(words, m, R: gl.constexpr, BN: gl.constexpr):
    """E2M1 piece R as a bf16 [BN, 32] tile: element (n, 2w + h) = the e2m1 code of nibble R + 4h of word (n, w)
    times the packed bf16 pair ``m`` of its word (``_e2m1_step``): sign to bit 15, magnitude to bits 6-8 (e2m1 ·
    2^-126; 0.5 is the bf16 subnormal 2^-127), one exact multiply."""
    x = gl.reshape(gl.join(words, words), [BN, 32])
    p = gl.reshape(gl.join(m, m), [BN, 32])
    # Nibble R's magnitude (bits 4R..4R+2) moves by 6 - 4R, its sign (bit 4R + 3) by 12 - 4R: each straight from
    # the word (nibble R + 4 of the high half moves with it), so R = 3's sign needs no shift at all.
    MAG: gl.constexpr = (f"shl.b32 u, $1, {6 - 4 * R}; " if R < 2 else f"shr.u32 u, $1, {4 * R - 6}; ")
    SIGN: gl.constexpr = (f"shl.b32 v, $1, {12 - 4 * R}; and.b32 v, v, 0x80008000; " if R < 3
                          else "and.b32 v, $1, 0x80008000; ")
    asm: gl.constexpr = ("{ .reg .b32 t, u, v; " + MAG + SIGN + "lop3.b32 t, u, 0x01C001C0, v, 0xea; "
                         "mul.rn.bf16x2 $0, t, $3; }")
    return gl.inline_asm_elementwise(asm, "=r,r,r,r,r", [x, p], dtype=gl.bfloat16, is_pure=True, pack=2)


@gluon.jit
def _e2m1_step(e):
    """(the packed bf16 pairs 2^(E - M + 127) [BN, 16], the fp32 factor 2^(M - 128) [BN]) of a step's e8m0 bytes
    ``e`` (int32, words' layout), M = the row's largest. The pair's exponent field E - M + 254 is >= 0 for any
    bytes (0 is a zero factor: a group 2^254 below its row's); 2^(M - 128) for M = 0 and 1 is an fp32 subnormal
    (2^-128, 2^-127). Byte 255 (NaN in the OCP MX spec, refused at load) is not NaN here: the layer never passes it."""
    emax = gl.max(e, axis=1)
    f = gl.maximum(e + (254 - emax)[:, None], 0)
    post = gl.where(emax > 1, (emax - 1) << 23, 1 << (emax + 21)).to(gl.float32, bitcast=True)
    return f * 0x00800080, post  # (f << 7) | (f << 23): the field in both halves, one multiply


@gluon.jit
def _refill(w_desc, a_desc, w_bufs, a_bufs, ready, i, num_k, k0, w_row0, w_row1, a_row0,
            OUT_N: gl.constexpr, BK: gl.constexpr, GATED: gl.constexpr, STEP_BYTES: gl.constexpr):
    """The program's K step i (if i < num_k) into stage i % S: the weight rows' words (gated: gate rows at
    ``w_row0``, up rows at ``w_row1``) and A's [BK / 32, BM, 32] box."""
    s = i % w_bufs.shape[0]
    pred = i < num_k
    k = k0 + i * BK
    mbarrier.expect(ready.index(s), STEP_BYTES, pred=pred)
    w_s = w_bufs.index(s)
    tma.async_copy_global_to_shared(w_desc, [w_row0, k // 8], ready.index(s), w_s.slice(0, OUT_N, dim=0), pred=pred)
    if GATED:
        tma.async_copy_global_to_shared(w_desc, [w_row1, k // 8], ready.index(s), w_s.slice(OUT_N, OUT_N, dim=0),
                                        pred=pred)
    tma.async_copy_global_to_shared(a_desc, [k // 32, a_row0, 0], ready.index(s), a_bufs.index(s), pred=pred)


@gluon.jit
def _activate(gate, up, alpha, limit, ACTIVATION: gl.constexpr):
    """act(gate) · up in fp32 (``grouped_gemm``'s codes 0-3, 5 swigluoai, 6 clamped silu; ``up`` unused for 0).
    The clamps keep NaN (a comparison with NaN is false), as ``torch.clamp`` does."""
    if ACTIVATION == 5 or ACTIVATION == 6:
        g = gl.where(gate > limit, limit, gate)
        u = gl.where(up > limit, limit, gl.where(up < -limit, -limit, up))
        if ACTIVATION == 5:
            return g / (1.0 + gl.exp(-alpha * g)) * (u + 1.0)
        return g / (1.0 + gl.exp(-g)) * u
    elif ACTIVATION == 0:
        return gate
    elif ACTIVATION == 1:
        return gate / (1.0 + gl.exp(-gate)) * up
    elif ACTIVATION == 2:
        return 0.5 * gate * (1.0 + gl.erf(gate * 0.7071067811865476)) * up
    else:
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        return gate / (1.0 + gl.exp(-2.0 * z)) * up


@gluon.jit(do_not_specialize=["num_rows"])  # T·K changes every call: no recompiles at 1 or multiples of 16
def gluon_wna16_kernel(
    w_desc, a_desc, p_s, p_z, p_c, p_bias, p_weights, p_sorted_ids, p_expert_ids, p_num_padded,
    num_rows, n_b, up_offset, k_per_split, group_size,
    stride_se, stride_sn, stride_ze, stride_zn, stride_cs, stride_cm, stride_bias_e, alpha, limit,
    K: gl.constexpr, BM: gl.constexpr, OUT_N: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, WG: gl.constexpr,
    GATED: gl.constexpr, ACTIVATION: gl.constexpr, HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr,
    HAS_WEIGHTS: gl.constexpr, ROW_PER_BLOCK: gl.constexpr, FP16: gl.constexpr, E2M1: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Grid (row blocks x output tiles of OUT_N, splits). ``w_desc``: the code words of all experts [E·n_b, K / 8]
    int32, blocks [OUT_N, BK / 8]; ``a_desc``: ``gather_pieces``' [⌈K / 128⌉ · 4, P, 32], blocks [BK / 32, BM, 32].
    E2M1: ``p_s`` the e8m0 bytes [E, n_b, K / 32] (BK = 128)."""
    R: gl.constexpr = 2 if GATED else 1
    BN: gl.constexpr = R * OUT_N
    GS: gl.constexpr = BK // 128  # 128-column steps a stage
    n_out = up_offset if GATED else n_b
    num_n = n_out // OUT_N
    i_m = gl.program_id(0) // num_n
    i_n = gl.program_id(0) % num_n
    i_e = gl.load(p_expert_ids + i_m).to(gl.int32)  # flat int64 topk_ids at one token: TMA coordinates are i32
    live = i_e >= 0  # -1: past the padded slots, or (one row a block) a row routed to another rank's expert
    if not ROW_PER_BLOCK:
        live = live & (i_m * BM < gl.load(p_num_padded))
    # A dead block runs no K step (every load predicated off) and stores nothing: no branch around the body.
    k0 = gl.program_id(1) * k_per_split
    num_k = gl.where(live, gl.cdiv(gl.minimum(k_per_split, K - k0), BK), 0)
    i_e = gl.maximum(i_e, 0)
    w_row0 = i_e * n_b + i_n * OUT_N
    w_row1 = i_e * n_b + up_offset + i_n * OUT_N

    w_bufs = gl.allocate_shared_memory(gl.int32, [S, BN, BK // 8], w_desc.layout)
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [S, BK // 32, BM, 32], a_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(S):
        mbarrier.init(ready.index(st), count=1)
    STEP_BYTES: gl.constexpr = BN * BK // 2 + BM * BK * 2
    for i in gl.static_range(S - 1):
        _refill(w_desc, a_desc, w_bufs, a_bufs, ready, i, num_k, k0, w_row0, w_row1, i_m * BM,
                OUT_N, BK, GATED, STEP_BYTES)

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * WG, 1],
                                                         instr_shape=[16, BM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    wl: gl.constexpr = _word_layout(BN, WG)
    # Weight row (of expert i_e) of each tile row, in the words' and the accumulator's layouts.
    t_w = gl.arange(0, BN, layout=gl.SliceLayout(1, wl))
    t_c = gl.arange(0, BN, layout=gl.SliceLayout(1, mma_layout))
    n_w = gl.where(t_w < OUT_N, i_n * OUT_N + t_w, up_offset + i_n * OUT_N + t_w - OUT_N)
    n_c = gl.where(t_c < OUT_N, i_n * OUT_N + t_c, up_offset + i_n * OUT_N + t_c - OUT_N)
    p_s_rows = p_s + i_e.to(gl.int64) * stride_se + n_c.to(gl.int64) * stride_sn
    p_z_rows = p_z + i_e.to(gl.int64) * stride_ze + n_w.to(gl.int64) * stride_zn
    BASE: gl.constexpr = 1024 if FP16 else 128
    HI: gl.constexpr = 0x6400 if FP16 else 0x4300  # the bits of BASE
    z_bits = gl.full([BN], HI + 8, gl.int32, layout=gl.SliceLayout(1, wl))  # BASE + 8: symmetric codes
    z2 = gl.zeros([BN, 16], gl.int32, layout=wl) + (z_bits | (z_bits << 16))[:, None]
    if E2M1:
        # Word w of a step lies in group k / 32 + w // 4; the bytes of step i + 1 are loaded during step i.
        p_e_rows = p_s + i_e.to(gl.int64) * stride_se + n_w.to(gl.int64) * stride_sn
        w_grp = gl.arange(0, 16, layout=gl.SliceLayout(0, wl)) // 4
        e_next = _e8m0_step(p_e_rows, w_grp, k0, 0, K)

    acc = gl.zeros([BN, BM], gl.float32, layout=mma_layout)
    zero = gl.zeros([BN, BM], gl.float32, layout=mma_layout)
    for i in range(num_k):
        s = i % S
        mbarrier.wait(ready.index(s), (i // S) & 1)
        words_s = w_bufs.index(s)
        a_s = a_bufs.index(s).reshape([BK // 32 * BM, 32])
        if E2M1:  # BK = 128: one step a stage
            m_e, post = _e2m1_step(e_next)
            # The rows of the words' layout are the accumulator's (wgmma's A rows are its C rows).
            post = gl.convert_layout(post, gl.SliceLayout(1, mma_layout), assert_trivial=True)
            e_next = _e8m0_step(p_e_rows, w_grp, k0, i + 1, K)
        for g in gl.static_range(GS):
            if E2M1:
                s_g = post
            else:
                i_grp = (k0 + i * BK + 128 * g) // group_size
                s_g = gl.load(p_s_rows + i_grp).to(gl.float32)
            if HAS_ZEROS:  # BASE + z as the subtrahend pair (exact: small integers)
                z_g = gl.load(p_z_rows + i_grp).to(gl.int32)
                zb = (z_g + BASE).to(gl.float16 if FP16 else gl.bfloat16).to(gl.int16, bitcast=True)
                zb = zb.to(gl.int32) & 0xFFFF
                z2 = gl.zeros([BN, 16], gl.int32, layout=wl) + (zb | (zb << 16))[:, None]
            words = words_s.slice(16 * g, 16, dim=1).load(wl)
            for r in gl.static_range(4):
                if E2M1:
                    b_q = gl.convert_layout(_piece_e2m1(words, m_e, r, BN), op_layout, assert_trivial=True)
                else:
                    b_q = gl.convert_layout(_piece(words, z2, r, BN, FP16), op_layout, assert_trivial=True)
                a_op = a_s.slice((4 * g + r) * BM, BM, dim=0).permute((1, 0))
                if r == 0:
                    prod = warpgroup_mma(b_q, a_op, zero, use_acc=False, is_async=True)
                else:
                    prod = warpgroup_mma(b_q, a_op, prod, is_async=True)
                if r == 0 and g > 0:
                    # The previous group's product is complete (only this wgmma is in flight): scale it in.
                    prod, prev, b_q = warpgroup_mma_wait(num_outstanding=1, deps=(prod, prev, b_q))
                    acc += prev * s_prev[:, None]
                else:
                    prod, b_q = warpgroup_mma_wait(num_outstanding=1, deps=(prod, b_q))
                if g == 0 and r == 0:
                    # Step i - 1's wgmmas are done (only this one is in flight) and every warp is past its
                    # reads of that stage: refill it with step i - 1 + S.
                    gl.thread_barrier()
                    _refill(w_desc, a_desc, w_bufs, a_bufs, ready, i - 1 + S, num_k, k0, w_row0, w_row1,
                            i_m * BM, OUT_N, BK, GATED, STEP_BYTES)
            prev = prod
            s_prev = s_g
        prev = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
        acc += prev * s_prev[:, None]
    for st in gl.static_range(S):
        mbarrier.invalidate(ready.index(st))

    if HAS_BIAS:  # once, in split 0
        p_b_rows = p_bias + i_e.to(gl.int64) * stride_bias_e + n_c
        acc += gl.load(p_b_rows, mask=(t_c >= 0) & (gl.program_id(1) == 0), other=0.0).to(gl.float32)[:, None]
    # Epilogue: columns are slots; their routed rows, and which are real.
    o_m = gl.arange(0, BM, layout=gl.SliceLayout(0, mma_layout))
    if ROW_PER_BLOCK:
        rows = gl.where(o_m == 0, i_m, num_rows)
    else:
        rows = gl.load(p_sorted_ids + i_m * BM + o_m)
    m_rows = (rows < num_rows) & live
    if GATED:
        gate, up = gl.split(gl.permute(gl.reshape(acc, [2, OUT_N, BM]), [1, 2, 0]))
        out = _activate(gate, up, alpha, limit, ACTIVATION)
    else:
        out = _activate(acc, acc, alpha, limit, ACTIVATION)
    out_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [num_warps, 1], [0, 1])
    out = gl.convert_layout(out, out_layout)
    o_rows = gl.convert_layout(rows, gl.SliceLayout(0, out_layout))
    m_out = gl.convert_layout(m_rows, gl.SliceLayout(0, out_layout))
    if HAS_WEIGHTS:
        out = out * gl.load(p_weights + o_rows, mask=m_out, other=0.0).to(gl.float32)[None, :]
    o_n = i_n * OUT_N + gl.arange(0, OUT_N, layout=gl.SliceLayout(1, out_layout))
    p_out = p_c + gl.program_id(1) * stride_cs + o_rows.to(gl.int64)[None, :] * stride_cm + o_n[:, None]
    gl.store(p_out, out.to(p_c.dtype.element_ty), mask=m_out[None, :])


@gluon.jit
def _e8m0_step(p_e_rows, w_grp, k0, j, K: gl.constexpr):
    """The e8m0 bytes (int32) of the 128 columns from k0 + 128·j in the words' layout: row pointers ``p_e_rows``,
    word w in group w // 4 (``w_grp``) of the step. Groups past K's end read the row's last group again (its codes
    there are zeros, and a repeated byte never raises the row's largest): every load is in bounds, unmasked. The
    step after a split's last (loaded a step ahead) is read and never used."""
    grp = gl.minimum((k0 + j * 128) // 32 + w_grp, K // 32 - 1)
    return gl.load(p_e_rows[:, None] + grp[None, :]).to(gl.int32)
