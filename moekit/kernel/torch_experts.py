"""Pure-torch experts backend: the CPU path and the reference every fast backend is checked against.

It groups the N = T·K routed rows by expert with one stable sort and runs one pair of GEMMs per expert that
received tokens (no dense all-experts compute, no per-token loop). GEMMs run in the weight dtype (fp32
accumulation inside torch's matmul); activation, biases, routing weights and the top-k sum run in fp32.
``backward`` is the same loop over the gradient formulas the Triton backend computes with grouped kernels.

8-bit weights (``QuantParams``) run as their math says, in fp32: each expert that received tokens dequantizes its
own weights inside the loop (no dequantized copy of the layer), GEMM 1 multiplies them with the activations
``prepare`` quantized (dequantized again), and the activation's output is quantized with the same scheme before
GEMM 2 (the fast path's GEMM 2 reads 8-bit activations too). Weight-only 4/8-bit integer groups (w4a16, w8a16)
and MXFP4 take the same loop, each expert's codes dequantized with ``dequantize_wna16`` / ``dequantize_mxfp4``
and activations kept in fp32.

The unquantized forward groups the routed rows by expert once (``_expert_spans``) and runs one of three paths
(docs/perf/NOTES.md, "CPU: the torch backend", has the measurements, 2 cores):

- ``cpu_packed.experts_packed`` wherever it is usable (a ``RoutedExperts`` layer's weights on a CPU, fp32/bf16
  where this CPU's oneDNN has them, no autograd): each expert's GEMMs on its weights packed once into oneDNN's
  layout, 2.5-3x the streaming rate of the plain GEMMs below at decode (see that module for the cache and when it
  is dropped). Otherwise ``_pool_for`` picks between:
- ``_experts_serial`` (bf16/fp16, and wherever the pool is not used): both GEMMs as one ``torch._grouped_mm``
  each (a per-expert loop in C++, every GEMM on all intra-op threads; a Python loop where it cannot run), the
  biases and the activation once over all rows. An expert's single bf16/fp16 row is computed twice: oneDNN's
  one-row kernel streamed a [2048, 2048] bf16 weight at 22 GB/s where its two-row kernel streams 27 (a free
  FLOP on a memory-bound GEMV; 1.5-2.5% of an olmoe decode call).
- ``_experts_pooled`` (fp32/fp64): each expert whole on one of a few worker threads whose torch ops are
  single-threaded (``_ExpertPool``). MKL runs GEMMs of a few rows on one thread whatever the count (a one-row
  fp32 GEMV streamed 23 GB/s on one thread and on two, a two-row one 11 and 11), so the pool is what puts the
  other cores to work: olmoe fp32 T = 4 and 16 ran 1.3-1.7x the serial path. Workers also meet only once per
  call, where every multi-threaded GEMM ends in an OpenMP barrier that, when another process holds a core,
  waits for a descheduled thread (fp32 T = 16 on a busy machine: ~170 ms pooled against ~870 serial, same
  rounds). bf16/fp16 do not take the pool: oneDNN's GEMMs already use every core (17 GB/s on one thread, 29
  on two), and the caller's OpenMP threads spin ~5-10 ms after its last parallel op (a model's or a
  baseline's), taking a core from the workers: pooled, bf16 olmoe ran 0.6-0.9x grouped_mm on a quiet machine
  (though 1.3-6x faster on a busy one, where the serial path and the baselines wait at every barrier).

All three compute each expert's rows alone and keep the top-k sum's fixed order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from moekit.kernel import cpu_packed
from moekit.kernel.experts import Experts, Grads
from moekit.ops.activation import Activation, activation_ref
from moekit.ops.activation_backward import activation_backward_ref
from moekit.ops.quantize import QDTYPES, dequantize_activation, dequantize_weight, quantize_activation
from moekit.ops.quantize_mxfp4 import dequantize_mxfp4
from moekit.ops.quantize_wna16 import WNA16Weight, dequantize_wna16
from moekit.quant.params import UNQUANTIZED, QuantParams


class TorchExperts(Experts):
    name = "torch"

    @property
    def op_backend(self) -> str:
        return "torch"  # stateless: the registry's instance computes the same

    def check_supported(self, hidden_states: torch.Tensor, quant: QuantParams) -> None:
        """Unquantized, 8-bit weights (fp8_e4m3/int8, any granularity) with activations unquantized or in the
        weights' dtype, and int4/int8/mxfp4 weights with group scales (activations unquantized)."""
        if not quant.is_quantized or quant.granularity == "group":  # QuantParams validated the group case
            return
        if quant.weight_dtype not in QDTYPES or quant.granularity is None:
            raise ValueError(f"backend 'torch': quantized weights ({quant.describe()}) are not supported: it runs "
                             f"{list(QDTYPES)} weights with quant.granularity set")
        if quant.act_dtype not in (None, quant.weight_dtype):
            raise ValueError(f"backend 'torch': {quant.act_dtype} activations with {quant.weight_dtype} weights are "
                             "not supported (activations are unquantized or in the weights' dtype)")
        if quant.act_dtype is not None and hidden_states.dtype != QDTYPES[quant.act_dtype]:
            # prepare hands over codes; float activations here would be read as if they were codes.
            raise ValueError(f"backend 'torch': expected hidden_states as {QDTYPES[quant.act_dtype]} codes for "
                             f"{quant.describe()}, got {hidden_states.dtype}")

    def run(
        self,
        hidden_states_TH: torch.Tensor,
        w13_E2IH: torch.Tensor,
        w2_EHI: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        *,
        activation: Activation,
        w13_bias_E2I: torch.Tensor | None,
        w2_bias_EH: torch.Tensor | None,
        expert_map_E: torch.Tensor | None,
        out_dtype: torch.dtype,
        quant: QuantParams = UNQUANTIZED,
        hidden_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if quant.is_quantized:
            return _run_quantized(hidden_states_TH, w13_E2IH, w2_EHI, topk_weights_TK, topk_ids_TK,
                                  activation=activation, w13_bias_E2I=w13_bias_E2I, w2_bias_EH=w2_bias_EH,
                                  expert_map_E=expert_map_E, out_dtype=out_dtype, quant=quant,
                                  hidden_scale=hidden_scale)
        num_tokens, hidden = hidden_states_TH.shape
        top_k = topk_ids_TK.shape[1]
        y_NH = torch.zeros(num_tokens * top_k, hidden, dtype=torch.float32, device=hidden_states_TH.device)
        order_M, ids_M, spans = _expert_spans(topk_ids_TK, expert_map_E, w13_E2IH.shape[0])
        if spans:
            x_MH = hidden_states_TH[order_M // top_k]  # the routed rows of local experts, grouped by expert
            weights = (w13_E2IH, w2_EHI, w13_bias_E2I, w2_bias_EH)
            packed = cpu_packed.usable(x_MH, w13_E2IH, w2_EHI)
            pool = None if packed else _pool_for(x_MH, spans, *weights)
            if packed:
                y_NH[order_M] = cpu_packed.experts_packed(x_MH, spans, *weights, activation)
            elif pool is None:
                y_NH[order_M] = _experts_serial(x_MH, ids_M, spans, *weights, activation)
            else:
                y_NH[order_M] = _experts_pooled(pool, x_MH, spans, *weights, activation)
        # Summing over K in a fixed order (not index_add_) keeps the result deterministic.
        out_TH = (y_NH.view(num_tokens, top_k, hidden) * topk_weights_TK.float().unsqueeze(-1)).sum(dim=1)
        return out_TH.to(out_dtype)

    def backward(
        self,
        grad_out_TH: torch.Tensor,
        hidden_states_TH: torch.Tensor,
        w13_E2IH: torch.Tensor,
        w2_EHI: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        *,
        activation: Activation,
        w13_bias_E2I: torch.Tensor | None,
        w2_bias_EH: torch.Tensor | None,
        expert_map_E: torch.Tensor | None,
        needs: Sequence[bool],
    ) -> Grads:
        """Per expert e with rows n (token t = n // K), h recomputed and g = dout[t] @ w2[e]:

            d topk_weights[n] = g · a + dout[t] · b2[e];   dh = act'(h) ⊙ (topk_weights[n] · g)
            dx[t] += dh @ w13[e];   dw13[e] = dh^T x[t], db13[e] = sum dh;   dw2[e] = (w · dout)^T a, db2[e] = sum w · dout
        """
        like = (hidden_states_TH, w13_E2IH, w2_EHI, topk_weights_TK, w13_bias_E2I, w2_bias_EH)
        acc = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) if need and t is not None else None
               for t, need in zip(like, needs)]
        dx, dw13, dw2, dtw, db13, db2 = acc
        dtw_N = None if dtw is None else dtw.view(-1)
        dout_TH = grad_out_TH.float()
        w_N = topk_weights_TK.reshape(-1).float()
        for e, sel, rows in _by_expert(topk_ids_TK, expert_map_E, w13_E2IH.shape[0]):
            x_mH = hidden_states_TH[rows]
            h = _gemm1(x_mH, w13_E2IH[e], w13_bias_E2I, e)
            g = dout_TH[rows] @ w2_EHI[e].float()
            # a as the forward's GEMM 2 read it (in the weight dtype); dh kept in fp32.
            a, dh, dtw_m = activation_backward_ref(h, g, w_N[sel], activation, a_dtype=w2_EHI.dtype,
                                                   dh_dtype=torch.float32)
            a = a.float()
            if dtw_N is not None:
                dtw_N[sel] = dtw_m
                if w2_bias_EH is not None:
                    dtw_N[sel] += dout_TH[rows] @ w2_bias_EH[e].float()
            if dx is not None:
                dx.index_add_(0, rows, dh @ w13_E2IH[e].float())
            if dw13 is not None:
                dw13[e] = dh.t() @ x_mH.float()
            if db13 is not None:
                db13[e] = dh.sum(dim=0)
            gw = dout_TH[rows] * w_N[sel, None]
            if dw2 is not None:
                dw2[e] = gw.t() @ a
            if db2 is not None:
                db2[e] = gw.sum(dim=0)
        return tuple(None if g is None else g.to(t.dtype) for g, t in zip(acc, like))


