"""The ``moekit`` command line: ``moekit bench`` (the main job), ``moekit tune``, ``moekit plot``, ``moekit eplb``,
``moekit info``.

Every check of what the user gave (flags, files, folders, device, memory, optional packages) runs before any
work, so a mistake costs no sweep and ends in one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moekit import __version__
from moekit.config import BACKENDS
from moekit.bench.floor import BENCH_SCHEMES

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
GPU_TOKENS = "1,4,16,64,256,1024,4096,16384"
# A CPU sweep of one preset at decode sizes stays well under a minute on 2 cores.
CPU_TOKENS = "1,4,16"
CPU_PRESET = "olmoe-1b-7b"
BENCH_EXTRA = "pip install 'moekit[bench]'"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EPILOG = """exit status (every command):
  0  done
  2  a usage or input error, reported in one line: a bad flag or value, a missing file or folder, malformed
     JSON, a device or preset this machine cannot run, a missing optional package (as argparse does)
  1  an internal failure (a traceback): please report it"""


class UsageError(Exception):
    """A mistake in the command line or in the files it names: one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__.splitlines()[0], epilog=EPILOG,
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"moekit {__version__}",
                        help="print moekit's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=EPILOG, formatter_class=fmt)

    b = command("bench", "time MoE shapes against the hardware floor and the baselines")
    b.add_argument("--preset", default=None,
                   help="preset name(s), comma-separated, or 'all' (default: all on GPU, olmoe-1b-7b on CPU)")
    b.add_argument("--hf-config", default=None,
                   help="read the MoE dimensions, activation and biases from a transformers config.json")
    b.add_argument("--tokens", default=None, help=f"token counts (default GPU: {GPU_TOKENS}; CPU: {CPU_TOKENS})")
    b.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="experts backend to time (auto: triton on CUDA when installed, else torch)")
    b.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights' and activations' dtype")
    b.add_argument("--quant", default=None, choices=BENCH_SCHEMES,
                   help="quantize moekit's routed experts with moekit.quantize before timing (default: none, or the "
                        "scheme of --hf-config's quantization_config); --dtype stays the activations' dtype")
    b.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    b.add_argument("--no-baselines", action="store_true", help="skip the torch grouped_mm and eager-loop baselines")
    b.add_argument("--json", default=None, help="write rows and ceilings to this JSON file")
    b.add_argument("--markdown", default=None, help="write the table as markdown to this file")
    b.add_argument("--plot", default=None, help=f"write a plot (PNG) to this file; needs matplotlib ({BENCH_EXTRA})")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights, tokens and routing")

    p = command("plot", "render a `moekit bench --json` file as a table, markdown and/or plot")
    p.add_argument("json_file", help="a file written by `moekit bench --json`")
    p.add_argument("--plot", default=None, help=f"PNG to write; needs matplotlib ({BENCH_EXTRA})")
    p.add_argument("--markdown", default=None, help="markdown table to write")

    tn = command("tune", "time launch configs around the heuristics; write a tuned table (CUDA)")
    tn.add_argument("--preset", required=True, help="preset name(s), comma-separated, or 'all'")
    tn.add_argument("--tokens", default=GPU_TOKENS, help=f"token counts (default {GPU_TOKENS})")
    tn.add_argument("--dtype", default="bf16", choices=["bf16", "bfloat16", "fp16", "float16"],
                    help="weights' and activations' dtype")
    tn.add_argument("--quant", default=None, choices=BENCH_SCHEMES,
                    help="tune the layer quantized with this moekit.quantize scheme (its own table, "
                         "<preset>.<scheme>.json)")
    tn.add_argument("--out", default=None, help="tables folder (default: $MOEKIT_TUNED_DIR or moekit/ops/tuned)")
    tn.add_argument("--min-gain", type=float, default=0.03,
                    help="keep a tuned config only if it saves this fraction of the heuristic's time")

    ep = command("eplb", "plan expert-parallel load balancing (EPLB) from recorded or synthetic expert loads")
    ep.add_argument("load_file", nargs="?", default=None,
                    help="loads per layer and expert: a .json or .csv file (ExpertLoadRecorder.save)")
    ep.add_argument("--synthetic-skew", type=float, default=None, metavar="S",
                    help="instead of a file: Zipf-like loads, P(j-th most popular expert) ~ 1/j^S (0 = uniform)")
    ep.add_argument("--layers", type=int, default=None, help="synthetic: layers (default 4)")
    ep.add_argument("--experts", type=int, default=None, help="synthetic: experts per layer (default 64)")
    ep.add_argument("--tokens", type=int, default=None, help="synthetic: routed entries per layer (default 65536)")
    ep.add_argument("--seed", type=int, default=None, help="synthetic: seed of the loads (default 0)")
    ep.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks (GPUs) over all nodes")
    ep.add_argument("--redundant", type=int, default=0, help="redundant expert slots (physical = experts + this)")
    ep.add_argument("--groups", type=int, default=1, help="expert groups of group-limited routing")
    ep.add_argument("--nodes", type=int, default=1,
                    help="nodes (hierarchical plan when they divide --groups, else global)")
    ep.add_argument("--layer", type=int, default=None,
                    help="layer shown per rank (default: the least balanced before EPLB)")
    ep.add_argument("--png", default=None,
                    help=f"draw per-rank load bars and an expert->rank heatmap; needs matplotlib ({BENCH_EXTRA})")

    command("info", "versions, devices and available backends")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (see ``EPILOG``). ``argv`` defaults to ``sys.argv[1:]``."""
    # Kept to record in bench's JSON: sys.argv is another program's when main(argv) is called from Python.
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # argparse: --help/--version (0) or a usage error it already printed (2)
        return EXIT_OK if done.code is None else int(done.code)
    args.argv = argv
    commands: dict[str, Callable[[argparse.Namespace], int]] = {"bench": bench, "plot": replot, "tune": tune,
                                                                 "eplb": eplb, "info": _info}
    try:
        return commands[args.command](args)
    except UsageError as err:
        print(f"moekit {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`moekit eplb ... | head`): what it read was complete; no traceback. Python's own
        # flush at exit would raise again on the closed pipe: point stdout at devnull first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    print(json.dumps(info(), indent=2))
    return EXIT_OK


def info() -> dict:
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


# ---- checks: each raises UsageError before any work ----

def _device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {text!r} (moekit runs on CPU and CUDA)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device is visible"
            raise UsageError(f"--device {text}: CUDA is not available here ({build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _check_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> None:
    from moekit.kernel import available_backends

    if backend != "auto" and backend not in available_backends(device):
        raise UsageError(f"--backend {backend}: not available on {device.type} here; "
                         f"expected auto or one of {available_backends(device)}")
    if backend == "triton" and device.type != "cuda" and dtype == torch.bfloat16:
        raise UsageError("--backend triton on the CPU runs in Triton's interpreter, which computes bf16 dots "
                         "wrongly: pass --dtype fp16 or fp32")


def _check_outputs(args: argparse.Namespace) -> None:
    """The folders of --json/--markdown/--plot/--png exist and are writable; --plot/--png have matplotlib."""
    for flag in ("json", "markdown", "plot", "png"):
        path = getattr(args, flag, None)
        if path is None:
            continue
        folder = Path(path).parent
        if Path(path).is_dir():
            raise UsageError(f"--{flag} {path}: is a folder; expected a file name")
        if not folder.is_dir():
            raise UsageError(f"--{flag} {path}: the folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--{flag} {path}: the folder {str(folder)!r} is not writable")
        if Path(path).exists() and not os.access(path, os.W_OK):  # found before the sweep, not after it
            raise UsageError(f"--{flag} {path}: the file exists and is not writable")
    for flag in ("plot", "png"):
        path = getattr(args, flag, None)
        if path:
            from moekit.bench.report import require_matplotlib

            try:
                require_matplotlib()
            except ImportError as err:
                raise UsageError(f"--{flag}: {err}") from None
            from matplotlib.backend_bases import FigureCanvasBase

            kinds = FigureCanvasBase.get_supported_filetypes()
            suffix = Path(path).suffix.lower().lstrip(".")
            if suffix not in kinds:  # matplotlib would fail after the sweep, or add .png to a name without one
                raise UsageError(f"--{flag} {path}: expected a file name ending in an image type matplotlib writes "
                                 f"(.png, .svg, .pdf, ...), got {('.' + suffix) if suffix else 'no suffix'}")


_SEED_MAX = 2**63 - 2**20  # room for the per-point offsets added to it


def _check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed < _SEED_MAX:
        raise UsageError(f"--seed: expected an int in [0, 2**63 - 2**20), got {seed}")


def _check_sizes(shapes, quant: str | None) -> None:
    """Sizes the scheme cannot store, refused before any work (mxfp4 scales blocks of 32 columns): the method's
    own check, which would otherwise raise while the sweep makes the weights."""
    if quant != "mxfp4":
        return
    from moekit.quant.mxfp4 import _check_sizes as check_mxfp4_sizes

    for shape in shapes:
        try:
            check_mxfp4_sizes(shape.hidden_size, shape.intermediate_size)
        except ValueError as err:
            raise UsageError(f"--quant mxfp4: {shape.name}: {err}") from None


def device_memory_bytes(device: torch.device) -> int | None:
    """Memory a sweep can take: free memory of a CUDA device; on the CPU the RAM available now (Linux's
    MemAvailable, within a cgroup's limit), else the total RAM; None where the OS says neither."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    # Total RAM alone is not enough: other processes' memory counts, and going over it gets the sweep killed.
    sizes = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        sizes.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            sizes.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not sizes:
        try:
            sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
            return None
    return min(sizes)


def _check_memory(shapes, dtype: torch.dtype, device: torch.device, tokens: list[int] = (),
                  quant: str | None = None) -> None:
    """Refuse up front a shape whose expert weights (+ their ``quant`` copy, + the fp32 reference's working set,
    + the activations of its largest token count) cannot fit."""
    from moekit.bench.floor import moe_bytes
    from moekit.bench.run import REF_CHUNK_BYTES

    available = device_memory_bytes(device)
    if available is None:
        return
    where = f"{torch.cuda.get_device_name(device)} has" if device.type == "cuda" else "this machine has"
    what = "free" if device.type == "cuda" else "of RAM available"
    for shape in shapes:
        weights = moe_bytes(shape, 0, shape.num_experts, dtype.itemsize)  # every expert, biases included
        # The correctness check holds fp32 copies of up to REF_CHUNK_BYTES of experts beside the weights.
        needed = weights + min(REF_CHUNK_BYTES, weights * 4 // dtype.itemsize)
        # --quant keeps the float weights (baselines, reference) beside the quantized experts moekit runs.
        quantized = 0 if quant is None else moe_bytes(shape, 0, shape.num_experts, dtype.itemsize, quant)
        needed += quantized
        # On a CPU the torch backend packs an unquantized layer's experts for oneDNN as they run
        # (moekit.kernel.cpu_packed): a second copy of the weights.
        packed = weights if device.type == "cpu" and quant is None else 0
        needed += packed
        # Activations, counted in fp32 and generously: x, the output, the reference's and a baseline's outputs
        # ([T, H] each), and the routed rows' GEMM 1 and GEMM 2 outputs ([T·K, 2I + H]).
        t = max(tokens, default=0)
        acts = 4 * (4 * t * shape.hidden_size + t * shape.top_k * (2 * shape.intermediate_size + shape.hidden_size))
        if needed + acts > available:
            with_acts = f", {acts / 1e9:.1f} GB more for the activations of T = {t}" if acts else ""
            with_quant = f" their {quant} copy and" if quant else " their CPU-packed copy and" if packed else ""
            raise UsageError(f"{shape.name}: its {str(dtype).removeprefix('torch.')} expert weights take "
                             f"{weights / 1e9:.1f} GB ({needed / 1e9:.1f} GB with{with_quant} the reference check"
                             f"{with_acts}), "
                             f"and {where} {available / 1e9:.1f} GB {what}; pick a smaller preset, fewer tokens or "
                             "another device")


def _check_tune_out(args: argparse.Namespace, shapes) -> None:
    """tune's tables folder (--out, else the default) is a writable folder, and the tables already there, which
    the run merges into, read: a mistake costs no sweep."""
    from moekit.bench.tune import read_table, table_path
    from moekit.ops.heuristics import tuned_dir

    folder = Path(args.out) if args.out else tuned_dir()
    flag = f"--out {args.out}" if args.out else f"the tables folder {str(folder)!r} (--out)"
    if not folder.is_dir():
        raise UsageError(f"{flag}: {'is not a folder' if folder.exists() else 'does not exist'}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag}: is not writable")
    for shape in shapes:
        try:
            read_table(table_path(shape, folder, args.quant))
        except ValueError as err:  # names the file
            raise UsageError(str(err)) from None


def _preset_shapes(text: str):
    from moekit.bench.shapes import PRESETS

    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        names = list(PRESETS)
    if not names:
        raise UsageError(f"--preset: expected 'all' or some of {list(PRESETS)}, got {text!r}")
    if "all" in names:
        raise UsageError(f"--preset: 'all' stands alone (it is every preset), got {text!r}")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise UsageError(f"--preset: unknown {unknown}; expected 'all' or some of {list(PRESETS)}")
    return [PRESETS[n] for n in dict.fromkeys(names)]  # a repeated name once


def _shapes(args: argparse.Namespace, device: torch.device):
    from moekit.bench.shapes import shape_from_hf_config

    if args.hf_config is not None:
        if args.preset is not None:
            raise UsageError("give --preset or --hf-config, not both")
        try:
            return [shape_from_hf_config(args.hf_config)]
        except OSError as err:
            raise UsageError(f"--hf-config {args.hf_config}: {err.strerror or err}") from None
        except ValueError as err:  # names the file and the field
            raise UsageError(str(err)) from None
    return _preset_shapes(args.preset if args.preset is not None else ("all" if device.type == "cuda" else CPU_PRESET))


def _quant_scheme(args: argparse.Namespace) -> str | None:
    """--quant, or the scheme of --hf-config's quantization_config (they must agree when both are given)."""
    from moekit.quant import UnsupportedQuantization, get_quant_method

    if args.hf_config is None:
        return args.quant
    # The file was read and checked by _shapes already; only its quantization_config is looked at here.
    cfg = json.loads(Path(args.hf_config).read_text())
    cfg_q = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if cfg_q is None:
        return args.quant
    try:
        method = get_quant_method(cfg_q)
    except (TypeError, UnsupportedQuantization) as err:
        raise UsageError(f"--hf-config {args.hf_config}: {err}") from None
    if method.name not in BENCH_SCHEMES:  # a loadable format moekit.quantize cannot make (e.g. 4-bit g64)
        raise UsageError(f"--hf-config {args.hf_config}: {method.name} (quantization_config) is not benchmarked "
                         f"yet; moekit bench --quant runs {BENCH_SCHEMES}")
    if getattr(method, "static_input_scales", False):
        # Static scales come from a checkpoint's calibration; random weights have none (moekit.quantize refuses).
        print(f"moekit bench: {args.hf_config} uses static activation scales; timing {method.name} with dynamic "
              "ones (random weights have no calibrated scales)", file=sys.stderr)
    if args.quant is not None and args.quant != method.name:
        raise UsageError(f"--quant {args.quant}: --hf-config {args.hf_config} is quantized as {method.name} "
                         f"(quantization_config); drop --quant or pass --quant {method.name}")
    return method.name


def _tokens(text: str) -> list[int]:
    try:
        tokens = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--tokens: expected comma-separated ints, got {text!r}") from None
    # T = 0 times nothing: its floor is 0 (no expert is touched), which turned the whole plot into latencies.
    if not tokens or min(tokens) < 1:
        raise UsageError(f"--tokens: expected positive ints, got {text!r}")
    return tokens


# ---- commands ----

def bench(args: argparse.Namespace) -> int:
    from moekit.bench import bench_point, measure_ceilings
    from moekit.bench.report import table, write_json
    from moekit.bench.run import make_weights

    device = _device(args.device)
    shapes = _shapes(args, device)
    tokens = _tokens(args.tokens if args.tokens is not None else (GPU_TOKENS if device.type == "cuda" else CPU_TOKENS))
    dtype = DTYPES[args.dtype]
    quant = _quant_scheme(args)
    _check_backend(args.backend, device, dtype)
    _check_outputs(args)
    _check_seed(args.seed)
    _check_sizes(shapes, quant)
    _check_memory(shapes, dtype, device, tokens, quant)

    # cuda:N made current: do_bench's events, CUDA graphs and Triton launches go to the current device, not to the
    # device of the tensors (everything ran on cuda:0 before).
    with _on_device(device):
        ceilings = measure_ceilings(device, quant, dtype) if device.type == "cuda" else None
        if ceilings:
            print(f"ceilings: read {ceilings.read_bw / 1e12:.2f} TB/s, {ceilings.mm_dtype} matmul "
                  f"{ceilings.mm_rate / 1e12:.0f} TFLOP/s", file=sys.stderr)
        points = [(s, t) for s in shapes for t in tokens]
        rows = []
        weights = {}
        for shape, t in _progress(points):
            if shape.name not in weights:
                weights.clear()  # one shape's weights at a time: deepseek-v3's alone are 22 GB in bf16
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                weights[shape.name] = make_weights(shape, dtype, device, args.seed, quant)
            rows.append(bench_point(shape, t, backend=args.backend, dtype=dtype, device=device, ceilings=ceilings,
                                    weights=weights[shape.name], baselines=not args.no_baselines, seed=args.seed,
                                    quant=quant))
    weights_text = args.dtype if quant is None else f"{quant} experts ({args.dtype} activations and baselines)"
    print(f"moekit bench on {_device_name(device)}, {weights_text}, "
          f"backend {rows[0].backend if rows else args.backend}"
          + ("" if ceilings else " (no floor on CPU: the floor is defined for GPUs)"))
    print(table(rows))
    _warn(args.command, rows)
    meta = {**info(), "device": _device_name(device), "dtype": args.dtype, "quant": quant, "command": " ".join(["moekit", *args.argv])}
    if args.json:
        write_json(args.json, rows, meta, ceilings)
    _write_outputs(rows, args)
    return EXIT_OK


def replot(args: argparse.Namespace) -> int:
    from moekit.bench.report import read_json, table

    _check_outputs(args)
    try:
        rows = read_json(args.json_file)
    except OSError as err:
        raise UsageError(f"{args.json_file}: {err.strerror or err}") from None
    except ValueError as err:  # names the file
        raise UsageError(str(err)) from None
    print(table(rows))
    _warn(args.command, rows)
    _write_outputs(rows, args)
    return EXIT_OK


def _warn(command: str, rows) -> None:
    """The table's warnings on stderr: points off the reference (the run still succeeds: the timings are
    printed and saved, flagged), and a busy machine."""
    from moekit.bench.report import error_warning, noise_warning

    for warning in (error_warning(rows), noise_warning(rows)):
        if warning:
            print(f"moekit {command}: {warning}", file=sys.stderr)


def tune(args: argparse.Namespace) -> int:
    shapes = _preset_shapes(args.preset)
    tokens = _tokens(args.tokens)
    if not 0 <= args.min_gain < 1:
        raise UsageError(f"--min-gain: expected a fraction in [0, 1), got {args.min_gain}")
    _check_tune_out(args, shapes)
    if not torch.cuda.is_available():
        raise UsageError("needs a CUDA device (it times the Triton kernels); none is available")
    dtype = DTYPES[args.dtype]
    _check_memory(shapes, dtype, torch.device("cuda"), tokens, args.quant)
    from moekit.bench.tune import format_points, tune_preset

    for shape in shapes:
        points, path = tune_preset(shape, tokens, out_dir=args.out, dtype=dtype, min_gain=args.min_gain,
                                   log=lambda s: print(s, file=sys.stderr, flush=True), quant=args.quant)
        print(format_points(shape.name, points))
        print(f"  -> {path}" if path else "  -> no table: the heuristic is within --min-gain everywhere", flush=True)
    return EXIT_OK


def eplb(args: argparse.Namespace) -> int:
    from moekit.distributed import eplb_report

    _check_outputs(args)
    _check_seed(args.seed)
    try:
        load, source = eplb_report.load_from_args(args)
        plan = eplb_report.make_plan(load, num_redundant=args.redundant, num_groups=args.groups,
                                     num_nodes=args.nodes, num_ranks=args.ranks)
        layer = eplb_report.pick_layer(plan, args.layer)
    except eplb_report.InputError as err:
        raise UsageError(str(err)) from None
    print(eplb_report.format_plan(plan, layer, source))
    if args.png:
        eplb_report.plot_plan(args.png, plan, layer)
    return EXIT_OK


def _write_outputs(rows, args: argparse.Namespace) -> None:
    """The optional --markdown and --plot files of ``bench`` and ``plot`` (their folders are checked first)."""
    from moekit.bench.report import markdown, plot

    if args.markdown:
        Path(args.markdown).write_text(markdown(rows) + "\n")
    if args.plot:
        plot(args.plot, rows)


def _on_device(device: torch.device):
    """A context in which ``device`` is the current CUDA device (nothing to do on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})"


def _progress(items):
    """A tqdm progress bar when tqdm is installed (moekit[bench]); without it the sweep runs silently."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="moekit bench", unit="point", file=sys.stderr, leave=False)


if __name__ == "__main__":
    sys.exit(main())
