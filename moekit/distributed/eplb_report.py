"""``moekit eplb``: plan EPLB from a recorded load file or a synthetic skew, and show what it buys.

    load [L, E] (read_expert_load, or synthetic_load) ──make_plan──▶ EplbPlan ──format_plan──▶ text
                                                                             └──plot_plan──▶ PNG

"Before" is the placement without EPLB: the E logical experts split contiguously over the ranks, the first
E % ranks ranks holding one more (vLLM's linear expert map). "After" is ``rebalance_experts``' plan, each replica
carrying an even share of its expert's load. Balancedness is max / mean of the per-rank loads of a layer (1.00 =
even; the slowest rank sets the pace of the layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.distributed.eplb import rebalance_experts

__all__ = ["EplbPlan", "InputError", "format_plan", "linear_rank_loads", "load_from_args", "make_plan", "pick_layer",
           "plot_plan", "synthetic_load"]


class InputError(Exception):
    """A mistake in what the user asked for, worded with the command's flags (the CLI answers exit status 2)."""


@dataclass(frozen=True, kw_only=True)
class EplbPlan:
    """A plan and the per-rank loads it gives; tensors are on the CPU.

    load: [L, E] the loads planned from; phy2log/log2phy/logcnt: ``rebalance_experts``' outputs;
    before/after: float64 [L, ranks] per-rank loads without / with EPLB.
    """

    load: torch.Tensor
    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor
    num_groups: int
    num_nodes: int

    @property
    def num_ranks(self) -> int:
        return self.after.shape[1]

    @property
    def hierarchical(self) -> bool:
        return self.num_groups % self.num_nodes == 0

    @property
    def balancedness_before(self) -> torch.Tensor:
        return _balancedness(self.before)

    @property
    def balancedness_after(self) -> torch.Tensor:
        return _balancedness(self.after)


def _balancedness(loads_LR: torch.Tensor) -> torch.Tensor:
    mean = loads_LR.mean(dim=1)
    # A layer with no load at all is even by definition (not 0/0).
    return torch.where(mean > 0, loads_LR.max(dim=1).values / mean.clamp_min(1e-300), torch.ones_like(mean))


def synthetic_load(num_layers: int, num_experts: int, skew: float, tokens: int, seed: int = 0) -> torch.Tensor:
    """int64 [L, E]: ``tokens`` routed entries per layer drawn from a Zipf-like law, P(expert of popularity rank
    j) ∝ 1 / j^skew (skew 0 = uniform), the popularity order shuffled per layer. Same seed, same loads."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** skew
    rows = []
    for _ in range(num_layers):
        order = torch.randperm(num_experts, generator=g)
        draws = torch.multinomial(probs[order], tokens, replacement=True, generator=g) if tokens else \
            torch.empty(0, dtype=torch.int64)
        rows.append(torch.bincount(draws, minlength=num_experts))
    return torch.stack(rows)


def linear_rank_loads(load_LE: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """float64 [L, ranks]: per-rank loads with the experts split contiguously, the first E % ranks ranks getting
    one more (ranks beyond E hold nothing)."""
    num_layers, num_experts = load_LE.shape
    base, extra = divmod(num_experts, num_ranks)
    sizes = torch.tensor([base + (r < extra) for r in range(num_ranks)])
    rank_of_expert = torch.repeat_interleave(torch.arange(num_ranks), sizes)
    out = torch.zeros(num_layers, num_ranks, dtype=torch.float64)
    return out.index_add_(1, rank_of_expert, load_LE.double())


def check_plan_args(num_experts: int, num_redundant: int, num_groups: int, num_nodes: int, num_ranks: int) -> None:
    """The constraints of ``rebalance_experts``, worded with ``moekit eplb``'s flags."""
    for flag, value, low in (("--ranks", num_ranks, 1), ("--redundant", num_redundant, 0),
                             ("--groups", num_groups, 1), ("--nodes", num_nodes, 1)):
        if value < low:
            raise InputError(f"{flag}: expected an int >= {low}, got {value}")
    slots = num_experts + num_redundant
    if slots % num_ranks:
        raise InputError(f"--redundant {num_redundant}: {num_experts} experts + {num_redundant} redundant = {slots} "
                         f"slots, not a multiple of --ranks {num_ranks} (every rank holds the same number); "
                         f"e.g. --redundant {num_redundant + (-slots) % num_ranks}")
    if num_experts % num_groups:
        raise InputError(f"--groups {num_groups}: does not divide the {num_experts} experts")
    if num_ranks % num_nodes:
        raise InputError(f"--nodes {num_nodes}: does not divide --ranks {num_ranks}")


