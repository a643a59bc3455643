"""Triton body of ``moekit.ops.grouped_gemm_wna16``: the grouped GEMM on 4-/8-bit weight codes with group scales,
activations in their float dtype.

A sibling of ``grouped_gemm_kernel`` (same row layout, grid order, gate|up tile, half tail and epilogue). Each
K tile of BLOCK_K columns runs as BLOCK_K / SUB_K sub-tiles that each lie in one scale group (the wrapper picks
SUB_K: BLOCK_K when a group holds the whole tile, else the group size). For weight row n = ``o_bn`` of the tile,
a sub-tile holds the codes q of columns [k, k + SUB_K) (4 bits: SUB_K/2 bytes, low nibble = even column), its
group's scale s[n] and zero point z[n] (2^(bits-1) for symmetric codes). VARIANT says how it is multiplied:

- "postscale": part = dot(a, (q - z).to(a.dtype)); acc += part * s[n]. The dot's inputs are exact and the scale
  costs BLOCK_M·BLOCK_N multiplies a sub-tile; at 4 bits A's sub-tile is split into its even and odd columns
  and the product is two dots of SUB_K/2 (the shuffle touches A, never the weight tile). Each sub-tile waits on
  its dot before the scaling FMA: the tensor cores and the scaling do not overlap.
- "dequant": w = ((q - z) · s[n]).to(a.dtype) in registers, then acc = dot(a, w, acc): one dot a sub-tile into
  the running accumulator, which Triton pipelines like a bf16 GEMM (Marlin's approach). The weights are rounded
  once to a.dtype, as a dequantized bf16 weight would be. WORDS (4 bits, fp16/bf16): the codes are read as
  int32 words and two codes become two 16-bit floats in one mask-and-OR (``_words_minus_zero``; the sm_90 SASS
  of a 64 x 128 tile has ~40% fewer integer ops than from bytes); else bytes, nibbles interleaved back into k
  order (the launcher's "dequant_bytes" forces this). SPLIT (4 bits, the launcher's "dequant_split"): no
  interleave; the low and high nibbles make two tiles of SUB_K/2 columns, multiplied by A's even and odd columns
  in two dots (the byte permutes of the interleave were the loop's most frequent instruction on sm_90).
- SWAP (with "dequant"): the same products as acc^T = dot(w, a^T): the dequantized weight tile is the MMA's
  first operand, which Hopper's wgmma takes from registers (no trip through shared memory), and the rows of A are
  its second, so a decode tile of 16 rows is the MMA's N (wgmma needs M >= 64 a warpgroup: unswapped, a 16-row
  tile runs on the older mma.sync).
- PAIRS (4-bit codes as int32 words, fp16/bf16, swapped; the launcher's "dequant_pairs"): nibbles r and r + 4 of a
  word (columns 8w + r and 8w + r + 4) sit in its two 16-bit halves, so a permute, one shift and one and-or give
  both as a packed pair of 16-bit floats (``_nibble_pairs``). The sub-tile is four dots, one per r, each over the columns
  {8w + r, 8w + r + 4} of the weight row in (w, h) order and the same columns of A (split out of A's tile in
  registers: A is the small operand at decode). Every op between the word load and the dot is elementwise, so
  the compiler moves the *word* tile into wgmma's register-operand layout (the codes cross shared memory once,
  half a byte a weight) and never stores a dequantized tile; no byte permutes (the interleaves of "dequant").
  OPAQUE_ZEROS: the loaded zero points pass through a non-pure asm identity first. Triton 3.6 mis-compiles the
  pairs with loaded zero points where the dot runs on mma.sync instead of wgmma (on an H200: a tile of 32 weight
  rows on 4 warps; wgmma needs a multiple of 64 rows on whole warpgroups; relative error ~1 against the reference, fp16 and bf16, any stage count; constant zero points,
  wgmma tiles and the interpreter are right). The identity keeps the compiler from moving the zero points' chain,
  which fixes it, but costs an asym layer 9-14% where wgmma runs (H200, mixtral/deepseek-v3/qwen3 at T = 4-64),
  so the launcher asks for it only off wgmma.
- "gemv": no tensor cores: acc[n] += s[n] · Σ_k (q - z)·a[k] in fp32 FMAs, one routed row a tile, for decode
  where a block holds one routed row (ROW_PER_BLOCK) or a few: the weight stream is the whole cost and a
  tensor-core tile of 16 padded rows only adds work. 4-bit codes are read as int32 words (any activation dtype)
  where the rows allow. Each thread sums the products of its own 16 loaded bytes per sub-tile; the sum across
  threads waits for the end of the K loop.

E2M1 (mxfp4: codes are e2m1 nibbles, scales e8m0 bytes, groups of 32, no zero points): each code's value is
built from its bits in fp32 (``_e2m1_f32``) and times the group's 2^(s − 127) (``_e8m0_f32``, built from the
exponent bits); "dequant" rounds that product to a's dtype (always from bytes: the int32-word trick is for
integer codes; bf16 builds the same bits in 16-bit ops, ``_mxfp4_weights_bf16``), "postscale" and "gemv" multiply
the exact e2m1 values and scale in fp32.

Codes become floats by the exponent trick rather than an int -> float conversion (a quarter of the FMA rate on
Hopper): the code OR-ed into the mantissa of a power of two (1024 in fp16, 128 in bf16, 2^23 in fp32) is exactly
that power plus the code, and one subtraction of (power + z) leaves q - z exactly.
Names: ``i_`` index, ``o_`` offset vector, ``m_`` mask, ``p_`` pointer, ``b_`` register block.
"""

