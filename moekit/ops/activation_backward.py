"""Backward of the expert activation, fused with what the MoE backward needs around it.

Shapes: N routed rows, I intermediate; ``h_NR`` is GEMM 1's output before the activation (R = 2I gated, I for
``relu2``), ``g_NI`` the gradient reaching the activation's output before the routing weight (dout @ w2[e]).

    a[n]  = act(h[n])                               rounded to ``a_dtype`` (what GEMM 2 of the forward read)
    dh[n] = act'(h[n]) ⊙ (weights[n] · g[n])         in ``dh_dtype``
    dw[n] = sum_i g[n, i] · a[n, i]                 fp32: d topk_weights[n] before the output bias term

One pass over h and g in place of a dozen elementwise torch kernels. A clamp (clamped silu, swigluoai) passes the
gradient where its input lies within the bounds (inclusive), as torch's clamp does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit._checks import check_ndim, check_shape
from moekit.ops._kernels.activation_backward import activation_backward_kernel
from moekit.ops.activation import Activation, activation_code, resolve_activation

_BLOCK_R = 4  # rows per program: several rows share the loop over I and keep the row-sum in registers


def activation_backward(
    h_NR: torch.Tensor,
    g_NI: torch.Tensor,
    weights_N: torch.Tensor,
    activation: str | Activation,
    *,
    a_dtype: torch.dtype,
    dh_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a [N, I] a_dtype, dh [N, R] dh_dtype, dw [N] fp32)`` as the module docstring defines them (Triton)."""
    act = resolve_activation(activation)
    inter = _check(h_NR, g_NI, weights_N, act)
    num_rows = h_NR.shape[0]
    h_NR, g_NI, weights_N = h_NR.contiguous(), g_NI.contiguous(), weights_N.contiguous()
    a_NI = torch.empty(num_rows, inter, dtype=a_dtype, device=h_NR.device)
    dh_NR = torch.empty(h_NR.shape, dtype=dh_dtype, device=h_NR.device)
    dw_N = torch.empty(num_rows, dtype=torch.float32, device=h_NR.device)
    if num_rows == 0 or inter == 0:
        return a_NI, dh_NR, dw_N.zero_()
    block_i = min(256, max(16, 1 << (inter - 1).bit_length()))
    activation_backward_kernel[(-(-num_rows // _BLOCK_R),)](
        h_NR, g_NI, weights_N, a_NI, dh_NR, dw_N,
        num_rows, inter, h_NR.stride(0), g_NI.stride(0), a_NI.stride(0), dh_NR.stride(0),
        act.alpha, act.limit if act.limit is not None else 0.0,
        ACTIVATION=activation_code(act), GATED=act.is_gated, BLOCK_R=_BLOCK_R, BLOCK_I=block_i, num_warps=4,
    )
    return a_NI, dh_NR, dw_N


def activation_backward_ref(
    h_NR: torch.Tensor,
    g_NI: torch.Tensor,
    weights_N: torch.Tensor,
    activation: str | Activation,
    *,
    a_dtype: torch.dtype,
    dh_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch twin of ``activation_backward`` (the derivatives written out: it runs below autograd, inside the
    backward custom op)."""
    act = resolve_activation(activation)
    _check(h_NR, g_NI, weights_N, act)
    h = h_NR.float()
    g = g_NI.float()
    da = g * weights_N.float()[:, None]
    if not act.is_gated:  # relu2: relu(h)^2
        r = F.relu(h)
        a = r.square().to(a_dtype)
        return a, (2.0 * r * da).to(dh_dtype), (g * a.float()).sum(dim=-1)
    gate, up = h.chunk(2, dim=-1)
    d_gate_mask = d_up_mask = None
    if act.limit is not None:
        d_gate_mask = gate <= act.limit
        d_up_mask = (up >= -act.limit) & (up <= act.limit)
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
    if act.name == "swigluoai":
        s = torch.sigmoid(act.alpha * gate)
        glu = gate * s
        a = glu * (up + 1)
        d_gate = (up + 1) * (s + act.alpha * glu * (1 - s))
        d_up = glu
    else:
        if act.name == "silu":
            s = torch.sigmoid(gate)
            f, df = gate * s, s * (1 + gate * (1 - s))
        elif act.name == "gelu":
            cdf = 0.5 * (1 + torch.erf(gate * 0.7071067811865476))
            f, df = gate * cdf, cdf + gate * torch.exp(-0.5 * gate.square()) * 0.3989422804014327
        else:  # gelu_tanh
            c = 0.7978845608028654
            t = torch.tanh(c * (gate + 0.044715 * gate.pow(3)))
            f = 0.5 * gate * (1 + t)
            df = 0.5 * (1 + t) + 0.5 * gate * (1 - t.square()) * c * (1 + 3 * 0.044715 * gate.square())
        a = f * up
        d_gate = up * df
        d_up = f
    if d_gate_mask is not None:
        d_gate = torch.where(d_gate_mask, d_gate, 0.0)
        d_up = torch.where(d_up_mask, d_up, 0.0)
    a = a.to(a_dtype)
    dh = torch.cat([da * d_gate, da * d_up], dim=-1).to(dh_dtype)
    return a, dh, (g * a.float()).sum(dim=-1)


def _check(h_NR: torch.Tensor, g_NI: torch.Tensor, weights_N: torch.Tensor, act: Activation) -> int:
    check_ndim("h_NR", h_NR, 2, "[N, R]")
    num_rows, rows = h_NR.shape
    if act.is_gated and rows % 2:
        raise ValueError(f"h_NR: gated activation {act.name!r} needs an even last dim 2I, got shape {tuple(h_NR.shape)}")
    inter = rows // 2 if act.is_gated else rows
    check_shape("g_NI", g_NI, (num_rows, inter), "[N, I]")
    check_shape("weights_N", weights_N, (num_rows,), "[N]")
    return inter
