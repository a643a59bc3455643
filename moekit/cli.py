"""The ``moekit`` command line: ``moekit bench`` (the main job), ``moekit tune``, ``moekit plot``, ``moekit info``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence

import torch

from moekit.config import BACKENDS

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
GPU_TOKENS = "1,4,16,64,256,1024,4096,16384"
# A CPU sweep of one preset at decode sizes stays well under a minute on 2 cores.
CPU_TOKENS = "1,4,16"
CPU_PRESET = "olmoe-1b-7b"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time MoE shapes against the hardware floor and the baselines")
    b.add_argument("--preset", default=None,
                   help="preset name(s), comma-separated, or 'all' (default: all on GPU, olmoe-1b-7b on CPU)")
    b.add_argument("--hf-config", default=None, help="read the MoE dimensions from a transformers config.json")
    b.add_argument("--tokens", default=None, help=f"token counts (default GPU: {GPU_TOKENS}; CPU: {CPU_TOKENS})")
    b.add_argument("--backend", default="auto", choices=list(BACKENDS))
    b.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    b.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    b.add_argument("--no-baselines", action="store_true", help="skip the torch grouped_mm and eager-loop baselines")
    b.add_argument("--json", default=None, help="write rows and ceilings to this JSON file")
    b.add_argument("--markdown", default=None, help="write the table as markdown to this file")
    b.add_argument("--plot", default=None, help="write a plot (PNG) to this file; needs matplotlib")
    b.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("plot", help="render a `moekit bench --json` file as a table, markdown and/or plot")
    p.add_argument("json_file")
    p.add_argument("--plot", default=None, help="PNG to write")
    p.add_argument("--markdown", default=None, help="markdown table to write")

    tn = sub.add_parser("tune", help="time launch configs around the heuristics; write a tuned table (CUDA)")
    tn.add_argument("--preset", required=True, help="preset name(s), comma-separated, or 'all'")
    tn.add_argument("--tokens", default=GPU_TOKENS, help=f"token counts (default {GPU_TOKENS})")
    tn.add_argument("--dtype", default="bf16", choices=["bf16", "bfloat16", "fp16", "float16"])
    tn.add_argument("--out", default=None, help="tables folder (default: $MOEKIT_TUNED_DIR or moekit/ops/tuned)")
    tn.add_argument("--min-gain", type=float, default=0.03, help="keep a tuned config only if this much faster")

    sub.add_parser("info", help="versions, devices and available backends")

    # Kept to record in bench's JSON: sys.argv is another program's when main(argv) is called from Python.
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "info":
        print(json.dumps(info(), indent=2))
        return 0
    if args.command == "plot":
        return replot(args)
    if args.command == "tune":
        return tune(args)
    return bench(args)


def tune(args: argparse.Namespace) -> int:
    from moekit.bench.shapes import PRESETS

    names = list(PRESETS) if args.preset == "all" else [n.strip() for n in args.preset.split(",")]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        print(f"moekit tune: --preset: unknown {unknown}; expected 'all' or some of {list(PRESETS)}", file=sys.stderr)
        return 2
    tokens = _tokens(args.tokens, "tune")
    if not torch.cuda.is_available():
        print("moekit tune: needs a CUDA device (it times the Triton kernels); none is available", file=sys.stderr)
        return 2
    from moekit.bench.tune import format_points, tune_preset

    for name in names:
        points, path = tune_preset(PRESETS[name], tokens, out_dir=args.out, dtype=DTYPES[args.dtype],
                                   min_gain=args.min_gain, log=lambda s: print(s, file=sys.stderr, flush=True))
        print(format_points(name, points))
        print(f"  -> {path}" if path else "  -> no table: the heuristic is within --min-gain everywhere", flush=True)
    return 0


def replot(args: argparse.Namespace) -> int:
    from moekit.bench.report import read_json, table

    rows = read_json(args.json_file)
    print(table(rows))
    _write_outputs(rows, args)
    return 0


def _write_outputs(rows, args: argparse.Namespace) -> None:
    """The optional --markdown and --plot files of ``bench`` and ``plot``."""
    from moekit.bench.report import markdown, plot

    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows) + "\n")
    if args.plot:
        plot(args.plot, rows)


def info() -> dict:
    from moekit import __version__
    from moekit.kernel import available_backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return {
        "moekit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "devices": devices,
        "backends": {"cpu": available_backends("cpu"),
                     **({"cuda": available_backends("cuda")} if torch.cuda.is_available() else {})},
    }


def _shapes(args: argparse.Namespace, device: torch.device):
    from moekit.bench.shapes import PRESETS, shape_from_hf_config

    if args.hf_config:
        if args.preset:
            raise SystemExit("moekit bench: give --preset or --hf-config, not both")
        try:
            return [shape_from_hf_config(args.hf_config)]
        except (OSError, ValueError) as err:  # a bad file is the user's input: no traceback
            raise SystemExit(f"moekit bench: {err}") from None
    names = args.preset or ("all" if device.type == "cuda" else CPU_PRESET)
    names = list(PRESETS) if names == "all" else [n.strip() for n in names.split(",")]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise SystemExit(f"moekit bench: --preset: unknown {unknown}; expected 'all' or some of {list(PRESETS)}")
    return [PRESETS[n] for n in names]


def _tokens(text: str, command: str = "bench") -> list[int]:
    try:
        tokens = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"moekit {command}: --tokens: expected comma-separated ints, got {text!r}") from None
    if not tokens or min(tokens) < 0:
        raise SystemExit(f"moekit {command}: --tokens: expected non-negative ints, got {text!r}")
    return tokens


def bench(args: argparse.Namespace) -> int:
    from moekit.bench import bench_point, measure_ceilings
    from moekit.bench.report import table, write_json
    from moekit.bench.run import make_weights

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = _shapes(args, device)
    tokens = _tokens(args.tokens or (GPU_TOKENS if device.type == "cuda" else CPU_TOKENS))
    dtype = DTYPES[args.dtype]
    ceilings = measure_ceilings(device) if device.type == "cuda" else None
    if ceilings:
        print(f"ceilings: read {ceilings.read_bw / 1e12:.2f} TB/s, bf16 matmul {ceilings.mm_rate / 1e12:.0f} TFLOP/s",
              file=sys.stderr)
    points = [(s, t) for s in shapes for t in tokens]
    rows = []
    weights = {}
    for shape, t in _progress(points):
        if shape.name not in weights:
            weights.clear()  # one shape's weights at a time: deepseek-v3's alone are 22 GB in bf16
            if device.type == "cuda":
                torch.cuda.empty_cache()
            weights[shape.name] = make_weights(shape, dtype, device, args.seed)
        rows.append(bench_point(shape, t, backend=args.backend, dtype=dtype, device=device, ceilings=ceilings,
                                weights=weights[shape.name], baselines=not args.no_baselines, seed=args.seed))
    print(f"moekit bench on {_device_name(device)}, {args.dtype}, backend {rows[0].backend if rows else args.backend}"
          + ("" if ceilings else " (no floor on CPU: the floor is defined for GPUs)"))
    print(table(rows))
    meta = {**info(), "device": _device_name(device), "dtype": args.dtype, "command": " ".join(["moekit", *args.argv])}
    if args.json:
        write_json(args.json, rows, meta, ceilings)
    _write_outputs(rows, args)
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})"


def _progress(items):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="moekit bench", unit="point", file=sys.stderr, leave=False)


if __name__ == "__main__":
    sys.exit(main())
