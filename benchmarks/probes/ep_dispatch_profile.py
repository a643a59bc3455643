"""Probe: where an expert-parallel dispatch + combine spends its time on NCCL, op by op, against the bare
collectives that move the same bytes.

    torchrun --nproc-per-node 2 benchmarks/probes/ep_dispatch_profile.py [--preset deepseek-v3] \\
        [--tokens 1024,8192] [--dispatch all_to_all]

At each T tokens per rank (eager, the dispatch that waits for the counts): rank 0's CUDA time per op name
(torch.profiler over 5 calls of prepare + finalize around a no-op experts stage, the ``comm`` column of
examples/ep_torchrun.py), then the median µs per call of that and of the bare collectives alone (all_to_all_single
of the same byte rows there and back, uneven splits as routed; for all_to_all). Not a unit test; what it finds goes into
docs/perf/NOTES.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import moekit
from moekit.bench.shapes import PRESETS
from moekit.config import DISPATCHES


def _median_us(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=sorted(PRESETS), default="deepseek-v3")
    p.add_argument("--tokens", default="1024,8192")
    p.add_argument("--dispatch", choices=DISPATCHES, default="all_to_all")
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--cpu", action="store_true", help="also rank 0's host time per op (self CPU time)")
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
    shape = PRESETS[args.preset]
    cfg = moekit.MoEConfig(num_experts=shape.num_experts, top_k=shape.top_k, hidden_size=shape.hidden_size,
                           intermediate_size=shape.intermediate_size, activation=shape.activation, bias=shape.bias)
    parallel = moekit.ParallelConfig(ep_size=world, ep_rank=rank, dispatch=args.dispatch)
    routed = moekit.MoE(cfg, dtype=torch.bfloat16, device=device, parallel=parallel).routed_experts
    pf, quant = routed.prepare_finalize, routed.quant_method.quant_params(routed)
    for tokens in (int(t) for t in args.tokens.split(",")):
        gen = torch.Generator(device).manual_seed(rank * 7919 + tokens)
        x = torch.randn(tokens, shape.hidden_size, generator=gen, device=device).to(torch.bfloat16)
        ids = torch.rand(tokens, shape.num_experts, generator=gen, device=device).topk(shape.top_k, 1).indices
        ids = ids.to(torch.int32)
        weights = torch.rand(tokens, shape.top_k, generator=gen, device=device).softmax(1)

        def comm():
            prep = pf.prepare(x, weights, ids, apply_router_weight_on_input=False, quant=quant)
            out = torch.zeros(prep.hidden_states.shape[0], shape.hidden_size, device=device, dtype=torch.bfloat16)
            return pf.finalize(out, prep)

        # The bare collectives of the all-to-all path: one byte row per (token, destination rank) (x + K weights +
        # K ids) there, x back.
        send_counts = pf.destinations(ids).sum(dim=1)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        row = shape.hidden_size * 2
        there = torch.zeros(sum(send_splits), row + 8 * shape.top_k, dtype=torch.uint8, device=device)
        there_in = torch.empty(sum(recv_splits), row + 8 * shape.top_k, dtype=torch.uint8, device=device)
        back = torch.zeros(sum(recv_splits), row, dtype=torch.uint8, device=device)
        back_in = torch.empty(sum(send_splits), row, dtype=torch.uint8, device=device)

        def bare():
            dist.all_to_all_single(there_in, there, recv_splits, send_splits)
            dist.all_to_all_single(back_in, back, send_splits, recv_splits)

        with torch.inference_mode():
            comm_us, bare_us = _median_us(comm), _median_us(bare)
            torch.cuda.synchronize()
            acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.cpu else [])
            with profile(activities=acts) as prof:
                for _ in range(5):
                    comm()
                torch.cuda.synchronize()
        per = collections.defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name[:70]] += e.device_time_total / 5
        times = [None] * world
        dist.all_gather_object(times, (comm_us, bare_us))
        if rank == 0:
            print(f"\n{args.preset} {args.dispatch} T={tokens}/rank ({world} ranks): comm {[round(t[0]) for t in times]}"
                  f" µs, bare collectives {[round(t[1]) for t in times]} µs; rank 0 CUDA µs per call by op:")
            for name, us in sorted(per.items(), key=lambda kv: -kv[1])[:args.top]:
                print(f"  {us:9.1f}  {name}")
            print(f"  {sum(per.values()):9.1f}  (sum)")
            if args.cpu:
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