def _expert_spans(
    topk_ids_TK: torch.Tensor, expert_map_E: torch.Tensor | None, num_local: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """The routed rows of local experts grouped by expert, by one stable sort: ``order_M`` their routed-row
    indices (ascending within an expert), ``ids_M`` their local experts, and ``(e, start, end)`` for each expert
    with rows (its rows are ``order_M[start:end]``). Rows of remote experts (-1) are left out."""
    ids_N = topk_ids_TK.reshape(-1).long()
    if expert_map_E is not None:
        # Unchecked ids outside [0, E_global) are dropped, as without a map: a -1 must not index from the end.
        valid = (ids_N >= 0) & (ids_N < expert_map_E.numel())
        ids_N = torch.where(valid, expert_map_E.long()[ids_N.clamp(0, expert_map_E.numel() - 1)], -1)
    # Rows for other ranks (-1) sort last under the sentinel id E.
    ids_N = torch.where(ids_N < 0, num_local, ids_N)
    order_N = torch.argsort(ids_N, stable=True)
    counts = torch.bincount(ids_N, minlength=num_local + 1)[:num_local].tolist()
    spans, start = [], 0
    for e, count in enumerate(counts):
        if count:
            spans.append((e, start, start + count))
        start += count
    order_M = order_N[:start]
    return order_M, ids_N[order_M], spans


def _by_expert(topk_ids_TK: torch.Tensor, expert_map_E: torch.Tensor | None, num_local: int):
    """Yield ``(e, sel, rows)`` per local expert with routed rows: ``sel`` its routed-row indices (ascending),
    ``rows`` their tokens; rows of remote experts (-1) are never yielded."""
    top_k = topk_ids_TK.shape[1]
    order_M, _, spans = _expert_spans(topk_ids_TK, expert_map_E, num_local)
    for e, start, end in spans:
        sel = order_M[start:end]
        yield e, sel, sel // top_k


def _experts_serial(
    x_MH: torch.Tensor,
    ids_M: torch.Tensor,
    spans: list[tuple[int, int, int]],
    w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
    w13_bias_E2I: torch.Tensor | None,
    w2_bias_EH: torch.Tensor | None,
    activation: Activation,
) -> torch.Tensor:
    """GEMM 2's fp32 output for the grouped rows ``x_MH``, in this thread: each GEMM as one ``torch._grouped_mm``
    (``_grouped_layout``; else expert by expert, ``_gemm_by_expert``), each expert's GEMM on every intra-op
    thread, the biases and the activation once over all rows."""
    grouped = _grouped_layout(x_MH, ids_M, spans, w13_E2IH, w2_EHI)
    if grouped is not None:
        h_MR = _grouped_gemm(x_MH, w13_E2IH, *grouped)
    else:
        h_MR = _gemm_by_expert(x_MH, w13_E2IH, spans)
    h = h_MR if w13_bias_E2I is None else h_MR.float() + w13_bias_E2I[ids_M].float()
    a_MI = activation_ref(h, activation).to(w2_EHI.dtype)
    if grouped is not None:
        y = _grouped_gemm(a_MI, w2_EHI, *grouped).float()
    else:
        y = _gemm_by_expert(a_MI, w2_EHI, spans).float()
    return y if w2_bias_EH is None else y + w2_bias_EH[ids_M].float()


def _grouped_layout(
    x_MH: torch.Tensor, ids_M: torch.Tensor, spans: list[tuple[int, int, int]], w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """``(offs_E, src_P, keep_M)`` for ``_grouped_gemm``, or None where ``torch._grouped_mm`` cannot run these
    operands (then ``_gemm_by_expert`` loops in Python). In bf16/fp16 an expert's single row is computed twice
    (``src_P`` repeats it, ``keep_M`` picks each row's first copy): see ``_gemm_by_expert``."""
    if not (_grouped_mm_runs(x_MH, w13_E2IH) and _grouped_mm_runs(x_MH.new_empty(0, w2_EHI.shape[2]), w2_EHI)):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_MH, w13_E2IH, w2_EHI)):
        return None
    num_experts = w13_E2IH.shape[0]
    counts_E = torch.bincount(ids_M, minlength=num_experts)
    src_P = keep_M = None
    if w13_E2IH.dtype in (torch.bfloat16, torch.float16) and any(end - start == 1 for _, start, end in spans):
        single = counts_E == 1
        repeats_M = 1 + single[ids_M].long()
        src_P = torch.repeat_interleave(torch.arange(ids_M.shape[0], device=ids_M.device), repeats_M)
        keep_M = torch.cumsum(repeats_M, 0) - repeats_M
        counts_E = counts_E + single.long()
    return torch.cumsum(counts_E, 0, dtype=torch.int32), src_P, keep_M


