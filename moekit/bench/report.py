"""Tables, JSON and plots of benchmark rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from moekit.bench.floor import Ceilings
from moekit.bench.run import Row


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADER = ["shape", "T", "moekit us", "TFLOP/s", "GB/s", "floor us", "% floor", "grouped_mm us", "x vs gmm",
          "eager us", "max rel err", "weights"]


def _cells(rows: Sequence[Row]) -> list[list[str]]:
    cells = []
    for r in rows:
        speedup = r.grouped_mm_us / r.moekit_us if r.grouped_mm_us else None
        cells.append([
            r.shape, str(r.tokens), _fmt(r.moekit_us, ".1f"), _fmt(r.tflops, ".2f"), _fmt(r.gbps, ".0f"),
            _fmt(r.floor_us, ".1f"), _fmt(r.efficiency and 100 * r.efficiency, ".1f"), _fmt(r.grouped_mm_us, ".1f"),
            _fmt(speedup, ".2f"), _fmt(r.eager_us, ".1f"), _fmt(r.max_rel_err, ".2e"),
            r.quant or r.dtype,  # moekit's experts: a quant scheme, else the float dtype
        ])
    return cells


def table(rows: Sequence[Row]) -> str:
    lines = [HEADER, *_cells(rows)]
    widths = [max(len(row[i]) for row in lines) for i in range(len(HEADER))]
    out = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c) + " |" for c in _cells(rows)]
    return "\n".join(lines)


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
    return rows


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
