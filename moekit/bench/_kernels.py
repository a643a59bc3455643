"""The streaming-read kernel that measures the read-bandwidth ceiling (MEASURING.md)."""

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
        o = i_b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + o, mask=o < n_elements, other=0.0).to(tl.float32)
    tl.store(out_ptr + i_p, tl.sum(acc, axis=0))
