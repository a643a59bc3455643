"""Tables, JSON and plots of benchmark rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from moekit.bench.floor import Ceilings
from moekit.bench.run import Row
from moekit.bench.timing import NOISY_SPREAD


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ratio(baseline_us: float | None, moekit_us: float) -> float | None:
    return baseline_us / moekit_us if baseline_us else None


# Rates print in the largest unit in which the table's largest value reads >= 10, so that a CPU's GFLOP/s do not
# print as 0.00 TFLOP/s; a GPU table keeps TFLOP/s and GB/s.
_FLOP_UNITS = (("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6), ("kFLOP/s", 1e3))
_BYTE_UNITS = (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3))


def _unit(values: Sequence[float], units: Sequence[tuple[str, float]]) -> tuple[str, float]:
    """``(name, scale)`` of the unit for ``values`` (in units of one, e.g. flop/s)."""
    top = max(values, default=0.0)
    return next(((name, scale) for name, scale in units if top >= 10 * scale), units[-1])


def _columns(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells. ``min us`` and ``spread`` (interquartile range / median of moekit's rounds) appear when a
    row has them (CPU runs); the ``us`` columns are medians."""
    flop_name, flop_scale = _unit([r.tflops * 1e12 for r in rows], _FLOP_UNITS)
    byte_name, byte_scale = _unit([r.gbps * 1e9 for r in rows], _BYTE_UNITS)
    stats = any(r.moekit_min_us is not None for r in rows)
    header = ["shape", "T", "moekit us", *(["min us", "spread"] if stats else []), flop_name, byte_name, "floor us",
              "% floor", "grouped_mm us", "x vs gmm", "eager us", "x vs eager", "max rel err", "weights"]
    cells = []
    for r in rows:
        spread = None if r.moekit_spread is None else 100 * r.moekit_spread
        cells.append([
            r.shape, str(r.tokens), _fmt(r.moekit_us, ".1f"),
            *([_fmt(r.moekit_min_us, ".1f"), "-" if spread is None else f"{spread:.0f}%"] if stats else []),
            _fmt(r.tflops * 1e12 / flop_scale, ".2f"), _fmt(r.gbps * 1e9 / byte_scale, ".0f"),
            _fmt(r.floor_us, ".1f"), _fmt(r.efficiency and 100 * r.efficiency, ".1f"), _fmt(r.grouped_mm_us, ".1f"),
            _fmt(_ratio(r.grouped_mm_us, r.moekit_us), ".2f"), _fmt(r.eager_us, ".1f"),
            _fmt(_ratio(r.eager_us, r.moekit_us), ".2f"), _fmt(r.max_rel_err, ".2e") + ("!" if r.error_exceeds else ""),
            r.quant or r.dtype,  # moekit's experts: a quant scheme, else the float dtype
        ])
    return header, cells


