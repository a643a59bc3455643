"""``moekit tune``: time a small grid of launch configurations around the heuristic and write a tuned table.

    for T in tokens:
        times[name] = time(TritonExperts(config=cfg), T)   for name, cfg in candidate_configs(shape(T))
        keep the fastest if it beats the heuristic by > min_gain in two timings (and matches the torch backend)
    write {"E,H,I,K": {"<T>": best.to_dict() or null}} to <out>/<gpu>/<preset>.json

A benchmark-side tool (it times the experts backends on ``moekit.bench`` inputs); the table is what
``moekit.ops.heuristics`` reads: an entry keyed by T covers the token counts above the previous
key up to T; ``null`` keeps the heuristic for that range. A run replaces the entries of the T values it tunes and
keeps the file's others. Only the points where tuning wins are written, so most
presets need no table at all: good heuristics are the product, tables patch what they miss.
Timing follows docs/perf/MEASURING.md: CUDA-graph replays for T <= 1024 (each replay runs ``ROTATE`` calls on
different routings so the weights are not found in L2), eager calls above, through ``moekit.bench.timing``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moekit.bench.floor import BENCH_SCHEMES
from moekit.bench.run import ROTATE, make_tokens, make_weights
from moekit.bench.timing import time_us
from moekit.kernel.modular import ModularKernel
from moekit.kernel.prepare_finalize import LocalPrepareFinalize
from moekit.kernel.torch_experts import TorchExperts
from moekit.ops import heuristics
from moekit.ops.gluon_wna16 import gluon_decode
from moekit.ops.heuristics import GemmConfig, MoEKernelConfig, MoEShape, heuristic_config, tuned_dir
from moekit.quant import QUANT_SCHEMES
from moekit.quant.params import UNQUANTIZED
from moekit.testing import rel_errors

GRAPH_MAX_TOKENS = 1024
MAX_REL_ERR = 2e-2  # bf16 operands, fp32 accumulation; the torch backend is the reference
REFUSED_CONFIG_PREFIX = "config."  # how an op's error names the launch config it refuses (errors name the argument)

# measure(num_tokens, {name: config}) -> {name: µs} (inf for a config that fails to compile, to match, or that the op
# refuses for these weights)
Measure = Callable[[int, dict[str, MoEKernelConfig]], dict[str, float]]


@dataclass(frozen=True, kw_only=True)
class TunePoint:
    tokens: int
    heuristic_us: float
    best_name: str
    best_us: float
    best: MoEKernelConfig

    @property
    def gain(self) -> float:
        """Fraction of the heuristic's time saved by the best candidate."""
        return 1.0 - self.best_us / self.heuristic_us if self.heuristic_us > 0 else 0.0