def make_plan(load: torch.Tensor, *, num_redundant: int, num_groups: int, num_nodes: int,
              num_ranks: int) -> EplbPlan:
    """Plan ``load`` [L, E] onto ``num_ranks`` ranks with ``num_redundant`` extra slots (InputError if the flags
    break a constraint)."""
    load = load.detach().cpu()
    check_plan_args(load.shape[1], num_redundant, num_groups, num_nodes, num_ranks)
    phy2log, log2phy, logcnt = rebalance_experts(load, load.shape[1] + num_redundant, num_groups, num_nodes,
                                                 num_ranks)
    share = (load.double() / logcnt).gather(1, phy2log)
    after = share.view(load.shape[0], num_ranks, -1).sum(-1)
    return EplbPlan(load=load, phy2log=phy2log, log2phy=log2phy, logcnt=logcnt,
                    before=linear_rank_loads(load, num_ranks), after=after, num_groups=num_groups,
                    num_nodes=num_nodes)


SYNTHETIC_DEFAULTS = {"layers": 4, "experts": 64, "tokens": 65536, "seed": 0}


def load_from_args(args) -> tuple[torch.Tensor, str]:
    """The loads ``moekit eplb`` plans from (its argparse namespace: ``load_file`` or ``synthetic_skew`` with
    ``layers``/``experts``/``tokens``/``seed``), and a phrase naming where they come from."""
    synthetic_flags = [f"--{name}" for name in SYNTHETIC_DEFAULTS if getattr(args, name) is not None]
    if (args.load_file is None) == (args.synthetic_skew is None):
        raise InputError("give a load file or --synthetic-skew S, exactly one of them")
    if args.load_file is not None:
        if synthetic_flags:
            raise InputError(f"{', '.join(synthetic_flags)}: only with --synthetic-skew (the file gives the loads)")
        from moekit.distributed.eplb_load import read_expert_load

        try:
            return read_expert_load(args.load_file), args.load_file
        except OSError as err:
            raise InputError(f"{args.load_file}: {err.strerror or err}") from None
        except ValueError as err:  # names the file and the line or layer
            raise InputError(str(err)) from None
    skew = args.synthetic_skew
    if not (skew >= 0 and skew != float("inf")):
        raise InputError(f"--synthetic-skew: expected a finite number >= 0, got {skew}")
    sizes = {name: SYNTHETIC_DEFAULTS[name] if getattr(args, name) is None else getattr(args, name)
             for name in SYNTHETIC_DEFAULTS}
    for name in ("layers", "experts"):
        if sizes[name] < 1:
            raise InputError(f"--{name}: expected an int >= 1, got {sizes[name]}")
    if sizes["tokens"] < 0:
        raise InputError(f"--tokens: expected an int >= 0, got {sizes['tokens']}")
    load = synthetic_load(sizes["layers"], sizes["experts"], skew, sizes["tokens"], sizes["seed"])
    return load, f"synthetic loads (skew {skew:g}, {sizes['tokens']} entries per layer, seed {sizes['seed']})"


def pick_layer(plan: EplbPlan, layer: int | None) -> int:
    """``layer`` if given (checked), else the least balanced layer before EPLB (the first of ties)."""
    num_layers = plan.load.shape[0]
    if layer is None:
        return int(plan.balancedness_before.argmax())
    if not 0 <= layer < num_layers:
        raise InputError(f"--layer: expected a layer in [0, {num_layers}), got {layer}")
    return layer


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 100 or value == int(value) else f"{value:.3g}"