def _grouped_gemm(a_MK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor, src_P: torch.Tensor | None,
                  keep_M: torch.Tensor | None) -> torch.Tensor:
    """``_gemm_by_expert`` as one ``torch._grouped_mm`` (its per-expert loop runs in C++, not Python)."""
    a = a_MK if src_P is None else a_MK[src_P]
    out = torch._grouped_mm(a, w_ENK.transpose(1, 2), offs=offs_E)
    return out if keep_M is None else out[keep_M]


_GROUPED_MM_RUNS: dict[tuple, bool] = {}


def _grouped_mm_runs(a_MK: torch.Tensor, w_ENK: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs ``a @ w[e].T`` on this device, these dtypes and these sizes (it needs
    16-byte aligned rows, and not every torch build has it for every dtype); probed once per such key on a
    two-expert problem of the same sizes."""
    key = (a_MK.device.type, a_MK.dtype, w_ENK.dtype, w_ENK.shape[1], w_ENK.shape[2])
    if key not in _GROUPED_MM_RUNS:
        ok = hasattr(torch, "_grouped_mm") and a_MK.dtype == w_ENK.dtype
        if ok:
            try:
                k, n = w_ENK.shape[2], w_ENK.shape[1]
                a = torch.zeros(3, k, dtype=a_MK.dtype, device=a_MK.device)
                w = torch.zeros(2, n, k, dtype=w_ENK.dtype, device=w_ENK.device)
                torch._grouped_mm(a, w.transpose(1, 2), offs=torch.tensor([1, 3], dtype=torch.int32,
                                                                             device=a.device))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_RUNS[key] = ok
    return _GROUPED_MM_RUNS[key]


def _gemm_by_expert(a_MK: torch.Tensor, w_ENK: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """``out[start:end] = a[start:end] @ w[e].T`` for each ``(e, start, end)`` of ``spans``, in ``w``'s dtype."""
    if torch.is_grad_enabled() and (a_MK.requires_grad or w_ENK.requires_grad):
        return torch.cat([a_MK[start:end] @ w_ENK[e].t() for e, start, end in spans])  # out= is not recorded
    out = torch.empty(a_MK.shape[0], w_ENK.shape[1], dtype=w_ENK.dtype, device=a_MK.device)
    pad = w_ENK.dtype in (torch.bfloat16, torch.float16)
    for e, start, end in spans:
        if pad and end - start == 1:  # oneDNN's two-row kernel is the faster one (module docstring)
            out[start] = (a_MK[start:end].expand(2, -1) @ w_ENK[e].t())[0]
        else:
            torch.matmul(a_MK[start:end], w_ENK[e].t(), out=out[start:end])
    return out


def _experts_pooled(
    pool: _ExpertPool,
    x_MH: torch.Tensor,
    spans: list[tuple[int, int, int]],
    w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
    w13_bias_E2I: torch.Tensor | None,
    w2_bias_EH: torch.Tensor | None,
    activation: Activation,
) -> torch.Tensor:
    """What ``_experts_serial`` computes, with each expert run whole on one of ``pool``'s workers."""
    y_MH = torch.empty(x_MH.shape[0], w2_EHI.shape[1], dtype=torch.float32, device=x_MH.device)

    def expert(e: int, start: int, end: int) -> None:
        own = [(e, 0, end - start)]
        h = _gemm_by_expert(x_MH[start:end], w13_E2IH, own)
        h = h if w13_bias_E2I is None else h.float() + w13_bias_E2I[e].float()
        a = activation_ref(h, activation).to(w2_EHI.dtype)
        y = _gemm_by_expert(a, w2_EHI, own).float()
        y_MH[start:end] = y if w2_bias_EH is None else y + w2_bias_EH[e].float()  # rows no other worker writes

    # Largest experts first, so the last expert a worker picks up is a short one.
    pool.map(expert, sorted(spans, key=lambda span: span[1] - span[2]))
    return y_MH


def _gemm1(x_mH: torch.Tensor, w13_RH: torch.Tensor, w13_bias_E2I: torch.Tensor | None, e: int) -> torch.Tensor:
    """Pre-activation rows of expert ``e``: the GEMM in the weight dtype, the bias added in fp32."""
    h = x_mH @ w13_RH.t()
    return h if w13_bias_E2I is None else h.float() + w13_bias_E2I[e].float()


def _pool_for(
    x_MH: torch.Tensor,
    spans: list[tuple[int, int, int]],
    w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
    *biases: torch.Tensor | None,
) -> _ExpertPool | None:
    """The worker pool to run this call's experts on, or None to run them here (``_experts_serial``, whose
    GEMMs use every intra-op thread): off CPU, for bf16/fp16 weights (module docstring), with one intra-op
    thread, when fewer experts have rows than there are workers (whole experts would not balance over them),
    when autograd would record the call, and where threads' counts are not per thread
    (``_ExpertPool.supported``)."""
    workers = torch.get_num_threads()
    if x_MH.device.type != "cpu" or w13_E2IH.dtype in (torch.bfloat16, torch.float16):
        return None
    if workers < 2 or len(spans) < workers or not _ExpertPool.supported():
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_MH, w13_E2IH, w2_EHI, *biases)):
        return None
    if getattr(_ExpertPool.local, "worker", False):  # called from a worker: never wait on the pool's own threads
        return None
    return _ExpertPool.get(workers)


