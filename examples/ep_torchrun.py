"""Benchmark an expert-parallel MoE layer across the ranks of ``torchrun``.

    torchrun --nproc-per-node 4 examples/ep_torchrun.py --preset deepseek-v3 --tokens 1,64,1024 \\
        --dispatch all_to_all [--tp 1] [--backend auto] [--json ep.json]

Each rank builds the routed experts of a ``moekit.bench`` preset (random weights, only its own experts; the router
and the shared experts are left out: they are replicated, identical on every rank and not expert-parallel) and, at
each T tokens per rank, times:

    layer   the routed experts on T random tokens with random top-K routing: dispatch -> local experts -> combine
    comm    the dispatch and combine alone: the layer's ``PrepareFinalize.prepare`` then ``finalize`` on zeros of the
            experts stage's output shape, i.e. the layer with its experts stage replaced by a no-op. It includes the
            dispatch's own bookkeeping (sorting rows by destination, packing, unpacking), not only the collectives.
    compute layer - comm
    single  (rank 0) the same experts, all E of them, on one device with rank 0's tokens, when they fit in its
            free memory; rank 0's EP output is also checked against it (``moekit.testing`` tolerances).

On GPUs (NCCL), up to ``--graph-max-tokens`` per rank (decode sizes, default 64), each call is captured once in a
CUDA graph and its replays are timed with CUDA events: while a graph is captured the dispatch is the sync-free one
(no counts exchanged), as a decode step would run it. Above, eager calls are timed with CUDA events (the dispatch
waits once per call for the counts): a sync-free all_to_all sends every token to every rank, so each rank's
experts stage takes W·T rows, which at prefill sizes would time more than the real work. On CPUs (gloo) wall time per call.
The single-device layer is timed the same way at each T. Every rank makes the same number of calls (collectives pair
up); a rank's time is its median, and the table shows the slowest rank's.

Bytes: what each rank sends to the other ranks per call (its own rows stay), from the dispatch's row layout:

    all_to_all               one row per (token, rank owning one of its experts): x[t] + K fp32 weights + K int32
                             ids (H·e + 8K bytes) to that rank; the combine sends the partial results (H·e) of the
                             rows it received back; counts: 8 bytes per rank (eager only). Sync-free: every token
                             to every other rank, both ways.
    allgather_reducescatter  all_gather of T rows x[t] + K fp32 weights + K int32 ids (H·e + 8K) to W-1 ranks;
                             reduce_scatter of [W·T, H] (W-1)·T·H·e; counts 8 bytes per rank (eager only).
    tp > 1                   + the all-reduce of [T, H]: 2·(tp-1)/tp·T·H·e (a ring's share).

"comm GB/s" = bytes / comm time; compare with the NCCL figures measured between H200s (EP.md, last table).
On CPUs the times are gloo's and a shared host's (milliseconds per collective): a check that the benchmark runs,
not a measurement; compute (a difference of two medians) can then even come out negative.
Arguments are checked before any process group starts: a bad one exits 2 with one line on every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

import moekit
from moekit.bench.shapes import PRESETS, MoEShape
from moekit.config import DISPATCHES, PLACEMENTS
from moekit.distributed import local_experts
from moekit.distributed.dispatch import AllGatherReduceScatter
from moekit.distributed.tensor_parallel import TensorParallel, shard_intermediate
from moekit.testing import TOLERANCES, rel_errors

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PG_BACKENDS = ("auto", "nccl", "gloo")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        print(f"ep_torchrun.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def _token_list(text: str) -> list[int]:
    try:
        tokens = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts per rank, got {text!r}") from None
    if not tokens or min(tokens) < 1:
        raise argparse.ArgumentTypeError(f"expected token counts >= 1, got {text!r}")
    return tokens


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def parse_args(argv: list[str] | None, world: int | None) -> argparse.Namespace:
    """Parsed and checked arguments; ``world`` is torchrun's WORLD_SIZE (None: not started by torchrun)."""
    p = _Parser(prog="ep_torchrun.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="deepseek-v3")
    p.add_argument("--tokens", type=_token_list, default=[1, 64, 1024], help="tokens per rank, e.g. 1,64,1024")
    p.add_argument("--dispatch", choices=DISPATCHES, default="all_to_all")
    p.add_argument("--placement", choices=PLACEMENTS, default="linear")
    p.add_argument("--tp", type=_positive, default=1, help="tensor-parallel ranks per expert (ranks TP-innermost)")
    p.add_argument("--backend", choices=PG_BACKENDS, default="auto", help="process group: auto = nccl on GPUs")
    p.add_argument("--kernel", choices=("auto", "torch", "triton"), default="auto", help="experts backend")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    for name in ("experts", "hidden", "intermediate", "top-k"):
        p.add_argument(f"--{name}", type=_positive, default=None, help=f"override the preset's {name}")
    p.add_argument("--iters", type=_positive, default=None, help="timed calls per point (20 on GPU, 10 on CPU)")
    p.add_argument("--warmup", type=_positive, default=3)
    p.add_argument("--graph-max-tokens", type=int, default=64,
                   help="GPU: CUDA-graph replays up to this many tokens per rank, eager calls above (0: never)")
    p.add_argument("--no-single", action="store_true", help="skip the single-device comparison on rank 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="rank 0 writes the rows here")
    args = p.parse_args(argv)
    if world is None:
        p.error("WORLD_SIZE is not set: run under torchrun --nproc-per-node N (N >= 2)")
    if world < 2:
        p.error(f"world size: expected >= 2 ranks (torchrun --nproc-per-node N), got {world}")
    if world % args.tp:
        p.error(f"--tp: expected a divisor of the world size {world}, got {args.tp}")
    base = PRESETS[args.preset]
    args.shape = MoEShape(
        name=args.preset, num_experts=args.experts or base.num_experts, hidden_size=args.hidden or base.hidden_size,
        intermediate_size=args.intermediate or base.intermediate_size, top_k=args.top_k or base.top_k,
        activation=base.activation, bias=base.bias,
    )
    shape, ep_size = args.shape, world // args.tp
    if shape.top_k > shape.num_experts:
        p.error(f"--top-k: expected <= the expert count {shape.num_experts}, got {shape.top_k}")
    if shape.num_experts < ep_size:
        p.error(f"--experts: expected >= ep_size {ep_size} (every rank holds an expert), got {shape.num_experts}")
    if args.tp > 1 and shape.intermediate_size % args.tp:
        p.error(f"--tp: expected a divisor of the intermediate size {shape.intermediate_size}, got {args.tp}")
    if args.graph_max_tokens < 0:
        p.error(f"--graph-max-tokens: expected >= 0 (0: never capture), got {args.graph_max_tokens}")
    if args.backend == "auto":
        args.backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.backend == "nccl" and not torch.cuda.is_available():
        p.error("--backend: nccl needs CUDA GPUs, none is available (use gloo)")
    if args.iters is None:
        args.iters = 20 if args.backend == "nccl" else 10
    return args


def _expert_weights(shape: MoEShape, expert: int, seed: int, dtype: torch.dtype,
                    device: torch.device) -> list[torch.Tensor]:
    """Expert ``expert``'s full w13 [rows, H], w2 [H, I] (and biases), drawn from its own seed: every rank draws
    only its experts, and rank 0's single-device layer draws the same values for all of them."""
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + expert)
    rows = shape.activation.w13_rows(shape.intermediate_size)
    h, i = shape.hidden_size, shape.intermediate_size
    kw = {"generator": gen, "device": device, "dtype": torch.float32}
    out = [torch.randn(rows, h, **kw) / h**0.5, torch.randn(h, i, **kw) / i**0.5]  # scaled like nn.Linear
    if shape.bias:
        out += [torch.randn(rows, **kw) / h**0.5, torch.randn(h, **kw) / i**0.5]
    return [t.to(dtype) for t in out]


def build_layer(shape: MoEShape, args: argparse.Namespace, device: torch.device,
                parallel: moekit.ParallelConfig | None) -> moekit.MoE:
    """The routed experts of ``shape`` (no shared experts: not timed), holding ``parallel``'s share of them."""
    cfg = moekit.MoEConfig(num_experts=shape.num_experts, top_k=shape.top_k, hidden_size=shape.hidden_size,
                           intermediate_size=shape.intermediate_size, activation=shape.activation, bias=shape.bias,
                           backend=args.kernel)
    dtype = DTYPES[args.dtype]
    moe = moekit.MoE(cfg, dtype=dtype, device=device, parallel=parallel).requires_grad_(False)
    parallel = parallel or moekit.ParallelConfig()
    routed = moe.routed_experts
    if parallel.ep_size > 1:
        owned = local_experts(parallel.ep_size, parallel.ep_rank, shape.num_experts, parallel.placement).tolist()
    else:
        owned = list(range(shape.num_experts))
    gated = shape.activation.is_gated
    names = ["w13", "w2", "w13_bias", "w2_bias"][: 4 if shape.bias else 2]
    for local, expert in enumerate(owned):
        full = _expert_weights(shape, expert, args.seed, dtype, device)
        for name, t in zip(names, full):
            # This rank's slice of I: gate and up rows (and their biases) sliced alike, w2's columns; w2_bias has
            # no I and stays whole (only tp_rank 0 adds it).
            if parallel.tp_size > 1 and name != "w2_bias":
                dim = 1 if name == "w2" else 0
                t = shard_intermediate(t, dim, parallel.tp_size, parallel.tp_rank,
                                       halves=2 if name in ("w13", "w13_bias") and gated else 1)
            getattr(routed, name)[local].copy_(t)
    routed.process_weights_after_loading()
    return moe


def make_routing(shape: MoEShape, tokens: int, seed: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [T, H], topk_weights [T, K] fp32, topk_ids [T, K] int32): K distinct experts per token, uniformly."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(tokens, shape.hidden_size, generator=gen, device=device).to(dtype)
    ids = torch.rand(tokens, shape.num_experts, generator=gen, device=device).topk(shape.top_k, dim=1).indices
    weights = torch.randn(tokens, shape.top_k, generator=gen, device=device).softmax(dim=1)
    return x, weights, ids.to(torch.int32)


def bytes_sent(pf: object, ids: torch.Tensor, hidden_bytes: int, *, sync_free: bool, tp: int) -> int:
    """Bytes this rank sends to other ranks in one call (module docstring); ``ids`` are its tokens' [T, K]."""
    total = 0
    tokens, top_k = ids.shape
    if isinstance(pf, TensorParallel):
        total += round(2 * (tp - 1) / tp * tokens * hidden_bytes)
        pf = pf.inner
    world = getattr(pf, "ep_size", 1)
    if world == 1:
        return total
    counts = 0 if sync_free else (world - 1) * 8
    if isinstance(pf, AllGatherReduceScatter):
        return total + counts + (world - 1) * tokens * (hidden_bytes + 8 * top_k + hidden_bytes)
    row = hidden_bytes + 8 * top_k  # x + K fp32 weights + K int32 ids
    if sync_free:
        return total + (world - 1) * tokens * (row + hidden_bytes)
    send = pf.destinations(ids).sum(dim=1).cpu()
    gathered: list[list[int] | None] = [None] * world
    dist.all_gather_object(gathered, send.tolist(), group=pf.group)
    matrix = torch.tensor(gathered)  # row r: the rows rank r sends to each rank
    me = pf.ep_rank
    out_rows = int(send.sum()) - int(send[me])  # this rank's rows going to other ranks
    back_rows = int(matrix[:, me].sum()) - int(matrix[me, me])  # results of the rows it received, sent back
    return total + counts + out_rows * row + back_rows * hidden_bytes


def time_calls(fns: dict[str, Callable[[], object]], device: torch.device, *, iters: int, warmup: int, graph: bool,
               collective: bool) -> dict[str, float]:
    """This rank's median µs per call of each of ``fns`` (CUDA-graph replays when ``graph``, on CUDA), timed in
    interleaved rounds so that each sees the same machine. ``collective``: every rank calls this with the same
    functions, iters and warmup (their collectives pair up) and the ranks start timing together."""
    cuda = device.type == "cuda"
    calls = dict(fns)
    if cuda and graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles, NCCL connects, allocator settles) off the capture
            for _ in range(warmup):
                for fn in fns.values():
                    fn()
        torch.cuda.current_stream().wait_stream(side)
        for name, fn in fns.items():
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            calls[name] = g.replay
    else:
        for _ in range(warmup):
            for fn in fns.values():
                fn()
    if cuda:
        torch.cuda.synchronize()
    if collective:
        dist.barrier()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, call in calls.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - t0) * 1e6)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def single_fits(shape: MoEShape, max_tokens: int, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Whether all E experts (and a call's work space, generously) fit in ``device``'s free memory now."""
    rows = shape.activation.w13_rows(shape.intermediate_size)
    h, i = shape.hidden_size, shape.intermediate_size
    per_expert = rows * h + h * i + ((rows + h) if shape.bias else 0)
    need = shape.num_experts * per_expert * dtype.itemsize + 2 * max_tokens * shape.top_k * (rows + i + 2 * h) * 4
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need < 0.8 * free, f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    shape, tp, dtype = args.shape, args.tp, DTYPES[args.dtype]
    parallel = moekit.ParallelConfig(ep_size=world // tp, ep_rank=rank // tp, tp_size=tp, tp_rank=rank % tp,
                                     placement=args.placement, dispatch=args.dispatch)
    moe = build_layer(shape, args, device, parallel)
    routed, pf = moe.routed_experts, moe.routed_experts.prepare_finalize
    quant = routed.quant_method.quant_params(routed)
    hidden_bytes = shape.hidden_size * dtype.itemsize
    rows, ep_out = [], {}
    for tokens in args.tokens:
        graph = device.type == "cuda" and tokens <= args.graph_max_tokens
        timing = {"iters": args.iters, "warmup": args.warmup, "graph": graph}
        # A TP group's ranks hold the same tokens (seeded by ep_rank); rank 0's are redrawn for the single layer.
        x, weights, ids = make_routing(shape, tokens, _token_seed(args.seed, parallel.ep_rank, tokens), dtype, device)

        def layer() -> torch.Tensor:
            return routed(x, weights, ids, check_ids=False)

        def comm() -> torch.Tensor:  # the layer with a no-op experts stage: zeros of its output's shape and dtype
            prep = pf.prepare(x, weights, ids, apply_router_weight_on_input=routed.apply_router_weight_on_input,
                              quant=quant)
            out = torch.zeros(prep.hidden_states.shape[0], shape.hidden_size, device=device,
                              dtype=prep.experts_out_dtype or dtype)
            return pf.finalize(out, prep)

        with torch.inference_mode():
            timed = time_calls({"layer": layer, "comm": comm}, device, collective=True, **timing)
            layer_us, comm_us = timed["layer"], timed["comm"]
            sent = bytes_sent(pf, ids, hidden_bytes, sync_free=graph, tp=tp)
            out = layer()  # eager: what rank 0 checks against the single-device layer
        if rank == 0:
            ep_out[tokens] = out
        per_rank: list[tuple[float, float, int] | None] = [None] * world
        dist.all_gather_object(per_rank, (layer_us, comm_us, sent))
        layer_max, comm_max = max(r[0] for r in per_rank), max(r[1] for r in per_rank)
        sent_max = max(r[2] for r in per_rank)
        rows.append({
            "tokens": tokens, "timing": "graph" if graph else ("eager" if device.type == "cuda" else "wall"),
            "layer_us": layer_max, "comm_us": comm_max, "compute_us": layer_max - comm_max,
            "comm_share": comm_max / layer_max, "bytes_sent": sent_max,
            "comm_gbps": sent_max / (comm_max * 1e3) if sent_max else 0.0,
            "layer_us_per_rank": [r[0] for r in per_rank], "comm_us_per_rank": [r[1] for r in per_rank],
            "bytes_sent_per_rank": [r[2] for r in per_rank],
            "single_us": None, "ep_over_single": None, "max_rel_err": None,
        })
    del moe, routed
    note = "skipped (--no-single)"
    mismatches = []
    if rank == 0 and not args.no_single:
        fits, room = single_fits(shape, max(args.tokens), dtype, device)
        note = f"all {shape.num_experts} experts on {device} ({room})"
        if not fits:
            note = f"skipped: the {shape.num_experts} experts do not fit on {device} ({room})"
        else:
            single = build_layer(shape, args, device, None).routed_experts
            for row in rows:
                tokens = row["tokens"]
                x, weights, ids = make_routing(shape, tokens, _token_seed(args.seed, 0, tokens), dtype, device)
                with torch.inference_mode():
                    row["single_us"] = time_calls({"single": lambda: single(x, weights, ids, check_ids=False)},
                                                  device, collective=False, iters=args.iters, warmup=args.warmup,
                                                  graph=row["timing"] == "graph")["single"]
                    expected = single(x, weights, ids, check_ids=False)
                row["ep_over_single"] = row["layer_us"] / row["single_us"]
                row["max_rel_err"] = rel_errors(ep_out[tokens], expected)[0]
                if not row["max_rel_err"] <= TOLERANCES[dtype].max:
                    mismatches.append(tokens)
            del single
    dist.barrier()  # the other ranks wait while rank 0 times the single-device layer
    if rank != 0:
        return 0
    meta = {"preset": args.preset, "num_experts": shape.num_experts, "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size, "top_k": shape.top_k, "dtype": args.dtype,
            "world": world, "ep_size": parallel.ep_size, "tp_size": tp,
            "dispatch": args.dispatch if parallel.ep_size > 1 else "none (ep 1)",
            "placement": args.placement, "backend": args.backend, "kernel": args.kernel, "device": str(device),
            "graph_max_tokens": args.graph_max_tokens if device.type == "cuda" else None, "iters": args.iters,
            "single": note,
            "comm_method": "prepare+finalize around a no-op experts stage"}
    print(_table(meta, rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if mismatches:
        print(f"ep_torchrun.py: error: rank 0's EP output differs from the single-device layer at T={mismatches} "
              f"(max rel err above {TOLERANCES[dtype].max})", file=sys.stderr)
        return 1
    return 0


def _token_seed(seed: int, ep_rank: int, tokens: int) -> int:
    return (seed * 7919 + ep_rank) * 1_000_003 + tokens


def _table(meta: dict, rows: list[dict]) -> str:
    how = "CPU wall time" if meta["graph_max_tokens"] is None else (
        f"CUDA events: graph replays (sync-free dispatch) up to T={meta['graph_max_tokens']}, eager above")
    lines = [
        f"{meta['preset']} (E={meta['num_experts']} H={meta['hidden_size']} I={meta['intermediate_size']} "
        f"K={meta['top_k']}) {meta['dtype']}: {meta['world']} ranks (ep {meta['ep_size']} x tp {meta['tp_size']}), "
        f"{meta['dispatch']}, {meta['backend']}, {how}; slowest rank's median of {meta['iters']} calls",
        f"comm = dispatch + combine alone ({meta['comm_method']}); single: {meta['single']}",
        f"{'T/rank':>7} {'timing':>6} {'layer us':>10} {'comm us':>10} {'comm %':>7} {'compute us':>11} "
        f"{'MB sent/rank':>13} {'comm GB/s':>10} {'single us':>10} {'EP/single':>10} {'max err':>9}",
    ]
    for r in rows:
        single = "-" if r["single_us"] is None else f"{r['single_us']:.1f}"
        ratio = "-" if r["ep_over_single"] is None else f"{r['ep_over_single']:.2f}"
        err = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        lines.append(f"{r['tokens']:>7} {r['timing']:>6} {r['layer_us']:>10.1f} {r['comm_us']:>10.1f} "
                     f"{100 * r['comm_share']:>6.0f}% {r['compute_us']:>11.1f} {r['bytes_sent'] / 1e6:>13.3f} "
                     f"{r['comm_gbps']:>10.1f} {single:>10} {ratio:>10} {err:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    args = parse_args(argv, world)
    rank = int(os.environ["RANK"])
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend)
    try:
        return run(args, rank, world, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