import triton
import triton.language as tl

from moekit.ops._kernels.grouped_gemm import _epilogue, _program_tile, _rows_and_columns


@triton.jit
def _load_sub_tile(
    p_a_sub, p_b_sub, p_s_cols, p_z_cols, m_rows, k_sub, k_end, group_size, stride_sk, stride_zk,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, SUB_K: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr,
    PACK: tl.constexpr,
):
    """A [TILE_M, SUB_K], the codes [BLOCK_N, SUB_K / PACK] (PACK codes an element: uint8 bytes or int32 words,
    a weight row's elements contiguous: wide loads), the group's scales [BLOCK_N] and zero points [BLOCK_N]
    (int32) of the sub-tile at column ``k_sub``."""
    SUB_B: tl.constexpr = SUB_K // PACK
    if EVEN_K:
        i_g = k_sub // group_size
        b_a = tl.load(p_a_sub, mask=m_rows[:, None], other=0.0)
        b_q = tl.load(p_b_sub)
    else:
        m_k = (k_sub + tl.arange(0, SUB_K)) < k_end
        # An element is read while its first column is in range; columns past k_end meet zeros of A.
        m_b = (k_sub // PACK + tl.arange(0, SUB_B)) < (k_end + PACK - 1) // PACK
        # A sub-tile wholly past the end (its A is all zeros) reads the last group's scale: its own group may not
        # exist.
        i_g = min(k_sub, k_end - 1) // group_size
        b_a = tl.load(p_a_sub, mask=m_rows[:, None] & m_k[None, :], other=0.0)
        b_q = tl.load(p_b_sub, mask=m_b[None, :], other=0)
    b_s = tl.load(p_s_cols + i_g * stride_sk)
    if HAS_ZEROS:
        b_z = tl.load(p_z_cols + i_g * stride_zk).to(tl.int32)
    else:
        b_z = tl.full([BLOCK_N], 1 << (BITS - 1), tl.int32)
    return b_a, b_q, b_s, b_z


@triton.jit
def _codes_minus_zero(b_c, b_z, DTYPE: tl.constexpr, BITS: tl.constexpr):
    """(codes [BLOCK_N, K] uint8 - zero points [BLOCK_N]) exactly, in DTYPE (module docstring: exponent trick)."""
    if DTYPE == tl.float16:  # 1024 + c, c < 256: exact (10 mantissa bits)
        b_f = (b_c.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
        return b_f - (b_z + 1024).to(tl.float16)[:, None]
    elif DTYPE == tl.float32:  # 2^23 + c
        b_f = (b_c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
        return b_f - (b_z + 8388608).to(tl.float32)[:, None]
    elif BITS == 4:  # bf16: 128 + c, exact for c < 128 (7 mantissa bits)
        b_f = (b_c.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
        return b_f - (b_z + 128).to(tl.bfloat16)[:, None]
    else:  # 8-bit codes do not fit bf16's mantissa above 128: convert
        return (b_c.to(tl.int32) - b_z[:, None]).to(DTYPE)


@triton.jit
def _words_minus_zero(b_w, b_z, DTYPE: tl.constexpr):
    """4-bit codes as int32 words [BLOCK_N, W] (nibble i of word w = column 8w + i) -> (codes - zero points)
    [BLOCK_N, 8W] exactly, in fp16 or bf16. Marlin's trick: one mask-and-OR makes two 16-bit floats at once
    (nibbles s and s + 4, in the word's two halves), 7 integer ops a word instead of a few a code."""
    MAGIC: tl.constexpr = 0x64006400 if DTYPE == tl.float16 else 0x43004300  # 1024 | 128 in both halves
    POWER: tl.constexpr = 1024 if DTYPE == tl.float16 else 128
    b_v0 = (b_w & 0x000F000F) | MAGIC
    b_v1 = ((b_w >> 4) & 0x000F000F) | MAGIC
    b_v2 = ((b_w >> 8) & 0x000F000F) | MAGIC
    b_v3 = ((b_w >> 12) & 0x000F000F) | MAGIC  # arithmetic shifts: sign bits never reach bits 0-3, 16-19
    # Columns 8w + t, t = 4·b2 + 2·b1 + b0: join the most significant bit first so the flat order is t.
    b_j0 = tl.join(_half(b_v0, 0, DTYPE), _half(b_v0, 1, DTYPE))  # t = 0, 4
    b_j1 = tl.join(_half(b_v1, 0, DTYPE), _half(b_v1, 1, DTYPE))  # t = 1, 5
    b_j2 = tl.join(_half(b_v2, 0, DTYPE), _half(b_v2, 1, DTYPE))  # t = 2, 6
    b_j3 = tl.join(_half(b_v3, 0, DTYPE), _half(b_v3, 1, DTYPE))  # t = 3, 7
    b_f = tl.join(tl.join(b_j0, b_j2), tl.join(b_j1, b_j3))
    BLOCK_N: tl.constexpr = b_w.shape[0]
    W: tl.constexpr = b_w.shape[1]
    b_f = tl.reshape(b_f, [BLOCK_N, 8 * W])
    return b_f - (b_z + POWER).to(DTYPE)[:, None]


@triton.jit
def _nibble_pairs(b_x, SHIFT: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """Codes [BLOCK_N, 2W] of a words tile joined with its high halves (column 2w: word w, 2w + 1: word w >> 16):
    each element's low 16 bits, shifted right by SHIFT, masked to a nibble and OR-ed into the mantissa of POWER
    (1024 in fp16, 128 in bf16): exactly POWER + nibble SHIFT/4 + 4h of word w. Every element depends on its own
    input only, so the result is right whichever two elements Triton hands one asm call.
    ASM (CUDA): two elements an asm call, packed as the two 16-bit halves of one register: a byte permute joins
    their low halves (for the pair (2w, 2w + 1) of one word that is the word itself), then one shift and one
    and-or (``lop3``) make both values. Else (the CPU interpreter has no inline asm): the same bits per element."""
    MAGIC: tl.constexpr = 0x64006400 if DTYPE == tl.float16 else 0x43004300
    if ASM:
        return tl.inline_asm_elementwise(
            f"{{ .reg .b32 t; prmt.b32 t, $1, $2, 0x5410; shr.u32 t, t, {SHIFT}; "
            f"lop3.b32 $0, t, 0x000F000F, {MAGIC}, 0xea; }}",
            "=r,r,r", [b_x], dtype=tl.float16 if DTYPE == tl.float16 else tl.bfloat16, is_pure=True, pack=2)
    b_v = ((b_x >> SHIFT) & 15) | (MAGIC & 0xFFFF)
    return b_v.to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def _opaque(b_v):
    """``b_v`` (int32) unchanged, through an asm call the compiler may not move or merge (CUDA only). See
    OPAQUE_ZEROS in the module docstring."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [b_v], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _pairs_dot(b_x, b_a, b_off, b_sc, b_acc_t, R: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """acc^T += w_R · a_R^T for piece R of a PAIRS sub-tile: w_R [BLOCK_N, 2W] the weight columns 8w + R + 4h in
    (w, h) order (``_nibble_pairs`` minus POWER + z, times the group scale: rounded once, as "dequant"), a_R
    [TILE_M, 2W] the same columns of A."""
    b_w = (_nibble_pairs(b_x, 4 * R, DTYPE, ASM) - b_off) * b_sc
    return tl.dot(b_w, tl.trans(b_a), b_acc_t, input_precision=DOT_PRECISION)


@triton.jit
def _gemv_words(b_w, b_z, b_a):
    """Σ_t (nibble t of b_w - z) · a[w, t] per word: codes [BLOCK_N, W] int32, zero points [BLOCK_N], fp32
    activations [W, 8] -> fp32 [BLOCK_N, W]. Each code becomes 2^23 + q by a shift and a mask-and-OR.
    (Masking each nibble in place instead, with a power-of-two scale moved onto a, compiled to as many
    instructions on sm_90: the mask and the 2^23 pattern cannot both be immediates.)"""
    W: tl.constexpr = b_w.shape[1]
    # a[w, t], t = 4·b2 + 2·b1 + b0: split off b0, then b1, then b2.
    b_a0, b_a1 = tl.split(tl.reshape(b_a, [W, 2, 2, 2]))  # [W, 2 (b2), 2 (b1)] each
    b_a00, b_a10 = tl.split(b_a0)  # t = 0 + {0, 4}, 2 + {0, 4}
    b_a01, b_a11 = tl.split(b_a1)  # t = 1 + {0, 4}, 3 + {0, 4}
    b_a0, b_a4 = tl.split(b_a00)
    b_a2, b_a6 = tl.split(b_a10)
    b_a1, b_a5 = tl.split(b_a01)
    b_a3, b_a7 = tl.split(b_a11)
    b_off = (b_z + 8388608).to(tl.float32)[:, None]
    b_t = _nibble_f32(b_w, 0, b_off) * b_a0[None, :]
    b_t += _nibble_f32(b_w, 1, b_off) * b_a1[None, :]
    b_t += _nibble_f32(b_w, 2, b_off) * b_a2[None, :]
    b_t += _nibble_f32(b_w, 3, b_off) * b_a3[None, :]
    b_t += _nibble_f32(b_w, 4, b_off) * b_a4[None, :]
    b_t += _nibble_f32(b_w, 5, b_off) * b_a5[None, :]
    b_t += _nibble_f32(b_w, 6, b_off) * b_a6[None, :]
    b_t += _nibble_f32(b_w, 7, b_off) * b_a7[None, :]
    return b_t


@triton.jit
def _nibble_f32(b_w, T: tl.constexpr, b_off):
    """Nibble T of each int32 word as fp32, minus ``b_off`` (2^23 + zero point): exact. The sign bits an
    arithmetic shift brings in are masked off."""
    b_v = ((b_w >> (4 * T)) & 15) | 0x4B000000
    return b_v.to(tl.float32, bitcast=True) - b_off


@triton.jit
def _e2m1_f32(b_c):
    """fp32 values of 4-bit e2m1 codes (any int dtype, 0..15), exactly: bit 3 is the sign, bits 2-1 the exponent
    and bit 0 the mantissa. A magnitude m = c & 7 >= 2 is 2^((m >> 1) - 1) · (1 + (m & 1) / 2), whose fp32 bits
    are (m << 22) + (126 << 23) (exponent and mantissa bits land in place, the bias moves by 126); m = 1 is the
    subnormal 0.5 (126 << 23) and m = 0 is zero, which one select covers as m · (126 << 23)."""
    b_c = b_c.to(tl.int32)
    b_m = b_c & 7
    b_bits = tl.where(b_m > 1, (b_m << 22) + (126 << 23), b_m * (126 << 23))
    return (b_bits | ((b_c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_f32(b_s):
    """fp32 2^(s - 127) of e8m0 scale bytes, built from the exponent bits (s = 0: the subnormal 2^-127; 255,
    NaN in the format, is refused at load)."""
    b_s = b_s.to(tl.int32)
    return tl.where(b_s > 0, b_s << 23, 1 << 22).to(tl.float32, bitcast=True)


@triton.jit
def _scales_f32(b_s, E2M1: tl.constexpr):
    """A sub-tile's group scales [BLOCK_N] in fp32: e8m0 bytes decoded, float scales converted."""
    if E2M1:
        return _e8m0_f32(b_s)
    return b_s.to(tl.float32)


@triton.jit
def _mxfp4_weights(b_c, b_s, DTYPE: tl.constexpr):
    """Codes [BLOCK_N, K] (e2m1 nibbles) times their rows' e8m0 scales [BLOCK_N], rounded once to DTYPE: the
    product is exact in fp32 (a 2-bit significand times a power of two), so the only rounding is DTYPE's."""
    return (_e2m1_f32(b_c) * _e8m0_f32(b_s)[:, None]).to(DTYPE)


@triton.jit
def _mxfp4_weights_bf16(b_c, b_s):
    """``_mxfp4_weights`` for bf16, in 16-bit ops (the fp32 route is ~10 ops a code and cost gpt-oss 15-20% on an
    H200). Code c -> the bf16 bits (c & 8) << 12 | (c & 7) << 6: sign, exponent and mantissa bits in place, so the
    value is e2m1's times 2^-126 (its exponent bias is 1, bf16's 127; an exponent of 0 makes the subnormal that
    e2m1's 0.5 becomes). Times 2^126, times the e8m0 scale as a bf16 (bits s << 7; s = 0 is the subnormal 2^-127,
    bits 0x40): both products are exact (a 2-bit significand times powers of two), so the weight equals the fp32
    route's rounded to bf16, bit for bit, for every scale (an overflow is inf in both)."""
    b_c = b_c.to(tl.int16)
    b_v = (((b_c & 8) << 12) | ((b_c & 7) << 6)).to(tl.bfloat16, bitcast=True)
    b_s = b_s.to(tl.int16)
    b_sb = tl.where(b_s > 0, b_s << 7, 0x40).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return (b_v * 8.507059173023462e37).to(tl.bfloat16) * b_sb[:, None]  # 2^126


@triton.jit
def _half(b_v, HIGH: tl.constexpr, DTYPE: tl.constexpr):
    """The low or high 16 bits of int32 ``b_v`` as a DTYPE (fp16/bf16) value."""
    if HIGH:
        b_v = b_v >> 16
    return b_v.to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def _tile(
    p_a, p_b, p_s, p_z, p_c, p_bias, p_weights, p_sorted_ids,
    i_m, i_n, i_s, i_e, num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split, group_size,
    stride_am, stride_bn, stride_bk, stride_sn, stride_sk, stride_zn, stride_zk, stride_cs, stride_cm,
    stride_bias_e, alpha, limit,
    VARIANT: tl.constexpr, WORDS: tl.constexpr, BITS: tl.constexpr, E2M1: tl.constexpr, HAS_ZEROS: tl.constexpr,
    SUB_K: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr, PAIRS: tl.constexpr, ASM: tl.constexpr,
    OPAQUE_ZEROS: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_PER_BLOCK: tl.constexpr,
):
    """The first TILE_M slots of row block ``i_m`` against output tile ``i_n``, split ``i_s``; ``p_b``, ``p_s``
    and ``p_z`` point at expert ``i_e``'s codes, scales and zero points."""
    OUT_N: tl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
    PACK: tl.constexpr = 8 if WORDS else (2 if BITS == 4 else 1)  # codes a loaded element
    SUB_B: tl.constexpr = SUB_K // PACK  # elements of a weight row in one sub-tile
    DTYPE: tl.constexpr = p_a.dtype.element_ty
    b_rows, m_rows, o_bn = _rows_and_columns(p_sorted_ids, i_m, i_n, num_rows, n_out, up_offset, GATED, BLOCK_M,
                                             TILE_M, BLOCK_N, EVEN_N, ROW_PER_BLOCK)
    o_a_rows = (b_rows // a_row_div).to(tl.int64) * stride_am
    o_bn64 = o_bn.to(tl.int64)
    # k_per_split is a multiple of BLOCK_K (the launcher's), so a split starts on a whole byte or word; saying so
    # keeps the code loads 16 bytes wide (the compiler only knows k_per_split % 16 == 0, which the division by
    # PACK would halve to 8-byte loads).
    k_start = tl.multiple_of(i_s * k_per_split, BLOCK_K)
    k_end = min(k_start + k_per_split, k_dim)
    p_a_sub = p_a + o_a_rows[:, None] + (k_start + tl.arange(0, SUB_K))[None, :]
    k_start_e = tl.multiple_of(k_start // PACK, BLOCK_K // PACK)
    p_b_sub = p_b + o_bn64[:, None] * stride_bn + (k_start_e + tl.arange(0, SUB_B))[None, :] * stride_bk
    p_s_cols = p_s + o_bn64 * stride_sn
    p_z_cols = p_z + o_bn64 * stride_zn
    b_acc = tl.zeros([TILE_M, BLOCK_N], dtype=tl.float32)
    b_acc_t = tl.zeros([BLOCK_N, TILE_M], dtype=tl.float32)  # SWAP: the transposed accumulator
    VEC: tl.constexpr = (16 if SUB_B >= 16 else SUB_B) // (4 if WORDS else 1)  # elements of a 16-byte load
    b_acc_v = tl.zeros([BLOCK_N, SUB_B // VEC], dtype=tl.float32)  # "gemv": per-thread partial sums
    for k in range(k_start, k_end, BLOCK_K):
        for j in tl.static_range(BLOCK_K // SUB_K):
            b_a, b_q, b_s, b_z = _load_sub_tile(
                p_a_sub + j * SUB_K, p_b_sub + j * SUB_B * stride_bk, p_s_cols, p_z_cols, m_rows, k + j * SUB_K,
                k_end, group_size, stride_sk, stride_zk, BITS, HAS_ZEROS, SUB_K, BLOCK_N, EVEN_K, PACK)
            if VARIANT == "dequant" and PAIRS:
                tl.static_assert(WORDS and BITS == 4 and not E2M1, "PAIRS: integer 4-bit codes as int32 words")
                # A's columns 8w + 4h + r: (w, h, r1, r0) with r = 2·r1 + r0; split r0, then r1 -> [TILE_M, 2W].
                b_a_r0, b_a_r1 = tl.split(tl.reshape(b_a, [TILE_M, SUB_B, 2, 2, 2]))
                b_a_0, b_a_2 = tl.split(b_a_r0)
                b_a_1, b_a_3 = tl.split(b_a_r1)
                b_x = tl.reshape(tl.join(b_q, b_q >> 16), [BLOCK_N, 2 * SUB_B])  # (w, h): h = 1 the high half
                if HAS_ZEROS and OPAQUE_ZEROS:
                    b_z = _opaque(b_z)
                b_off = (b_z + (1024 if DTYPE == tl.float16 else 128)).to(DTYPE)[:, None]
                b_sc = b_s.to(DTYPE)[:, None]
                b_acc_t = _pairs_dot(b_x, tl.reshape(b_a_0, [TILE_M, 2 * SUB_B]), b_off, b_sc, b_acc_t, 0, DTYPE,
                                     ASM, DOT_PRECISION)
                b_acc_t = _pairs_dot(b_x, tl.reshape(b_a_1, [TILE_M, 2 * SUB_B]), b_off, b_sc, b_acc_t, 1, DTYPE,
                                     ASM, DOT_PRECISION)
                b_acc_t = _pairs_dot(b_x, tl.reshape(b_a_2, [TILE_M, 2 * SUB_B]), b_off, b_sc, b_acc_t, 2, DTYPE,
                                     ASM, DOT_PRECISION)
                b_acc_t = _pairs_dot(b_x, tl.reshape(b_a_3, [TILE_M, 2 * SUB_B]), b_off, b_sc, b_acc_t, 3, DTYPE,
                                     ASM, DOT_PRECISION)
            elif VARIANT == "dequant" and SPLIT:
                # Low and high nibbles as two tiles of SUB_K/2 columns (even and odd k), each multiplied by A's
                # even or odd columns: no interleave of the weights (the byte permutes it compiles to were the
                # largest share of the loop's instructions on sm_90).
                b_a_even, b_a_odd = tl.split(tl.reshape(b_a, [TILE_M, SUB_B, 2]))
                if E2M1 and DTYPE == tl.bfloat16:
                    b_w_lo = _mxfp4_weights_bf16(b_q & 15, b_s)
                    b_w_hi = _mxfp4_weights_bf16(b_q >> 4, b_s)
                elif E2M1:
                    b_w_lo = _mxfp4_weights(b_q & 15, b_s, DTYPE)
                    b_w_hi = _mxfp4_weights(b_q >> 4, b_s, DTYPE)
                else:
                    b_w_lo = _codes_minus_zero(b_q & 15, b_z, DTYPE, BITS) * b_s.to(DTYPE)[:, None]
                    b_w_hi = _codes_minus_zero(b_q >> 4, b_z, DTYPE, BITS) * b_s.to(DTYPE)[:, None]
                if SWAP:
                    b_acc_t = tl.dot(b_w_lo, tl.trans(b_a_even), b_acc_t, input_precision=DOT_PRECISION)
                    b_acc_t = tl.dot(b_w_hi, tl.trans(b_a_odd), b_acc_t, input_precision=DOT_PRECISION)
                else:
                    b_acc = tl.dot(b_a_even, tl.trans(b_w_lo), b_acc, input_precision=DOT_PRECISION)
                    b_acc = tl.dot(b_a_odd, tl.trans(b_w_hi), b_acc, input_precision=DOT_PRECISION)
            elif VARIANT == "dequant":
                if E2M1 and DTYPE == tl.bfloat16:  # [BLOCK_N, SUB_K] in k order, in 16-bit ops
                    b_w = _mxfp4_weights_bf16(tl.interleave(b_q & 15, b_q >> 4), b_s)
                elif E2M1:  # [BLOCK_N, SUB_K] in k order, scaled and rounded to DTYPE
                    b_w = _mxfp4_weights(tl.interleave(b_q & 15, b_q >> 4), b_s, DTYPE)
                else:
                    if WORDS:
                        b_w = _words_minus_zero(b_q, b_z, DTYPE)
                    elif BITS == 4:  # [BLOCK_N, SUB_K] in k order
                        b_w = _codes_minus_zero(tl.interleave(b_q & 15, b_q >> 4), b_z, DTYPE, BITS)
                    else:
                        b_w = _codes_minus_zero(b_q, b_z, DTYPE, BITS)
                    b_w = b_w * b_s.to(DTYPE)[:, None]
                if SWAP:
                    b_acc_t = tl.dot(b_w, tl.trans(b_a), b_acc_t, input_precision=DOT_PRECISION)
                else:
                    b_acc = tl.dot(b_a, tl.trans(b_w), b_acc, input_precision=DOT_PRECISION)
            elif VARIANT == "gemv":  # TILE_M = 1 (the kernel runs each routed row alone)
                b_a = tl.reshape(b_a.to(tl.float32), [SUB_B, PACK])
                if E2M1:
                    b_a_even, b_a_odd = tl.split(b_a)
                    b_t = _e2m1_f32(b_q & 15) * b_a_even[None, :] + _e2m1_f32(b_q >> 4) * b_a_odd[None, :]
                elif WORDS:  # column 8w + t is nibble t of word w: 2 integer ops a code
                    b_t = _gemv_words(b_q, b_z, b_a)
                elif BITS == 4:
                    b_a_even, b_a_odd = tl.split(b_a)
                    b_t = (_codes_minus_zero(b_q & 15, b_z, tl.float32, BITS) * b_a_even[None, :]
                           + _codes_minus_zero(b_q >> 4, b_z, tl.float32, BITS) * b_a_odd[None, :])
                else:
                    b_t = _codes_minus_zero(b_q, b_z, tl.float32, BITS) * tl.reshape(b_a, [SUB_B])[None, :]
                # Sum each thread's vector of bytes (no shuffles), scale by the group, and leave the sum across
                # threads to the end of the K loop.
                b_t = tl.sum(tl.reshape(b_t, [BLOCK_N, SUB_B // VEC, VEC]), axis=2)
                b_acc_v += b_t * _scales_f32(b_s, E2M1)[:, None]
            else:  # "postscale"
                b_q = tl.trans(b_q.to(tl.int32))  # [SUB_B, BLOCK_N]
                if E2M1:  # e2m1 values are exact in every activation dtype
                    b_a_even, b_a_odd = tl.split(tl.reshape(b_a, [TILE_M, SUB_B, 2]))
                    b_part = tl.dot(b_a_even, _e2m1_f32(b_q & 15).to(DTYPE), input_precision=DOT_PRECISION)
                    b_part = tl.dot(b_a_odd, _e2m1_f32(b_q >> 4).to(DTYPE), b_part, input_precision=DOT_PRECISION)
                elif BITS == 4:
                    b_w_even = ((b_q & 15) - b_z[None, :]).to(DTYPE)
                    b_w_odd = ((b_q >> 4) - b_z[None, :]).to(DTYPE)
                    b_a_even, b_a_odd = tl.split(tl.reshape(b_a, [TILE_M, SUB_B, 2]))
                    b_part = tl.dot(b_a_even, b_w_even, input_precision=DOT_PRECISION)
                    b_part = tl.dot(b_a_odd, b_w_odd, b_part, input_precision=DOT_PRECISION)
                else:
                    b_part = tl.dot(b_a, (b_q - b_z[None, :]).to(DTYPE), input_precision=DOT_PRECISION)
                b_acc += b_part * _scales_f32(b_s, E2M1)[None, :]
        p_a_sub += BLOCK_K
        p_b_sub += (BLOCK_K // PACK) * stride_bk
    if VARIANT == "gemv":
        b_acc = tl.reshape(tl.sum(b_acc_v, axis=1), [TILE_M, BLOCK_N])
    if SWAP or PAIRS:
        b_acc = tl.trans(b_acc_t)

    _epilogue(b_acc, p_bias, p_weights, p_c, i_e, i_s, i_n, b_rows, m_rows, o_bn, n_out, stride_bias_e, stride_cs,
              stride_cm, alpha, limit, ACTIVATION, GATED, HAS_BIAS, HAS_WEIGHTS, TILE_M, OUT_N)


# Row counts change with every batch: specializing on them (== 1, % 16) would recompile as T moves.
@triton.jit(do_not_specialize=["num_rows"])
def grouped_gemm_wna16_kernel(
    p_a, p_b, p_s, p_z, p_c, p_bias, p_weights,
    p_sorted_ids, p_expert_ids, p_num_padded,
    num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split, group_size,
    stride_am, stride_be, stride_bn, stride_bk, stride_se, stride_sn, stride_sk, stride_ze, stride_zn, stride_zk,
    stride_cs, stride_cm, stride_bias_e,
    alpha, limit,
    VARIANT: tl.constexpr, WORDS: tl.constexpr, BITS: tl.constexpr, E2M1: tl.constexpr, HAS_ZEROS: tl.constexpr,
    SUB_K: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr, PAIRS: tl.constexpr, ASM: tl.constexpr,
    OPAQUE_ZEROS: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_PER_BLOCK: tl.constexpr,
    HALF_TAIL: tl.constexpr,
):
    """C[s, row, n] for one block of M slots, a tile of output columns and split s = program_id(1) (see the bf16
    ``grouped_gemm_kernel`` for the layout, the grid order, GATED, ROW_PER_BLOCK and HALF_TAIL)."""
    OUT_N: tl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
    i_s = tl.program_id(1)
    i_m, i_n, has_tile = _program_tile(tl.program_id(0), p_num_padded, num_rows, n_out, BLOCK_M, OUT_N, GROUP_M,
                                       ROW_PER_BLOCK)
    if not has_tile:
        return
    i_e = tl.load(p_expert_ids + i_m).to(tl.int64)
    p_b_e = p_b + i_e * stride_be
    p_s_e = p_s + i_e * stride_se
    p_z_e = p_z + i_e * stride_ze
    if VARIANT == "gemv":
        # Without tensor cores a tile needs no 16 rows: each routed row of the block is a 1-row tile (its slot
        # found by shifting the sorted ids), padding slots are skipped. A block's later rows re-read the weight
        # tile from L2, not HBM; the 3-D product of several rows at once would hold BLOCK_M times the registers.
        for i_slot in range(0, 1 if ROW_PER_BLOCK else BLOCK_M):
            if ROW_PER_BLOCK:
                is_row = True
            else:
                is_row = tl.load(p_sorted_ids + i_m * BLOCK_M + i_slot) < num_rows
            if is_row:
                _tile(
                    p_a, p_b_e, p_s_e, p_z_e, p_c, p_bias, p_weights, p_sorted_ids + i_slot,
                    i_m, i_n, i_s, i_e, num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split, group_size,
                    stride_am, stride_bn, stride_bk, stride_sn, stride_sk, stride_zn, stride_zk, stride_cs,
                    stride_cm, stride_bias_e, alpha, limit,
                    VARIANT, WORDS, BITS, E2M1, HAS_ZEROS, SUB_K, SPLIT, SWAP, PAIRS, ASM, OPAQUE_ZEROS, ACTIVATION,
                    GATED, HAS_BIAS, HAS_WEIGHTS, BLOCK_M, 1,
                    BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, DOT_PRECISION, ROW_PER_BLOCK,
                )
    else:
        is_half = False
        if HALF_TAIL:
            is_half = tl.load(p_sorted_ids + i_m * BLOCK_M + BLOCK_M // 2) >= num_rows
        if is_half:
            _tile(
                p_a, p_b_e, p_s_e, p_z_e, p_c, p_bias, p_weights, p_sorted_ids,
                i_m, i_n, i_s, i_e, num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split, group_size,
                stride_am, stride_bn, stride_bk, stride_sn, stride_sk, stride_zn, stride_zk, stride_cs, stride_cm,
                stride_bias_e, alpha, limit,
                VARIANT, WORDS, BITS, E2M1, HAS_ZEROS, SUB_K, SPLIT, SWAP, PAIRS, ASM, OPAQUE_ZEROS, ACTIVATION,
                GATED, HAS_BIAS, HAS_WEIGHTS, BLOCK_M,
                BLOCK_M // 2,
                BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, DOT_PRECISION, ROW_PER_BLOCK,
            )
        else:
            _tile(
                p_a, p_b_e, p_s_e, p_z_e, p_c, p_bias, p_weights, p_sorted_ids,
                i_m, i_n, i_s, i_e, num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split, group_size,
                stride_am, stride_bn, stride_bk, stride_sn, stride_sk, stride_zn, stride_zk, stride_cs, stride_cm,
                stride_bias_e, alpha, limit,
                VARIANT, WORDS, BITS, E2M1, HAS_ZEROS, SUB_K, SPLIT, SWAP, PAIRS, ASM, OPAQUE_ZEROS, ACTIVATION,
                GATED, HAS_BIAS, HAS_WEIGHTS, BLOCK_M,
                BLOCK_M,
                BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, DOT_PRECISION, ROW_PER_BLOCK,
            )