class _ExpertPool:
    """``workers`` threads whose torch ops run on one intra-op thread each (the module docstring says why).

    ``torch.set_num_threads`` sets the calling thread's OpenMP and MKL counts (both are per thread) and the
    process-wide count that threads started later begin with; each worker sets its own to 1, then the creating
    thread's count is written back as the process-wide one, so no other thread sees a change.
    """

    local = threading.local()
    _lock = threading.Lock()
    _current: _ExpertPool | None = None
    _supported: bool | None = None

    def __init__(self, workers: int) -> None:
        caller = torch.get_num_threads()
        self.workers = workers
        self.pid = os.getpid()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="moekit-experts")
        # Every worker must have taken its one thread before the process-wide count is put back; the barrier also
        # makes the pool start each of its threads now (one init task per thread).
        ready = threading.Barrier(workers + 1, timeout=60)
        inits = [self._executor.submit(self._init_worker, ready) for _ in range(workers)]
        ready.wait()
        torch.set_num_threads(caller)
        self.worker_threads = [f.result() for f in inits]

    @staticmethod
    def _init_worker(ready: threading.Barrier) -> int:
        _ExpertPool.local.worker = True
        torch.get_num_threads()  # initialise this thread's counts from the process-wide one first, then override
        torch.set_num_threads(1)
        ready.wait()
        return torch.get_num_threads()

    @classmethod
    def supported(cls) -> bool:
        """Per-thread counts are OpenMP's; torch's other parallel backends share one count across threads."""
        if cls._supported is None:
            cls._supported = "parallel backend: OpenMP" in torch.__config__.parallel_info()
        return cls._supported

    @classmethod
    def get(cls, workers: int) -> _ExpertPool:
        """The process's pool, rebuilt when the thread count changed or after a fork (threads do not survive it)."""
        with cls._lock:
            pool = cls._current
            if pool is None or pool.workers != workers or pool.pid != os.getpid():
                if pool is not None and pool.pid == os.getpid():
                    pool._executor.shutdown(wait=False)
                pool = cls._current = cls(workers)
            return pool

    def map(self, fn: Callable[..., object], args: Sequence[tuple]) -> list:
        """``[fn(*a) for a in args]``, run on the workers in order of ``args`` (each worker takes the next one)."""
        # Grad and inference modes are per thread. The pool only serves calls that record nothing (_pool_for), so
        # workers run without grad, in the caller's inference mode (whose results are inference tensors).
        inference = torch.is_inference_mode_enabled()

        def call(a: tuple) -> object:
            with torch.inference_mode(inference), torch.no_grad():
                return fn(*a)

        return [f.result() for f in [self._executor.submit(call, a) for a in args]]


