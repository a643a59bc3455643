"""Triton experts backend: align -> grouped GEMM 1 (+ activation) -> grouped GEMM 2 (+ weight) -> top-k sum.

Shapes: T tokens, K top-k, N = T·K routed rows, E local experts, H hidden, I intermediate, S split-K partials.

    topk_ids_TK ──align──▶ sorted_ids, expert_ids, num_padded        (one launch at decode sizes; none at T = 1)
    x_TH ──grouped_gemm(w13, act, b13)──▶ a_NI                        (gate and up never leave registers)
    a_NI ──grouped_gemm(w2, b2, · topk_weights)──▶ y_SNH              (fp32 or activation dtype; see heuristics)
    y_SNH ──topk_reduce──▶ out_TH                                     (fixed order: deterministic)

At decode on small experts (``MoEKernelConfig.fused``: float weights, N <= 32, I <= 1024) both GEMMs run in one
launch instead, a program per (routed row, slice of I) writing GEMM 2's partial sums over I for the same top-k
reduction (``moekit.ops.fused_decode``): two launches, no align, no [N, I] intermediate in memory.

Every launch has a grid sized from (N, E, H, I) alone and reads the number of padded rows from the device, so
the whole call is capturable in a CUDA graph. Intermediates live in one cached workspace per (device, stream)
(a fresh allocation only while capturing, where the graph's private pool owns it). Under ``torch.compile`` the
call goes through the ``moekit::fused_experts`` custom op (``moekit.kernel.custom_op``) so it is a single opaque node.
Gradients: ``backward`` (grouped GEMMs over the same layout, plus ``grouped_wgrad`` for the weights).

8-bit experts (fp8 e4m3 / int8 weights, activations quantized in the same dtype: ``QuantParams``) run the same
pipeline on codes (``_run_w8a8``): ``prepare`` hands over x's codes and scales, GEMM 1 writes the activation's
output in fp32, ``act_quant`` quantizes it with the scheme's activation granularity, GEMM 2 reads those codes.

Weight-only 4/8-bit experts (int4/int8 codes with group scales and optional zero points, activations in the
layer's dtype: w4a16, w8a16; and mxfp4: e2m1 codes with e8m0 scales per 32) run the float pipeline above,
workspace included (``_run_float``), with ``grouped_gemm_wna16`` in place of ``grouped_gemm``: the codes are
dequantized to the activation dtype inside each GEMM's K loop and never exist dequantized in memory. Tiles come
from ``choose_config`` under the scheme's name.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only where triton is missing
    raise ImportError("the triton experts backend needs the triton package (pip install moekit[triton])") from exc

from moekit.kernel import triton_interpreting
from moekit.kernel.experts import Experts, Grads
from moekit.ops.activation import Activation
from moekit.ops.act_quant import act_quant
from moekit.ops.activation_backward import activation_backward
from moekit.ops.align import AlignResult, align, align_num_blocks, align_workspace_elems, row_per_block
from moekit.ops.fused_decode import fused_decode, fused_decode_slices
from moekit.ops.gluon_wna16 import gluon_decode
from moekit.ops.grouped_gemm import grouped_gemm
from moekit.ops.grouped_gemm_w8a8 import grouped_gemm_w8a8
from moekit.ops.grouped_gemm_wna16 import MXFP4Weight, grouped_gemm_wna16
from moekit.ops.grouped_wgrad import grouped_wgrad
from moekit.ops.heuristics import MoEKernelConfig, MoEShape, choose_config, gpu_name
from moekit.ops.quantize import QDTYPES, native_8bit_dots
from moekit.ops.quantize_wna16 import WNA16Weight
from moekit.ops.reduce import topk_reduce
from moekit.quant.params import MX_DTYPES, UNQUANTIZED, QuantParams

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Workspaces kept per instance, one per (device, stream), least recently used dropped first.
_MAX_WORKSPACES = 4


class TritonExperts(Experts):
    """Stateless apart from its workspace cache, so one instance serves every layer.

    ``config`` pins a launch configuration for every call (tests, tuning); None picks one per call from
    ``moekit.ops.heuristics.choose_config``.

    Eager calls on one stream share one workspace (they run in order); each stream gets its own, so layers
    running concurrently on several streams never share scratch memory — also under ``torch.compile``, where
    every call goes through one shared instance. Inside a CUDA graph every call gets memory from the graph's pool.
    """

    name = "triton"

    def __init__(self, config: MoEKernelConfig | None = None) -> None:
        self.config = config
        # (device, stream id) -> bytes. Keyed by stream too: a buffer reused by a call on another stream could be
        # overwritten while the first stream's kernels still read it.
        self._workspace: dict[tuple[torch.device, int], torch.Tensor] = {}

    def check_supported(self, hidden_states: torch.Tensor, quant: QuantParams) -> None:
        """Unquantized fp16/bf16/fp32; weight-only int4/int8 with group scales and mxfp4 (``QuantParams``
        granularity ``group``, activations fp16/bf16/fp32); and 8-bit weights (fp8_e4m3/int8, any granularity) with
        activations quantized in the weights' dtype (``hidden_states`` then holds their codes)."""
        if quant.granularity == "group":
            # QuantParams admits only int4/int8 codes or mxfp4 without an activation dtype here:
            # grouped_gemm_wna16 runs them all (a group size no K tile fits is refused by the op, naming it).
            if hidden_states.dtype not in _DTYPES:
                raise ValueError(f"backend 'triton': {quant.scheme} weights ({quant.describe()}) need hidden_states "
                                 f"in {list(_DTYPES)}, got {hidden_states.dtype}")
        elif quant.is_quantized:
            if (quant.weight_dtype not in QDTYPES or quant.granularity is None
                    or quant.act_dtype != quant.weight_dtype):
                raise ValueError(f"backend 'triton': quantized weights ({quant.describe()}) are not supported: it runs "
                                 f"{list(QDTYPES)} weights with activations quantized in the same dtype; backend "
                                 "'torch' runs the others")
            if hidden_states.dtype != QDTYPES[quant.weight_dtype]:
                raise ValueError(f"backend 'triton': expected hidden_states as {QDTYPES[quant.weight_dtype]} codes "
                                 f"for {quant.describe()}, got {hidden_states.dtype}")
            device = hidden_states.device
            if device.type == "cuda" and not native_8bit_dots(quant.weight_dtype, device):
                raise ValueError("backend 'triton': fp8 e4m3 dots need compute capability 8.9 or newer (Ada, "
                                 f"Hopper), got {torch.cuda.get_device_capability(device)}")
        else:
            super().check_supported(hidden_states, quant)
            if hidden_states.dtype not in _DTYPES:
                raise ValueError(f"backend 'triton': expected hidden_states in {list(_DTYPES)}, "
                                 f"got {hidden_states.dtype}")
        if hidden_states.device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend 'triton': needs a CUDA device (or TRITON_INTERPRET=1), got {hidden_states.device}"
            )
        if hidden_states.device.type != "cuda" and hidden_states.dtype == torch.bfloat16:
            # Triton's interpreter computes bf16 tl.dot wrongly (outputs ~1e10, no error). 8-bit experts never get
            # here with bf16: their hidden_states are codes by now.
            raise ValueError(f"backend 'triton': hidden_states in bfloat16 on {hidden_states.device} "
                             "(TRITON_INTERPRET=1): the Triton interpreter computes bf16 dots wrongly; use "
                             "float16/float32 there, or backend 'torch'")

    @property
    def op_backend(self) -> str | None:
        # The custom op runs the registry's shared instance: a pinned config is honoured only by tracing run.
        return "triton" if self.config is None else None

    def run(
        self,
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
        quant: QuantParams = UNQUANTIZED,
        hidden_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The pipeline of the module docstring, for validated inputs (``Experts.apply``'s contract)."""
        if quant.granularity == "group":
            # Weight-only int4/int8 groups and mxfp4: the float pipeline with the codes dequantized inside the
            # GEMMs' K loop.
            if quant.weight_dtype in MX_DTYPES:
                b13, b2 = MXFP4Weight(w13_E2IH, quant.w13_scale), MXFP4Weight(w2_EHI, quant.w2_scale)
            else:
                inter = w13_E2IH.shape[1] // (2 if activation.is_gated else 1)
                b13 = WNA16Weight(w13_E2IH, quant.w13_scale, quant.w13_zp, quant.bits, quant.group_size,
                                  x_TH.shape[1])
                b2 = WNA16Weight(w2_EHI, quant.w2_scale, quant.w2_zp, quant.bits, quant.group_size, inter)
            return self._run_float(x_TH, b13, b2, topk_weights_TK, topk_ids_TK, activation=activation,
                                   w13_bias_E2I=w13_bias_E2I, w2_bias_EH=w2_bias_EH, expert_map_E=expert_map_E,
                                   out_dtype=out_dtype, quant=quant)
        if quant.is_quantized:
            return self._run_w8a8(
                x_TH, w13_E2IH, w2_EHI, topk_weights_TK, topk_ids_TK, activation=activation,
                w13_bias_E2I=w13_bias_E2I, w2_bias_EH=w2_bias_EH, expert_map_E=expert_map_E, out_dtype=out_dtype,
                quant=quant, hidden_scale=hidden_scale,
            )
        return self._run_float(x_TH, w13_E2IH, w2_EHI, topk_weights_TK, topk_ids_TK, activation=activation,
                               w13_bias_E2I=w13_bias_E2I, w2_bias_EH=w2_bias_EH, expert_map_E=expert_map_E,
                               out_dtype=out_dtype, quant=quant)

    def _run_float(
        self,
        x_TH: torch.Tensor,
        w13: torch.Tensor | WNA16Weight | MXFP4Weight,
        w2: torch.Tensor | WNA16Weight | MXFP4Weight,
        topk_weights_TK: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        *,
        activation: Activation,
        w13_bias_E2I: torch.Tensor | None,
        w2_bias_EH: torch.Tensor | None,
        expert_map_E: torch.Tensor | None,
        out_dtype: torch.dtype,
        quant: QuantParams,
    ) -> torch.Tensor:
        """Float activations through both GEMMs: float weights ``w13_E2IH``/``w2_EHI`` (``grouped_gemm``) or
        weight-only integer codes as ``WNA16Weight`` or mxfp4 codes as ``MXFP4Weight`` (``grouped_gemm_wna16``,
        same layout and epilogues)."""
        wna16 = isinstance(w13, (WNA16Weight, MXFP4Weight))
        gemm = grouped_gemm_wna16 if wna16 else grouped_gemm
        w13_rows = (w13.qweight if wna16 else w13).shape[1]
        num_experts, hidden = (w2.qweight if wna16 else w2).shape[:2]
        inter = w13_rows // (2 if activation.is_gated else 1)
        num_tokens = x_TH.shape[0]
        top_k = topk_ids_TK.shape[1]
        num_rows = num_tokens * top_k
        out_TH = torch.empty((num_tokens, hidden), dtype=out_dtype, device=x_TH.device)
        if num_tokens == 0:
            return out_TH
        cfg = self._config(x_TH, top_k, (num_experts, hidden, inter), activation, quant)
        x_TH = x_TH if x_TH.stride(-1) == 1 else x_TH.contiguous()
        # The kernels index routing, biases and the expert map as flat dense arrays; copies only for odd views.
        topk_ids_TK, topk_weights_TK = topk_ids_TK.contiguous(), topk_weights_TK.contiguous()
        w13_bias_E2I = None if w13_bias_E2I is None else w13_bias_E2I.contiguous()
        w2_bias_EH = None if w2_bias_EH is None else w2_bias_EH.contiguous()
        expert_map_E = None if expert_map_E is None else expert_map_E.contiguous()
        if cfg.fused is not None and not wna16:
            # Decode: both GEMMs in one launch per (routed row, slice of I), then the reduction.
            y_dtype = torch.float32 if cfg.y_fp32 else x_TH.dtype
            shape = (fused_decode_slices(inter, cfg.fused), num_rows, hidden)
            (y_SNH,) = _carve(self._buffer(x_TH.device, _numel(shape) * _elem_size(y_dtype) + 256),
                              [(y_dtype, shape)])
            fused_decode(x_TH, w13, w2, topk_weights_TK, topk_ids_TK, y_SNH, cfg.fused, activation=activation,
                         w13_bias_E2I=w13_bias_E2I, w2_bias_EH=w2_bias_EH, expert_map_E=expert_map_E)
            return topk_reduce(y_SNH, top_k, out_TH, topk_ids_TK=topk_ids_TK, expert_map=expert_map_E,
                               num_experts=num_experts)
        split = cfg.gemm2.split_k
        y_dtype = torch.float32 if cfg.y_fp32 else x_TH.dtype
        num_blocks = align_num_blocks(num_rows, num_experts, cfg.block_m)
        ws = _carve(
            self._buffer(
                x_TH.device,
                4 * (num_blocks * cfg.block_m + num_blocks + 1 + align_workspace_elems(num_rows, num_experts, cfg.block_m))
                + num_rows * inter * x_TH.element_size()
                + split * num_rows * hidden * _elem_size(y_dtype)
                + 5 * 256,  # alignment slack of the five pieces
            ),
            [
                (torch.int32, (num_blocks * cfg.block_m,)),
                (torch.int32, (num_blocks,)),
                (torch.int32, (1,)),
                (torch.int32, (align_workspace_elems(num_rows, num_experts, cfg.block_m),)),
                (x_TH.dtype, (num_rows, inter)),
                (y_dtype, (split, num_rows, hidden)),
            ],
        )
        sorted_ids, expert_ids, num_padded, scratch, a_NI, y_SNH = ws
        if num_tokens == 1 and expert_map_E is None:
            # One token routes to K distinct experts: each routed row is its own block, no align launch.
            layout = row_per_block(topk_ids_TK, cfg.block_m)
        else:
            layout = align(
                topk_ids_TK, num_experts, cfg.block_m, expert_map=expert_map_E,
                out=AlignResult(sorted_ids=sorted_ids, expert_ids=expert_ids, num_padded=num_padded,
                                block_m=cfg.block_m),
                scratch=scratch,
            )
        gemm(
            x_TH, w13, layout, a_NI, cfg.gemm1,
            num_rows=num_rows, a_row_div=top_k, bias_EN=w13_bias_E2I, activation=activation,
        )
        gemm(
            a_NI, w2, layout, y_SNH if split > 1 else y_SNH[0], cfg.gemm2,
            num_rows=num_rows, bias_EN=w2_bias_EH, weights_N=topk_weights_TK.reshape(-1),
        )
        return topk_reduce(
            y_SNH, top_k, out_TH, topk_ids_TK=topk_ids_TK, expert_map=expert_map_E, num_experts=num_experts,
        )

    def _run_w8a8(
        self,
        xq_TH: torch.Tensor,
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
        """8-bit experts: ``xq_TH`` holds x's codes and ``hidden_scale`` their scales (``prepare``).

        Intermediates are allocated per call (no cached workspace yet; inside a CUDA graph they come from the
        graph's pool). GEMM 1's output stays fp32 until it is quantized, as in the torch backend and the reference.
        """
        num_tokens, hidden = xq_TH.shape
        top_k = topk_ids_TK.shape[1]
        num_experts, _, inter = w2_EHI.shape
        num_rows = num_tokens * top_k
        device = xq_TH.device
        out_TH = torch.empty((num_tokens, hidden), dtype=out_dtype, device=device)
        if num_tokens == 0:
            return out_TH
        cfg = self._config(xq_TH, top_k, w2_EHI.shape, activation, quant)
        xq_TH = xq_TH.contiguous()
        topk_ids_TK, topk_weights_TK = topk_ids_TK.contiguous(), topk_weights_TK.contiguous()
        w13_bias_E2I = None if w13_bias_E2I is None else w13_bias_E2I.contiguous()
        w2_bias_EH = None if w2_bias_EH is None else w2_bias_EH.contiguous()
        expert_map_E = None if expert_map_E is None else expert_map_E.contiguous()
        if num_tokens == 1 and expert_map_E is None:
            layout = row_per_block(topk_ids_TK, cfg.block_m)
        else:
            layout = align(topk_ids_TK, num_experts, cfg.block_m, expert_map=expert_map_E)
        gran, act_gran, group = quant.granularity, quant.act_granularity, quant.act_group_size
        scales = {"w13": quant.w13_scale.contiguous(), "w2": quant.w2_scale.contiguous()}
        x_scale = hidden_scale.float().reshape(1) if gran == "tensor" else hidden_scale.float().contiguous()
        # Rows of other ranks' experts are never written by GEMM 1 but act_quant reads every row: zeros, not stale
        # memory (which a per-tensor amax would take in, and whose inf/NaN bit patterns the quantizer would
        # chew on for nothing).
        alloc = torch.zeros if expert_map_E is not None else torch.empty
        a_NI = alloc((num_rows, inter), dtype=torch.float32, device=device)
        grouped_gemm_w8a8(
            xq_TH, x_scale, w13_E2IH, scales["w13"], layout, a_NI, cfg.gemm1, granularity=gran,
            block_shape=quant.block_shape, num_rows=num_rows, a_row_div=top_k, bias_EN=w13_bias_E2I,
            activation=activation,
        )
        aq_NI, a_scale = act_quant(a_NI, quant.act_dtype, act_gran, group, static_scale=quant.a2_scale)
        del a_NI
        split = cfg.gemm2.split_k
        y_SNH = torch.empty((split, num_rows, hidden), dtype=torch.float32, device=device)
        grouped_gemm_w8a8(
            aq_NI, a_scale.reshape(-1) if gran == "tensor" else a_scale, w2_EHI, scales["w2"], layout,
            y_SNH if split > 1 else y_SNH[0], cfg.gemm2, granularity=gran, block_shape=quant.block_shape,
            num_rows=num_rows, bias_EN=w2_bias_EH, weights_N=topk_weights_TK.reshape(-1),
        )
        return topk_reduce(
            y_SNH, top_k, out_TH, topk_ids_TK=topk_ids_TK, expert_map=expert_map_E, num_experts=num_experts,
        )

    def backward(
        self,
        grad_out_TH: torch.Tensor,
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
        needs: Sequence[bool],
    ) -> Grads:
        """Gradients of the forward (``Experts.backward``), as grouped GEMMs over the forward's row layout.

        With g = dout[t] @ w2[e] (GEMM 1's shape, w2 read transposed) and h recomputed by GEMM 1 without its
        activation (the forward keeps no intermediates, so inference pays nothing for training):

            d topk_weights[n] = g[n] · a[n] + dout[t] · b2[e]          (= dout[t] · y[n], y before weighting)
            dh[n]  = act'(h[n]) ⊙ (topk_weights[n] · g[n])
            dx[t]  = sum_k dh[n] @ w13[e]                              (GEMM 2's shape + the top-k reduction)
            dw2[e] = sum_n (topk_weights[n] · dout[t])^T a[n],  db2[e] = sum_n topk_weights[n] · dout[t]
            dw13[e] = sum_n dh[n]^T x[t],                       db13[e] = sum_n dh[n]      (grouped_wgrad)
        """
        need_x, need_w13, need_w2, need_tw, need_b13, need_b2 = (bool(n) for n in needs)
        num_tokens, hidden = x_TH.shape
        top_k = topk_ids_TK.shape[1]
        num_experts, _, inter = w2_EHI.shape
        rows13 = w13_E2IH.shape[1]
        num_rows = num_tokens * top_k
        dtype, device = x_TH.dtype, x_TH.device
        f32 = {"dtype": torch.float32, "device": device}
        like = (x_TH, w13_E2IH, w2_EHI, topk_weights_TK, w13_bias_E2I, w2_bias_EH)
        if num_rows == 0:
            return tuple(torch.zeros(t.shape, dtype=t.dtype, device=device) if need and t is not None else None
                         for t, need in zip(like, needs))
        # Dense outputs (the kernels write them whole), also for strided views of the inputs. grouped_wgrad
        # computes a weight's gradient with its bias's, so it gets a buffer when either is wanted.
        wanted = (need_x, need_w13 or need_b13, need_w2 or need_b2, False, need_b13, need_b2)
        dx, dw13, dw2, dtw, db13, db2 = (torch.empty(t.shape, dtype=t.dtype, device=device) if want else None
                                         for t, want in zip(like, wanted))
        cfg = self._config(x_TH, top_k, w2_EHI.shape, activation)
        x_TH = x_TH.contiguous()
        dout_TH = grad_out_TH.to(dtype).contiguous()
        topk_ids_TK = topk_ids_TK.contiguous()
        w_N = topk_weights_TK.reshape(-1).float().contiguous()
        w13_bias_E2I = None if w13_bias_E2I is None else w13_bias_E2I.contiguous()
        expert_map_E = None if expert_map_E is None else expert_map_E.contiguous()
        # Always the general layout (no row-per-block shortcut at T = 1: the backward is not latency-bound). Its
        # blocks are grouped_wgrad's reduction step, where 64 rows beat 128 on an H200 by 20-25% (mixtral/qwen3
        # dW13 at T = 4096: 309 vs 244, 232 vs 169 TFLOP/s) while the GEMMs keep the forward's block size.
        layout = align(topk_ids_TK, num_experts, cfg.block_m, expert_map=expert_map_E)
        wgrad_layout = layout
        if cfg.block_m > 64:
            wgrad_layout = align(topk_ids_TK, num_experts, 64, expert_map=expert_map_E)
        # Without an expert map every routed row is written; with one, zeros keep remote rows out of every sum.
        alloc = torch.empty if expert_map_E is None else torch.zeros
        h_NR = alloc(num_rows, rows13, **f32)
        grouped_gemm(x_TH, w13_E2IH, layout, h_NR, cfg.gemm1, num_rows=num_rows, a_row_div=top_k,
                     bias_EN=w13_bias_E2I)
        g_NI = alloc(num_rows, inter, **f32)
        grouped_gemm(dout_TH, w2_EHI.transpose(1, 2), layout, g_NI, cfg.gemm1, num_rows=num_rows, a_row_div=top_k)
        a_NI, dh_NR, dtw_N = activation_backward(h_NR, g_NI, w_N, activation, a_dtype=dtype, dh_dtype=dtype)
        del h_NR, g_NI  # fp32 [N, 2I] and [N, I]: freed before the dx and weight-gradient GEMMs
        if need_tw:
            if w2_bias_EH is not None:
                local_N = topk_ids_TK.reshape(-1).long()
                if expert_map_E is not None:
                    local_N = expert_map_E.long()[local_N]
                dot_TE = dout_TH.float() @ w2_bias_EH.float().t()  # dout[t] · b2[e] for every local e
                dot_N = dot_TE.repeat_interleave(top_k, dim=0).gather(1, local_N.clamp_min(0)[:, None])[:, 0]
                dtw_N = dtw_N + torch.where(local_N >= 0, dot_N, 0.0)
            dtw = dtw_N.view(num_tokens, top_k).to(topk_weights_TK.dtype)
        if need_x:
            split = cfg.gemm2.split_k
            y_SNH = torch.empty(split, num_rows, hidden, **f32)
            grouped_gemm(dh_NR, w13_E2IH.transpose(1, 2), layout, y_SNH if split > 1 else y_SNH[0], cfg.gemm2,
                         num_rows=num_rows)
            topk_reduce(y_SNH, top_k, dx, topk_ids_TK=topk_ids_TK, expert_map=expert_map_E, num_experts=num_experts)
        if dw2 is not None:
            grouped_wgrad(dout_TH, a_NI, wgrad_layout, dw2, num_rows=num_rows, g_row_div=top_k, weights_N=w_N,
                          bias_grad_EN=db2)
        if dw13 is not None:
            grouped_wgrad(dh_NR, x_TH, wgrad_layout, dw13, num_rows=num_rows, x_row_div=top_k, bias_grad_EN=db13)
        return dx, dw13 if need_w13 else None, dw2 if need_w2 else None, dtw, db13, db2

    def _config(self, x_TH: torch.Tensor, top_k: int, dims: tuple[int, int, int], activation: Activation,
                quant: QuantParams = UNQUANTIZED) -> MoEKernelConfig:
        """The pinned config, else ``choose_config`` for ``dims`` = (E, H, I) and ``quant``'s scheme."""
        num_experts, hidden, inter = dims
        return self.config or choose_config(
            MoEShape(
                num_tokens=x_TH.shape[0], top_k=top_k, num_experts=num_experts, hidden=hidden, inter=inter,
                gated=activation.is_gated, num_sms=_num_sms(x_TH.device), elem_bytes=x_TH.element_size(),
                gpu=gpu_name(x_TH.device),  # the tables of the card the call runs on, also on mixed hosts
                weights=quant.scheme if quant.is_quantized else str(x_TH.dtype).removeprefix("torch."),
                gluon=gluon_decode(x_TH.device, x_TH.dtype),
            )
        )

    def _buffer(self, device: torch.device, nbytes: int) -> torch.Tensor:
        if _capturing(device):
            # A graph keeps the addresses it captured: the cached buffer, once grown by a later eager call, would
            # be freed under it. Memory taken while capturing comes from the graph's own pool instead (and costs
            # nothing at replay).
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
        cached = self._workspace.pop(key, None)
        if cached is None or cached.numel() < nbytes:
            # Allocated on the current stream, so the caching allocator recycles a grown-out buffer only after
            # this stream's pending kernels.
            cached = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._workspace[key] = cached  # most recently used last
        if len(self._workspace) > _MAX_WORKSPACES:
            # A buffer is freed into its own stream's pool, which reuses it only after that stream's pending
            # kernels, so dropping the least recently used one is safe; it bounds memory when callers cycle
            # through many streams.
            self._workspace.pop(next(iter(self._workspace)))
        return cached


def _carve(buf: torch.Tensor, pieces: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
    """Views of ``buf`` with the given dtypes and shapes, each starting on a 256-byte boundary."""
    views, offset = [], 0
    for dtype, shape in pieces:
        offset = -(-offset // 256) * 256
        nbytes = _numel(shape) * _elem_size(dtype)
        views.append(buf[offset : offset + nbytes].view(dtype).view(shape))
        offset += nbytes
    return views


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel


def _elem_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any plausible value
    return torch.cuda.get_device_properties(device).multi_processor_count


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()

