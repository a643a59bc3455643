"""The seam where quantized weights plug in.

A ``MoEQuantMethod`` owns how a ``RoutedExperts`` layer stores its weights:

    create_weights(layer, ...)            register w13/w2 (and scales, biases) on the layer
    (checkpoint loading through layer.weight_loader)
    process_weights_after_loading(layer)  repack / requantize once, after loading
    apply(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
                                          run the layer's modular kernel with this method's QuantParams

A new weight format (fp8, int8, int4, mxfp4) is one module in this folder that subclasses this base; backends
learn about its scales through ``QuantParams``.
"""

from __future__ import annotations

import contextlib
import contextvars
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from moekit._checks import check_choice, check_tensor
from moekit.quant.params import QuantParams

if TYPE_CHECKING:
    from moekit.kernel import ModularKernel
    from moekit.routed_experts import RoutedExperts

_SHARDS = ("w1", "w2", "w3")  # a checkpoint's gate, down and up projections, as weight loaders name them
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# Integer metadata tensors (GPTQ's g_idx, compressed-tensors' weight_shape) load from any integer dtype.
INDEX_SUFFIXES = ("_g_idx", "_weight_shape")


_FROM_CHECKPOINT = contextvars.ContextVar("moekit_weights_from_checkpoint", default=False)