def _run_quantized(
    x_TH: torch.Tensor,
    w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    *,
    activation: Activation,
    w13_bias_E2I: torch.Tensor | None,
    w2_bias_EH: torch.Tensor | None,
    expert_map_E: torch.Tensor | None,
    out_dtype: torch.dtype,
    quant: QuantParams,
    hidden_scale: torch.Tensor | None,
) -> torch.Tensor:
    """Two passes over the experts: GEMM 1 + activation for every routed row, then GEMM 2. A per-tensor dynamic
    scale for GEMM 2's input is one amax over all rows this rank computed, which exists only after pass one."""
    num_tokens, hidden = x_TH.shape
    top_k = topk_ids_TK.shape[1]
    act, group = quant.act_granularity, quant.act_group_size
    # Group-scaled codes pack K, so I comes from w13's rows.
    inter = w13_E2IH.shape[1] // 2 if activation.is_gated else w13_E2IH.shape[1]
    gate_rows = inter if activation.is_gated else None
    x_f = x_TH.float() if act is None else dequantize_activation(x_TH, hidden_scale, act, group)
    groups = list(_by_expert(topk_ids_TK, expert_map_E, w13_E2IH.shape[0]))
    a_NI = torch.zeros(num_tokens * top_k, inter, dtype=torch.float32, device=x_TH.device)
    for e, sel, rows in groups:
        w13 = _expert_weight(w13_E2IH, quant.w13_scale, quant.w13_zp, e, quant, k=hidden, gate_rows=gate_rows)
        h = x_f[rows] @ w13.t()
        if w13_bias_E2I is not None:
            h = h + w13_bias_E2I[e].float()
        a_NI[sel] = activation_ref(h, activation).float()
    if act is not None and groups:
        # Quantize only the rows computed here (rows of other ranks' experts must not enter a per-tensor amax).
        sel_all = torch.cat([sel for _, sel, _ in groups])
        q, s = quantize_activation(a_NI[sel_all], quant.act_dtype, act, group, static_scale=quant.a2_scale)
        a_NI[sel_all] = dequantize_activation(q, s, act, group)
    y_NH = torch.zeros(num_tokens * top_k, hidden, dtype=torch.float32, device=x_TH.device)
    for e, sel, _ in groups:
        w2 = _expert_weight(w2_EHI, quant.w2_scale, quant.w2_zp, e, quant, k=inter, gate_rows=None)
        y = a_NI[sel] @ w2.t()
        y_NH[sel] = y if w2_bias_EH is None else y + w2_bias_EH[e].float()
    out_TH = (y_NH.view(num_tokens, top_k, hidden) * topk_weights_TK.float().unsqueeze(-1)).sum(dim=1)
    return out_TH.to(out_dtype)


def _expert_weight(codes_E: torch.Tensor, scale_E: torch.Tensor, zp_E: torch.Tensor | None, e: int,
                   quant: QuantParams, *, k: int, gate_rows: int | None) -> torch.Tensor:
    """Expert ``e``'s weight [N, K] in float32, dequantized from its codes alone (never the whole layer)."""
    if quant.weight_dtype == "mxfp4":
        return dequantize_mxfp4(codes_E[e], scale_E[e])
    if quant.granularity == "group":
        zp = None if zp_E is None else zp_E[e]
        return dequantize_wna16(WNA16Weight(codes_E[e], scale_E[e], zp, quant.bits, quant.group_size, k))
    return dequantize_weight(codes_E[e], scale_E[e], quant.granularity, quant.block_shape, gate_rows=gate_rows)