def table(rows: Sequence[Row]) -> str:
    header, cells = _columns(rows)
    lines = [header, *cells]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(rows: Sequence[Row]) -> str:
    header, cells = _columns(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def noise_warning(rows: Sequence[Row]) -> str | None:
    """A warning naming the points whose rounds spread by more than ``NOISY_SPREAD`` (another process was using
    the CPU), or None."""
    noisy = [r for r in rows if r.max_spread is not None and r.max_spread > NOISY_SPREAD]
    if not noisy:
        return None
    def worst(r: Row) -> str:  # which variant spread (the table's column is moekit's alone)
        named = [(s, n) for s, n in ((r.moekit_spread, "moekit"), (r.grouped_mm_spread, "grouped_mm"),
                                     (r.eager_spread, "eager")) if s is not None]
        s, name = max(named)
        return f"{name} {100 * s:.1f}%"

    where = ", ".join(f"{r.shape} T={r.tokens} ({worst(r)})" for r in noisy)
    return (f"warning: timings spread by more than {100 * NOISY_SPREAD:.0f}% between rounds at {where}: the machine "
            "was busy. The ratios (moekit and the baselines timed in the same interleaved rounds) still compare; "
            "for absolute numbers rerun on a quiet machine.")


def error_warning(rows: Sequence[Row]) -> str | None:
    """A warning naming the points whose output is further from the reference than their tolerance (marked "!"
    in the table): a fast row of a wrong kernel must not pass unnoticed. None when every point is within."""
    bad = [r for r in rows if r.error_exceeds]
    if not bad:
        return None
    where = ", ".join(f"{r.shape} T={r.tokens} {r.backend} {r.quant or r.dtype} ({r.max_rel_err:.2e} > "
                      f"{r.max_rel_err_tol:.2g})" for r in bad)
    return (f"warning: moekit's output is off the reference by more than the tolerance at {where}: those timings "
            "are of a wrong result (marked '!' in the table)")


def write_json(path: str | Path, rows: Sequence[Row], meta: dict, ceilings: Ceilings | None) -> None:
    doc = {
        "meta": meta,
        "ceilings": None if ceilings is None else {"read_bw_Bps": ceilings.read_bw, "mm_rate_flops": ceilings.mm_rate,
                                                   "mm_dtype": ceilings.mm_dtype},
        "rows": [r.as_dict() for r in rows],
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def read_json(path: str | Path) -> list[Row]:
    """Rows of a file written by ``write_json``; ``ValueError`` naming ``path`` when it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    try:
        rows = [Row(**r) for r in doc["rows"]]
    except (KeyError, TypeError) as err:  # no "rows", or rows with other fields than Row's
        raise ValueError(f"{path}: not a `moekit bench --json` file ({type(err).__name__}: {err})") from None
    if not rows:
        raise ValueError(f"{path}: a `moekit bench --json` file with no rows: nothing to show")
    for i, row in enumerate(rows):  # a hand-edited value would fail in the table's formatting, as a traceback
        _check_row(path, i, row)
    return rows


def _check_row(path: str | Path, i: int, row: Row) -> None:
    def number(name: str, optional: bool, positive: bool = False) -> None:
        value = getattr(row, name)
        if value is None and optional:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        if not ok or (positive and not value > 0):
            raise ValueError(f"{path}: row {i} ({row.shape!r}): {name} is {value!r}, expected a "
                             f"{'positive ' if positive else ''}number{' or null' if optional else ''}")

    if isinstance(row.tokens, bool) or not isinstance(row.tokens, int) or row.tokens < 1:
        raise ValueError(f"{path}: row {i}: tokens is {row.tokens!r}, expected a positive int")
    number("moekit_us", False, positive=True)
    for name in ("tflops", "gbps"):
        number(name, False)
    for name in ("grouped_mm_us", "eager_us", "floor_us", "moekit_min_us", "grouped_mm_min_us", "eager_min_us"):
        number(name, True, positive=True)
    for name in ("efficiency", "moekit_spread", "grouped_mm_spread", "eager_spread", "max_rel_err_tol"):
        number(name, True)
    if isinstance(row.max_rel_err, bool) or not isinstance(row.max_rel_err, (int, float)):  # NaN: a broken kernel
        raise ValueError(f"{path}: row {i}: max_rel_err is {row.max_rel_err!r}, expected a number")


def require_matplotlib():
    """The matplotlib module, or an ImportError that says which extra installs it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib, which is not installed: pip install 'moekit[bench]'") from None
    return matplotlib


def plot(path: str | Path, rows: Sequence[Row]) -> None:
    """Per shape: moekit and the baselines, as % of floor (GPU) or latency (CPU) against T."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.6), squeeze=False)
    use_floor = all(r.floor_us for r in rows)
    for ax, name in zip(axes[0], shapes):
        rs = [r for r in rows if r.shape == name]
        ts = [r.tokens for r in rs]
        series = {"moekit": [r.moekit_us for r in rs], "torch grouped_mm": [r.grouped_mm_us for r in rs],
                  "eager loop": [r.eager_us for r in rs]}
        for label, us in series.items():
            pts = [(t, (100 * r.floor_us / u) if use_floor else u) for t, u, r in zip(ts, us, rs) if u]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        if not use_floor:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("tokens")
        ax.set_ylabel("% of floor" if use_floor else "latency (us)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