@contextlib.contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Layers built inside are filled next by a strict load (every routed weight is loaded, or the load raises and
    the layer is dropped), so ``create_weights`` skips the random initialization of float weights: on a CPU it cost
    ~10x the load itself (nn.Linear's uniform init runs at ~0.5 GB/s; ``MoE.from_pretrained`` of a 604 MB bf16
    layer took 1.2 s, 1.1 of them initializing). The weights hold whatever memory held until loaded."""
    token = _FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _FROM_CHECKPOINT.reset(token)


def random_init() -> bool:
    """Whether ``create_weights`` should give float weights random values (False inside
    ``weights_from_checkpoint``)."""
    return not _FROM_CHECKPOINT.get()


class MoEQuantMethod(ABC):
    name: ClassVar[str]
    # Parameters stored in the format's own dtypes (codes, their scales): a cast of the layer (.to(bf16), .half())
    # moves them between devices but never converts them (float8 counts as floating point to torch).
    stored_params: ClassVar[tuple[str, ...]] = ()
    # EPLB weight rearrangement (moekit.distributed.rearrange_expert_weights) moves every [E, ...] tensor of the
    # layer; a method opts in only when that is all of its per-expert state (refused otherwise, by name).
    supports_eplb: ClassVar[bool] = False
    # Parameters that must load with a codes parameter, per (expert, shard): an expert whose codes came through
    # ``RoutedExperts.weight_loader`` without them (an engine that loaded only the ``.weight`` rows) is refused by
    # ``RoutedExperts.process_weights_after_loading`` instead of computing with the scales' initial values.
    companions: ClassVar[dict[str, tuple[str, ...]]] = {}

    @abstractmethod
    def create_weights(
        self,
        layer: RoutedExperts,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        params_dtype: torch.dtype,
        device: torch.device | None,
    ) -> None:
        """Register the layer's weight parameters (``layer.w13``, ``layer.w2``, optional biases, scales)."""

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        """Called once after all weights are loaded; the default keeps them as loaded."""

    def weight_loader_for(self, layer: RoutedExperts, name: str) -> Callable[..., None] | None:
        """The ``weight_loader`` of ``layer``'s parameter ``name`` when it is this method's own rather than the
        layer's (None): torch drops python attributes of a copied parameter (``copy.deepcopy``, pickle), and the
        copied layer attaches them again from here."""
        return None

    def check_tp_split(self, intermediate_size: int, tp_size: int) -> None:
        """Refuse splitting I (the whole layer's ``intermediate_size``) over ``tp_size`` tensor-parallel ranks
        where this format's state (a scale block or group, a packed word) would straddle two ranks. A method that
        does not say how its tensors slice refuses every split rather than be cut wrongly."""
        if tp_size > 1:
            raise NotImplementedError(f"parallel.tp_size: tensor-parallel experts with quant method {self.name!r} "
                                      "are not implemented yet")

    @abstractmethod
    def quant_params(self, layer: RoutedExperts) -> QuantParams:
        """The scales and dtypes the kernel needs for this layer's weights."""

    def kernel_for(self, layer: RoutedExperts, x: torch.Tensor) -> ModularKernel:
        """The modular kernel for this call; by default the layer's (its backend resolved for ``x``'s device)."""
        return layer.kernel_for(x)

    def apply(
        self,
        layer: RoutedExperts,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Callable[[torch.Tensor], torch.Tensor] | None = None,
        shared_experts_input: torch.Tensor | None = None,
        *,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """Routed (+ shared) experts for ``x`` [T, H] through the layer's modular kernel."""
        return self.kernel_for(layer, x).apply(
            x,
            layer.w13,
            layer.w2,
            topk_weights,
            topk_ids,
            activation=layer.activation,
            w13_bias=layer.w13_bias,
            w2_bias=layer.w2_bias,
            expert_map=layer.expert_map,
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            quant=self.quant_params(layer),
            shared_experts=shared_experts,
            shared_experts_input=shared_experts_input,
            check_ids=check_ids,
        )


def replace_float_weights(method: MoEQuantMethod, layer: RoutedExperts,
                          store: Callable[[RoutedExperts, int, str, torch.Tensor], None]) -> None:
    """Swap ``layer``'s unquantized weights for ``method``'s parameters (online quantization): the float weights
    and biases are dropped, ``method.create_weights`` registers its own, ``store(layer, e, name, w)`` writes expert
    ``e``'s float weight ``w`` of ``name`` (``w13`` / ``w2``) into them, one expert at a time (no float copy of the
    layer stays), and the biases are copied back. The layer keeps the float weights' dtype for its activations.
    When ``store`` (or anything here) raises, the layer gets its float parameters back, unchanged."""
    w13, w2 = layer.w13.detach(), layer.w2.detach()
    biases = (layer.w13_bias, layer.w2_bias)
    names = ("w13", "w2", "w13_bias", "w2_bias")
    # The float parameters stay referenced until the end anyway (w13, w2 above): keeping them costs no memory.
    saved_params = dict(layer._parameters)
    saved_attrs = {n: v for n, v in vars(layer).items() if n in names}  # create_weights may set plain attributes
    try:
        for name in names:
            layer._parameters.pop(name, None)
        method.create_weights(layer, num_experts=w13.shape[0], hidden_size=layer.hidden_size,
                              intermediate_size=layer.intermediate_size, params_dtype=w13.dtype, device=w13.device)
        for e in range(w13.shape[0]):
            for name, weight in (("w13", w13[e]), ("w2", w2[e])):
                store(layer, e, name, weight)
        for name, bias in zip(("w13_bias", "w2_bias"), biases):
            if bias is not None:
                getattr(layer, name).data.copy_(bias.detach())
    except BaseException:
        layer._parameters.clear()
        layer._parameters.update(saved_params)
        for name in names:
            vars(layer).pop(name, None)
        vars(layer).update(saved_attrs)
        raise
    layer.quant_method = method
    layer._params_dtype = w13.dtype


def register_weight(layer: RoutedExperts, name: str, data: torch.Tensor,
                    loader: Callable[..., None] | None = None) -> None:
    """Register ``data`` as the frozen parameter ``name`` of ``layer``, with ``loader`` (the layer's own
    ``weight_loader`` when None) as its ``weight_loader``."""
    p = nn.Parameter(data, requires_grad=False)
    p.weight_loader = layer.weight_loader if loader is None else loader  # engines find it on the parameter
    layer.register_parameter(name, p)


def register_biases(layer: RoutedExperts, num_experts: int, rows: int, hidden_size: int, dtype: torch.dtype,
                    device: torch.device | None) -> None:
    """Unquantized ``w13_bias`` [E, rows] / ``w2_bias`` [E, H] in the layer's dtype when it has biases, else None."""
    if not layer.has_bias:
        layer.w13_bias = None
        layer.w2_bias = None
        return
    for name, size in (("w13_bias", rows), ("w2_bias", hidden_size)):
        register_weight(layer, name, torch.zeros(num_experts, size, dtype=dtype, device=device))


@torch.no_grad()
def load_shard(layer: RoutedExperts, name: str, split_dim: int, param: nn.Parameter, loaded_weight: torch.Tensor,
               shard_id: str, expert_id: int) -> None:
    """Copy one expert's checkpoint tensor of shard ``shard_id`` into ``param`` (``name``): w1 / w3 into the first /
    second half of a w13 parameter along ``split_dim`` (N) when gated, w2 into the w2 parameter. Codes load only
    from their own dtype, scales from any float dtype that the parameter's holds exactly."""
    check_choice("shard_id", shard_id, _SHARDS)
    check_tensor("loaded_weight", loaded_weight)
    is_w2 = name.startswith("w2")
    if (shard_id == "w2") != is_w2:
        raise ValueError(f"shard_id: {shard_id!r} does not load into {name!r} (w1/w3 -> w13*, w2 -> w2*)")
    gated = layer.activation.is_gated
    if shard_id == "w3" and not gated:
        raise ValueError(f"shard_id: 'w3' (up) does not exist for the non-gated activation {layer.activation.name!r}")
    slots = layer._local_slots(expert_id)
    for slot in slots:
        dest = param.data[slot]
        if not is_w2 and gated:
            half = dest.shape[split_dim] // 2
            dest = dest.narrow(split_dim, 0 if shard_id == "w1" else half, half)
        if tuple(loaded_weight.shape) != tuple(dest.shape):
            raise ValueError(f"loaded_weight: expected shape {tuple(dest.shape)} for {name}[{expert_id}] shard "
                             f"{shard_id!r}, got {tuple(loaded_weight.shape)}")
        refusal = loaded_dtype_refusal(dest.dtype, loaded_weight, index=name.endswith(INDEX_SUFFIXES))
        if refusal is not None:
            raise refusal_error(refusal, "loaded_weight", f"{name}[{expert_id}] shard {shard_id!r}", name,
                                dest.dtype, loaded_weight.dtype, layer.quant_method.name)
        dest.copy_(loaded_weight)
    if slots:  # what process_weights_after_loading checks against ``companions``
        layer.record_loaded(name, expert_id, shard_id)


def loaded_dtype_refusal(dest_dtype: torch.dtype, loaded: torch.Tensor, *, index: bool = False) -> str | None:
    """Why ``loaded`` may not be copied into a quant method's stored tensor of ``dest_dtype`` (None: it may):
    ``"dtype"`` when codes would load from another dtype (``copy_`` would turn codes into values, or the other
    way; integer metadata, ``index``, loads from any integer dtype), ``"inexact"`` when a float scale holds values
    ``dest_dtype`` cannot hold exactly (scales are never rounded). Every entry point that writes stored tensors
    (the weight loaders, ``load_state_dict``) refuses the same inputs through it."""
    scale = dest_dtype in _FLOATS  # float8 is floating point to torch, but codes here
    if scale:
        ok = loaded.dtype in _FLOATS
    elif index:
        ok = not loaded.dtype.is_floating_point
    else:
        ok = loaded.dtype == dest_dtype
    if not ok:
        return "dtype"
    if scale and loaded.dtype != dest_dtype and loaded.device.type != "meta":  # meta: no values to compare
        # A NaN is held (as a NaN): refusing it is the value checks' job, with their message.
        if not torch.allclose(loaded.to(dest_dtype).to(loaded.dtype), loaded, rtol=0, atol=0, equal_nan=True):
            return "inexact"
    return None


def refusal_error(refusal: str, where: str, what: str, name: str, dest_dtype: torch.dtype,
                  loaded_dtype: torch.dtype, method: str) -> Exception:
    """The error for ``loaded_dtype_refusal``'s ``refusal``, naming ``where`` (the argument or state-dict key),
    ``what`` was being loaded and parameter ``name`` of quant method ``method``."""
    dest, loaded = _dtype_name(dest_dtype), _dtype_name(loaded_dtype)
    if refusal == "dtype":
        return TypeError(f"{where}: expected dtype {dest} for {name} (quant method {method!r}), got {loaded}")
    return ValueError(f"{where}: {what} holds {loaded} values that {dest} cannot hold exactly; build the layer "
                      "with a dtype that holds them (scales are never rounded)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
