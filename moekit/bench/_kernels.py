"""The streaming-read kernels that measure the read-bandwidth ceiling (MEASURING.md): the best of both counts."""

import triton
import triton.language as tl


@triton.jit
def _stream_read(x_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    # Persistent grid: each program strides over the tensor and keeps an fp32 running sum, so the loads
    # cannot be optimised away and the only traffic is one read of the tensor.
    i_p = tl.program_id(0)
    n_p = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i_b in range(i_p, tl.cdiv(n_elements, BLOCK), n_p):
        # int64: 4 GiB of bf16 is 2^31 elements. (Offsets carried from one iteration to the next instead lose
        # the compiler's contiguity facts: that form read at 2.5 TB/s on an H200, this one at 4.35-4.45.)
        o = tl.cast(i_b, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + o, mask=o < n_elements, other=0.0).to(tl.float32)
    tl.store(out_ptr + i_p, tl.sum(acc, axis=0))


@triton.jit
def _stream_tiles(x_ptr, out_ptr, k_dim, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # No masks (they could slow the very stream it measures): rows % BLOCK_N == 0 and k_dim % BLOCK_K == 0, one
    # program per BLOCK_N rows; measure_ceilings checks it.
    # Shaped like a decode GEMM's weight stream: one program a tile of BLOCK_N rows of an [n, k_dim] matrix,
    # walking K in BLOCK_K steps (software-pipelined by num_stages), many more programs than SMs. Such a stream of
    # independent 2-D tiles reads faster than the persistent 1-D one on an H200 (the GEMMs streamed weights at
    # 4.56-4.59 TB/s where the 1-D kernel measured 4.45), which put cells above 100% of the floor.
    i_p = tl.program_id(0)
    o_n = (i_p * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64) * k_dim
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, k_dim, BLOCK_K):
        acc += tl.load(x_ptr + o_n[:, None] + (k + tl.arange(0, BLOCK_K))[None, :]).to(tl.float32)
    tl.store(out_ptr + i_p, tl.sum(acc))