def candidate_configs(shape: MoEShape) -> dict[str, MoEKernelConfig]:
    """The heuristic's choice and a few single-step moves around it (a small, explicit grid). Where the heuristic
    fuses both GEMMs (``MoEKernelConfig.fused``), the moves are of the unfused pipeline, "unfused" among them."""
    heuristic = heuristic_config(shape)
    base = replace(heuristic, fused=None)
    g1, g2 = base.gemm1, base.gemm2
    out = {"heuristic": heuristic, "unfused": base}
    if base.block_m <= 32:  # memory-bound: bytes in flight and grid size
        # The Gluon decode kernel sizes its own K steps and stages (``GluonTiles``): no moves of those there.
        if "gluon_pairs" not in (g1.variant, g2.variant):
            # A shorter K step and another pipeline depth: 64 and 3 stages; 8-bit codes (256-wide steps in 3
            # stages past one token) half their step and 4 stages there.
            eight_bit = shape.elem_bytes == 1
            bk = max(32, g1.block_k // 2) if eight_bit else 64
            out[f"bk{bk}"] = replace(base, gemm1=replace(g1, block_k=bk), gemm2=replace(g2, block_k=bk))
            stages = 4 if eight_bit and g1.num_stages == 3 else 3
            out[f"stages{stages}"] = replace(base, gemm1=replace(g1, num_stages=stages),
                                             gemm2=replace(g2, num_stages=stages))
        out["bn1x2"] = replace(base, gemm1=replace(g1, block_n=min(256, g1.block_n * 2)))
        out["bn1/2"] = replace(base, gemm1=replace(g1, block_n=max(32, g1.block_n // 2)))
        out["split2x"] = replace(base, gemm2=replace(g2, split_k=g2.split_k * 2))
        if g2.split_k > 1:
            out["split/2"] = replace(base, gemm2=replace(g2, split_k=g2.split_k // 2))
        out["bm32" if base.block_m == 16 else "bm16"] = replace(base, block_m=48 - base.block_m)
    elif shape.elem_bytes == 1:  # 8-bit codes, compute-bound: around 64 x 128 x 128 (docs/perf/NOTES.md)
        out["stages3"] = replace(base, gemm1=replace(g1, num_stages=3), gemm2=replace(g2, num_stages=3))
        out["group8"] = replace(base, gemm1=replace(g1, group_m=8), gemm2=replace(g2, group_m=8))
        out["g2bn64"] = replace(base, gemm2=replace(g2, block_n=64))
        out["bm128w8"] = replace(base, block_m=128, gemm1=replace(g1, num_warps=8, half_tail=True),
                                 gemm2=replace(g2, num_warps=8, half_tail=True))
    else:  # compute-bound: tile shape, pipeline depth, GEMM2 grid
        narrow = GemmConfig(block_n=128, block_k=64, num_warps=4, num_stages=4)
        wide = GemmConfig(block_n=256, block_k=64, num_warps=8, num_stages=3)
        out["bm64"] = replace(base, block_m=64, gemm1=narrow, gemm2=narrow)
        out["bm128"] = replace(base, block_m=128, gemm1=wide, gemm2=wide)
        out["stages4"] = replace(base, gemm1=replace(g1, num_stages=4), gemm2=replace(g2, num_stages=4))
        out["group16"] = replace(base, gemm1=replace(g1, group_m=16), gemm2=replace(g2, group_m=16))
        out["g2split2"] = replace(base, gemm2=replace(g2, split_k=2), y_fp32=True)
        out["g2bn128"] = replace(base, gemm2=replace(g2, block_n=128, num_warps=4 if base.block_m == 64 else 8))
    # Drop duplicates (a move that the heuristic already made), keeping the first name.
    seen: dict[MoEKernelConfig, str] = {}
    for name, cfg in out.items():
        seen.setdefault(cfg, name)
    return {name: cfg for cfg, name in seen.items()}


def tune_points(
    shape_of: Callable[[int], MoEShape], tokens: list[int], measure: Measure, *, min_gain: float = 0.03,
    log: Callable[[str], None] = lambda s: None,
) -> list[TunePoint]:
    """For each T: time the candidates, confirm a winner with a second timing beside the heuristic."""
    points = []
    for t in tokens:
        cands = candidate_configs(shape_of(t))
        times = measure(t, cands)
        log(f"T={t}: " + " ".join(f"{n}={us:.1f}" for n, us in times.items()))
        heur = times["heuristic"]
        _check_heuristic_timed(t, heur, times)
        name = min(times, key=lambda n: times[n])
        best_us = times[name]
        if name != "heuristic" and math.isfinite(best_us) and 1 - best_us / heur > min_gain:
            again = measure(t, {"heuristic": cands["heuristic"], name: cands[name]})
            log(f"T={t}: confirm heuristic={again['heuristic']:.1f} {name}={again[name]:.1f}")
            _check_heuristic_timed(t, again["heuristic"], again)
            heur = min(heur, again["heuristic"])
            best_us = max(best_us, again[name])  # the winner's worse timing against the heuristic's better one
            if not 1 - best_us / heur > min_gain:
                name, best_us = "heuristic", heur
        else:
            name, best_us = "heuristic", heur
        points.append(TunePoint(tokens=t, heuristic_us=heur, best_name=name, best_us=best_us, best=cands[name]))
    return points


def _check_heuristic_timed(t: int, heur: float, times: dict[str, float]) -> None:
    """The heuristic is what every call without a table runs: if it failed (inf: wrong output, no compile) the
    gains against it mean nothing, and it is a bug to report rather than a table to write."""
    if math.isfinite(heur) and heur > 0:
        return
    why = "every candidate failed too" if not any(map(math.isfinite, times.values())) else "other candidates timed"
    raise RuntimeError(f"T={t}: the heuristic's config timed as {heur} us (it failed the accuracy check against the "
                       f"torch backend, or did not compile; {why}): no table can be chosen against it")


def table_entries(points: list[TunePoint], old: dict[str, dict | None] | None = None) -> dict[str, dict | None]:
    """{"<T>": config or None}: this run's ``points`` merged into the ``old`` entries of the same table key.

    A key T covers the token counts above the previous key up to T (``heuristics._lookup_tuned``); past the last
    key the heuristic runs. The breakpoints are the old keys and the tuned T values: a segment ending at a tuned T
    takes this run's choice (None where the heuristic won), one ending at an old key keeps its old entry, so an
    old entry that no tuned T falls into covers exactly its old range. Then a run of null segments keeps only
    its last key (the bound of what follows) and trailing nulls go (the heuristic runs there anyway).
    """
    segments: dict[int, dict | None] = {int(t): entry for t, entry in (old or {}).items()}
    for p in points:
        segments[p.tokens] = None if p.best_name == "heuristic" else p.best.to_dict()
    entries: dict[str, dict | None] = {}
    pending_null: int | None = None
    for t in sorted(segments):
        if segments[t] is None:
            pending_null = t  # the last null before the next entry ends that entry's range from below
            continue
        if pending_null is not None:
            entries[str(pending_null)] = None
            pending_null = None
        entries[str(t)] = segments[t]
    return entries


def read_table(path: Path) -> dict[str, dict[str, dict | None]]:
    """The tables of a tuned file (``{key: {"<T>": config or None}}``), ``{}`` when there is none; ValueError
    naming ``path`` when it is not such a file (nothing is overwritten then)."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); fix or remove it before tuning") from None
    if not isinstance(doc, dict) or not all(
            isinstance(t, dict) and all(k.isdigit() and (v is None or isinstance(v, dict)) for k, v in t.items())
            for t in doc.values()):
        raise ValueError(f"{path}: expected a tuned table {{key: {{\"<T>\": config or null}}}}; fix or remove it "
                         "before tuning")
    return doc


def write_table(path: Path, key: str, points: list[TunePoint]) -> bool:
    """Merge ``points`` into ``key``'s table at ``path`` (``table_entries``; other keys and other T values stay
    as they are); True if the file holds entries for ``key`` afterwards. The file is removed only when nothing
    at all is left in it."""
    tables = read_table(path)
    entries = table_entries(points, tables.get(key))
    if entries:
        tables[key] = entries
    else:
        tables.pop(key, None)
    if not tables:
        path.unlink(missing_ok=True)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tables, indent=1, sort_keys=False) + "\n")
    return bool(entries)


def gpu_measure(preset, device: torch.device, dtype: torch.dtype, seed: int = 0,
                quant: str | None = None, log: Callable[[str], None] = print) -> tuple[Measure, Callable]:
    """A ``Measure`` over random inputs for a ``moekit.bench.shapes`` preset on CUDA, and a function freeing them.

    Each call is the whole modular kernel (with ``quant``, a ``moekit.quantize`` scheme: the layer's weights in
    that scheme, and for 8-bit schemes the activation quantization of ``prepare`` timed too). Every candidate is checked against the
    torch backend on the same weights (max-relative error under ``MAX_REL_ERR``) before it is timed; a failing or
    uncompilable one times as inf, and so does one that the op's config check refuses for these weights (a K tile
    the weight format cannot take), each skip reported in one ``log`` line.
    """
    import triton  # only on CUDA: the CPU install may lack it

    from moekit.kernel.triton_experts import TritonExperts

    weights = make_weights(preset, dtype, device, seed, quant)
    if quant is None:
        w13, w2, b13, b2, q = weights["w13"], weights["w2"], weights.get("w13_bias"), weights.get("w2_bias"), UNQUANTIZED
    else:
        layer = weights["quantized"]
        w13, w2, b13, b2 = layer.w13, layer.w2, layer.w13_bias, layer.w2_bias
        q = layer.quant_method.quant_params(layer)
    kw = dict(activation=preset.activation, w13_bias=b13, w2_bias=b2, quant=q, check_ids=False)
    cache: dict[int, tuple] = {}

    def kernel(experts) -> ModularKernel:
        return ModularKernel(LocalPrepareFinalize(), experts)

    def inputs(t: int):
        if t not in cache:
            cache.clear()
            sets = [make_tokens(preset, t, dtype, device, seed + 1000 * i)
                    for i in range(ROTATE if t <= GRAPH_MAX_TOKENS else 1)]
            sets = [(s["hidden_states"], s["topk_weights"], s["topk_ids"]) for s in sets]
            x, tw, ids = sets[0]
            with torch.no_grad():
                ref = kernel(TorchExperts()).apply(x, w13, w2, tw, ids, **kw)
            cache[t] = (sets, ref)
        return cache[t]

    def time_one(cfg: MoEKernelConfig, sets, graph: bool) -> float:
        mk = kernel(TritonExperts(config=cfg))

        def run_all():
            for x, tw, ids in sets:
                mk.apply(x, w13, w2, tw, ids, **kw)

        with torch.no_grad():
            return time_us(run_all, device, graph=graph) / len(sets)

    def measure(t: int, configs: dict[str, MoEKernelConfig]) -> dict[str, float]:
        sets, ref = inputs(t)
        x, tw, ids = sets[0]
        out = {}
        for name, cfg in configs.items():
            try:
                with torch.no_grad():
                    got = kernel(TritonExperts(config=cfg)).apply(x, w13, w2, tw, ids, **kw)
                err = rel_errors(got, ref)[0]
                if not err < MAX_REL_ERR:  # NaN included
                    if name == "heuristic":  # what every call without a table runs: a bug, not a candidate
                        raise RuntimeError(f"T={t}: the heuristic's config fails the accuracy check against the "
                                           f"torch backend: max rel err {err:.3g} >= {MAX_REL_ERR}")
                    log(f"T={t}: {name} skipped: max rel err {err:.3g} >= {MAX_REL_ERR} against the torch backend")
                    out[name] = math.inf
                    continue
                out[name] = time_one(cfg, sets, t <= GRAPH_MAX_TOKENS)
            except triton.runtime.errors.OutOfResources as exc:  # a tile too big for shared memory
                if name == "heuristic":
                    raise RuntimeError(f"T={t}: the heuristic's config does not fit this GPU: {exc}") from exc
                log(f"T={t}: {name} skipped: {exc}")
                out[name] = math.inf
            except ValueError as exc:
                # The ops' checks of the launch config name it ("config.block_k: ..."); any other ValueError is a
                # bug to report, and so is a refused heuristic (every call without a table would fail).
                if name == "heuristic" or not str(exc).startswith(REFUSED_CONFIG_PREFIX):
                    raise
                log(f"T={t}: {name} skipped: {exc}")
                out[name] = math.inf
        return out

    def free():
        cache.clear()
        weights.clear()
        torch.cuda.empty_cache()

    return measure, free


def table_path(preset, out_dir: Path | str | None = None, quant: str | None = None) -> Path:
    """``<out_dir>/<gpu>/<preset>[.<quant>].json``: where ``tune_preset`` writes ``preset``'s table (``out_dir``
    defaults to ``heuristics.tuned_dir()``, ``<gpu>`` is the current device's folder name)."""
    if quant is not None and quant not in BENCH_SCHEMES:
        raise ValueError(f"quant: expected None or one of {BENCH_SCHEMES}, got {quant!r}")
    return Path(out_dir or tuned_dir()) / heuristics.gpu_name() / f"{preset.name}{f'.{quant}' if quant else ''}.json"


def tune_preset(
    preset, tokens: list[int], *, out_dir: Path | None = None, dtype: torch.dtype = torch.bfloat16,
    min_gain: float = 0.03, measure: Measure | None = None, num_sms: int | None = None,
    log: Callable[[str], None] = print, quant: str | None = None,
) -> tuple[list[TunePoint], Path | None]:
    """Tune ``preset`` (a ``moekit.bench.shapes.MoEShape``) at ``tokens``; write its table under ``out_dir``.

    Returns the points and the path of the table (None when the file holds no entry for this shape: the
    heuristic won everywhere and no earlier run's entries remain). The entries are merged into the file's
    (``write_table``): T values not tuned now keep theirs. ``measure`` defaults to
    timing on the current CUDA device; tests inject their own. Tables go to ``<out_dir>/<gpu>/<name>.json``
    (``<name>.<quant>.json`` for a ``moekit.quantize`` scheme, whose entries are keyed by it) with ``<gpu>`` as
    ``heuristics`` names the current device; ``dtype`` is the activations' (and float weights') dtype.
    """
    if not tokens or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in tokens):
        raise ValueError(f"tokens: expected a non-empty list of positive ints, got {tokens!r}")
    path = table_path(preset, out_dir, quant)
    read_table(path)  # a malformed file is refused before the sweep, not after it
    free = None
    gluon = False
    if measure is None:
        device = torch.device("cuda")
        measure, free = gpu_measure(preset, device, dtype, quant=quant, log=log)
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        gluon = gluon_decode(device, dtype)
    gated = preset.activation.is_gated

    def shape_of(t: int) -> MoEShape:
        return MoEShape(num_tokens=t, top_k=preset.top_k, num_experts=preset.num_experts,
                        hidden=preset.hidden_size, inter=preset.intermediate_size, gated=gated,
                        num_sms=num_sms or 132, elem_bytes=1 if quant in QUANT_SCHEMES else dtype.itemsize,
                        weights=quant or str(dtype).removeprefix("torch."), gluon=gluon)

    try:
        points = tune_points(shape_of, tokens, measure, min_gain=min_gain, log=log)
    finally:
        if free is not None:
            free()
    written = write_table(path, shape_of(tokens[0] if tokens else 1).table_key, points)
    heuristics._tuned_tables.cache_clear()
    return points, path if written else None


def format_points(name: str, points: list[TunePoint]) -> str:
    lines = [f"{name}: {'T':>6s} {'heuristic us':>13s} {'tuned us':>9s} {'gain':>6s}  choice"]
    for p in points:
        lines.append(f"{'':{len(name)}s}  {p.tokens:6d} {p.heuristic_us:13.1f} {p.best_us:9.1f} "
                     f"{p.gain:6.1%}  {p.best_name}")
    return "\n".join(lines)


__all__ = ["TunePoint", "candidate_configs", "format_points", "read_table", "table_entries", "table_path", "tune_points",
           "tune_preset", "write_table"]
