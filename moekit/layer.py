"""The MoE layer.

    out = routed_experts(x, select_experts(gate(x))) + shared_experts(x)

``forward`` does exactly that: the router Linear gives logits [T, E]; ``select_experts`` turns them into
top-k weights and ids; ``RoutedExperts`` runs the modular kernel, which receives the shared experts on the call
and adds their output.

Shape legend (used across moekit): T tokens, H hidden, I intermediate per expert, E experts, K top-k,
N = T·K routed rows. ``x_TH`` is [T, H], ``w13_E2IH`` is [E, 2I, H].
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moekit._checks import check_layer_dtype, check_ndim, check_shape, check_tensor
from moekit.config import MoEConfig, ParallelConfig
from moekit.distributed import TensorParallel, determine_expert_map, make_prepare_finalize, parallel_groups
from moekit.kernel import LocalPrepareFinalize
from moekit.quant.base import MoEQuantMethod
from moekit.quant.unquantized import UnquantizedMoEMethod
from moekit.routed_experts import RoutedExperts
from moekit.router import route, select_experts
from moekit.shared_experts import SharedExperts


class MoE(nn.Module):
    """A Mixture-of-Experts layer: router gate + ``RoutedExperts`` + optional ``SharedExperts``.

    ``parallel`` (a ``moekit.ParallelConfig``) spreads the routed experts over the ranks of ``process_group``
    (None: the default group, the ranks of ``torchrun``): each rank holds ``determine_expert_map``'s share and
    calls the layer on its own tokens, every rank on every call (the dispatch is collective), under
    ``torch.no_grad()``/``torch.inference_mode()``. With ``tp_size > 1`` each rank holds a slice of I of its
    experts and the ranks of a TP group (same tokens) sum their outputs with an all-reduce.

    ``forward(hidden_states [..., H], router_logits=None, *, topk_weights=None, topk_ids=None)`` returns
    the same shape and dtype. Give ``router_logits`` [T, E] to skip the gate, or ``topk_weights``/``topk_ids``
    [T, K] to skip routing altogether.
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        quant_method: MoEQuantMethod | None = None,
        parallel: ParallelConfig | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a moekit.MoEConfig, got {type(config).__name__}")
        check_layer_dtype(dtype)
        parallel = ParallelConfig() if parallel is None else parallel
        if not isinstance(parallel, ParallelConfig):
            raise TypeError(f"parallel: expected a moekit.ParallelConfig or None, got {type(parallel).__name__}")
        self.config = config
        self.parallel = parallel
        # Expert parallelism: this rank holds only its experts (global ids map to local ones through expert_map)
        # and the dispatch moves tokens to them; the router and the shared experts are replicated on every rank.
        # Tensor parallelism: each rank of a TP group holds a slice of I of its experts; an all-reduce sums them.
        num_local, inter, expert_map, prepare_finalize = config.num_experts, config.intermediate_size, None, None
        if parallel.tp_size > 1:
            _check_tensor_parallel(config, parallel, quant_method)
            inter //= parallel.tp_size
        if parallel.world_size > 1:
            ep_group, tp_group = parallel_groups(parallel, process_group)
            if parallel.ep_size > 1:
                prepare_finalize = make_prepare_finalize(
                    parallel.dispatch, num_experts=config.num_experts, ep_size=parallel.ep_size,
                    ep_rank=parallel.ep_rank, placement=parallel.placement, group=ep_group,
                )
                num_local, expert_map = determine_expert_map(
                    parallel.ep_size, parallel.ep_rank, config.num_experts, parallel.placement
                )
            if parallel.tp_size > 1:
                prepare_finalize = TensorParallel(prepare_finalize or LocalPrepareFinalize(), tp_size=parallel.tp_size,
                                                  tp_rank=parallel.tp_rank, group=tp_group)
        kw = {"dtype": dtype, "device": device}
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=config.router_bias, **kw)
        if config.routing.correction_bias:
            bias = torch.zeros(config.num_experts, dtype=torch.float32, device=device)
            self.register_buffer("e_score_correction_bias", bias)
        else:
            self.e_score_correction_bias = None
        self.routed_experts = RoutedExperts(
            num_local,
            config.hidden_size,
            inter,
            activation=config.activation,
            bias=config.bias,
            apply_router_weight_on_input=config.routing.apply_weights_on_input,
            quant_method=quant_method,
            expert_map=expert_map,
            backend=config.backend,
            prepare_finalize=prepare_finalize,
            **kw,
        )
        self.shared_experts = None
        if config.has_shared_experts:
            self.shared_experts = SharedExperts(
                config.hidden_size,
                config.shared_intermediate_size,
                activation=config.activation,
                gate=config.shared_expert_gate,
                **kw,
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        layer: int | None = None,
        *,
        prefix: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
        parallel: ParallelConfig | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> MoE:
        """One MoE block of a transformers checkpoint directory, built and loaded from it.

        The config comes from ``config.json`` (``MoEConfig.from_hf``), the quant method from its
        ``quantization_config`` when present (``moekit.quant.get_quant_method``); then ``moekit.loading.load_moe``
        reads the block's tensors only (8-bit codes with their scales, static ``input_scale``) and runs
        ``process_weights_after_loading``.

        Args:
            layer: which MoE block: its decoder layer index (``model.layers.<layer>.mlp``; a dense decoder layer,
                e.g. DeepSeek-V3's first three, is refused naming the sparse ones); optional when there is one.
            prefix: the block's checkpoint prefix instead (``model.layers.3.mlp``).
            dtype: the activation dtype; by default config.json's ``dtype``/``torch_dtype``.
            parallel, process_group: expert parallelism as in ``MoE(config, parallel=..., process_group=...)``;
                only this rank's experts are read from the full checkpoint.
        """
        if cls is not MoE:
            raise TypeError(f"from_pretrained builds a moekit.MoE, not a {cls.__name__}")
        # Imported here: moekit.pretrained builds on this module (loading sits above the modules, never below).
        from moekit.pretrained import from_pretrained

        return from_pretrained(path, layer, prefix=prefix, dtype=dtype, device=device, backend=backend,
                               parallel=parallel, process_group=process_group)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to(dtype)/.half()/.bfloat16() cast every floating buffer, but the correction bias only ranks experts, by
        # differences far below bf16's resolution: keep its fp32 values (on the new device), as the constructor
        # and DeepSeek-V3/vLLM do. A cast to a wider dtype is left alone.
        bias = self.e_score_correction_bias
        result = super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if bias is not None and new is not None and new.is_floating_point() and torch.finfo(new.dtype).bits < 32:
            self.e_score_correction_bias = bias.float().to(new.device)
        return result

    def router_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] for ``x_TH``."""
        if self.config.router_fp32:
            bias = None if self.gate.bias is None else self.gate.bias.float()
            return F.linear(x_TH.float(), self.gate.weight.float(), bias)
        if self.gate.weight.dtype != x_TH.dtype:  # e.g. an fp32 router weight kept in a bf16 checkpoint
            return F.linear(x_TH.to(self.gate.weight.dtype), self.gate.weight, self.gate.bias)
        return self.gate(x_TH)

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor | None = None,
        *,
        topk_weights: torch.Tensor | None = None,
        topk_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        check_tensor("hidden_states", hidden_states)
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != cfg.hidden_size:
            raise ValueError(f"hidden_states: expected shape [..., H={cfg.hidden_size}], got {tuple(hidden_states.shape)}")
        expected = self.routed_experts.params_dtype
        if hidden_states.dtype != expected:
            # Checked against the experts, not the router: an fp32 router (router_fp32) serves bf16 layers.
            raise TypeError(
                f"hidden_states: expected dtype {str(expected).removeprefix('torch.')} (the experts' dtype), "
                f"got {str(hidden_states.dtype).removeprefix('torch.')}"
            )
        x_TH = hidden_states.reshape(-1, cfg.hidden_size)
        num_tokens = x_TH.shape[0]
        precomputed = topk_weights is not None or topk_ids is not None
        if precomputed:
            weights, ids = select_experts(router_logits, cfg.top_k, topk_weights=topk_weights, topk_ids=topk_ids)
            check_shape("topk_ids", ids, (num_tokens, cfg.top_k), f"[T, K] (hidden_states has T={num_tokens})")
        else:
            if router_logits is None:
                router_logits = self.router_logits(x_TH)
            check_ndim("router_logits", router_logits, 2, "[T, E]")
            check_shape("router_logits", router_logits, (num_tokens, cfg.num_experts), "[T, E]")
            weights, ids = route(
                router_logits,
                cfg.top_k,
                cfg.routing,
                e_score_correction_bias=self.e_score_correction_bias,
                hidden_states=x_TH,
            )
        out_TH = self.routed_experts(
            x_TH,
            weights,
            ids,
            shared_experts=self.shared_experts,
            shared_experts_input=x_TH,
            check_ids=precomputed,
        )
        return out_TH.view(hidden_states.shape)


def _check_tensor_parallel(config: MoEConfig, parallel: ParallelConfig, quant_method: MoEQuantMethod | None) -> None:
    if config.intermediate_size % parallel.tp_size:
        raise ValueError(f"parallel.tp_size: expected a divisor of intermediate_size={config.intermediate_size}, got "
                         f"{parallel.tp_size}")
    # Refused rather than approximated: a bias on GEMM 2 would be added once per TP rank, and 8-bit scales (blocks
    # over I) would need slicing of their own.
    if config.bias:
        raise NotImplementedError("parallel.tp_size: tensor-parallel experts with biases are not implemented yet")
    if quant_method is not None and type(quant_method) is not UnquantizedMoEMethod:
        raise NotImplementedError(f"parallel.tp_size: tensor-parallel experts with quant method "
                                  f"{quant_method.name!r} are not implemented yet")