def format_plan(plan: EplbPlan, layer: int, source: str) -> str:
    """The summary per layer, then ``layer``'s per-rank loads and experts."""
    num_layers, num_experts = plan.load.shape
    if not plan.hierarchical:
        policy = f"global: {plan.num_groups} groups do not divide over {plan.num_nodes} nodes"
    elif plan.num_nodes > 1:
        policy = f"hierarchical: {plan.num_groups} groups on {plan.num_nodes} nodes"
    else:
        policy = "global: one node"  # the hierarchical plan with one node is the global one
    lines = [f"EPLB plan for {source}: {num_layers} layers, {num_experts} experts -> {plan.phy2log.shape[1]} slots "
             f"on {plan.num_ranks} ranks ({policy})",
             "balancedness = max / mean of the per-rank load (1.00 = even)",
             "",
             f"{'layer':>5}  {'before':>6}  {'after':>6}  {'replicated experts':>18}"]
    before, after = plan.balancedness_before, plan.balancedness_after
    for i in range(num_layers):
        lines.append(f"{i:>5}  {before[i]:>6.2f}  {after[i]:>6.2f}  {int((plan.logcnt[i] > 1).sum()):>18}")
    if num_layers > 1:
        lines.append(f"{'mean':>5}  {before.mean():>6.2f}  {after.mean():>6.2f}")
    slots_per_rank = plan.phy2log.shape[1] // plan.num_ranks
    lines += ["", f"layer {layer}: per-rank load (share of the layer's load) and the logical experts held after",
              f"{'rank':>4}  {'before':>15}  {'after':>15}  experts after"]
    total = float(plan.load[layer].double().sum()) or 1.0
    for r in range(plan.num_ranks):
        experts = plan.phy2log[layer, r * slots_per_rank:(r + 1) * slots_per_rank].tolist()
        b, a = float(plan.before[layer, r]), float(plan.after[layer, r])
        lines.append(f"{r:>4}  {_number(b):>8} ({b / total:>4.0%})  {_number(a):>8} ({a / total:>4.0%})  "
                     + " ".join(str(e) for e in experts))
    return "\n".join(lines)


def plot_plan(path: str | Path, plan: EplbPlan, layer: int) -> None:
    """A PNG of ``layer``: per-rank load bars before/after, and the load each expert puts on each rank after."""
    import matplotlib  # the CLI checked it is installed (extra "bench")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_experts = plan.load.shape[1]
    slots_per_rank = plan.phy2log.shape[1] // plan.num_ranks
    share = (plan.load[layer].double() / plan.logcnt[layer])[plan.phy2log[layer]]
    rank_of_slot = torch.arange(plan.phy2log.shape[1]) // slots_per_rank
    heat = torch.zeros(num_experts, plan.num_ranks, dtype=torch.float64)
    heat.index_put_((plan.phy2log[layer], rank_of_slot), share, accumulate=True)

    fig, (bars, hm) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    ranks = torch.arange(plan.num_ranks).tolist()
    width = 0.4
    bars.bar([r - width / 2 for r in ranks], plan.before[layer].tolist(), width,
             label=f"before (max/mean {plan.balancedness_before[layer]:.2f})")
    bars.bar([r + width / 2 for r in ranks], plan.after[layer].tolist(), width,
             label=f"after (max/mean {plan.balancedness_after[layer]:.2f})")
    bars.axhline(float(plan.after[layer].mean()), color="gray", linestyle="--", linewidth=1, label="mean")
    bars.set_xlabel("rank")
    bars.set_ylabel("load (routed tokens)")
    bars.set_title(f"layer {layer}: per-rank load")
    bars.legend()
    image = hm.imshow(heat.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    hm.set_xlabel("rank")
    hm.set_ylabel("logical expert")
    hm.set_title(f"layer {layer}: load placed per expert and rank (after)")
    fig.colorbar(image, ax=hm, label="tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
