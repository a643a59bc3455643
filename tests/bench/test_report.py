"""The benchmark table: rates in a unit that shows them, CPU rounds' minimum and spread, the busy-machine
warning, and files written before these fields existed."""

import json

from moekit.bench.report import error_warning, markdown, noise_warning, read_json, table
from moekit.bench.run import Row


def _row(tokens=1, moekit_us=4000.0, tflops=3e-5, gbps=25.0, **kw) -> Row:
    base = dict(shape="olmoe-1b-7b", tokens=tokens, backend="torch", dtype="bfloat16", moekit_us=moekit_us,
                tflops=tflops, gbps=gbps, active_experts=8, floor_us=None, efficiency=None, max_rel_err=4e-3,
                grouped_mm_us=4400.0, eager_us=8000.0, graph=False)
    return Row(**{**base, **kw})


def _column(rows: list[Row], name: str) -> list[str]:
    """The cells of column ``name`` (read from the markdown table, whose cells are delimited)."""
    header, _, *lines = [[c.strip() for c in line.strip("|").split("|")] for line in markdown(rows).splitlines()]
    return [line[header.index(name)] for line in lines]


def test_cpu_rates_print_in_units_that_show_them():
    # 3e-5 TFLOP/s printed as "0.00" TFLOP/s before; 0.4 GB/s as "0".
    rows = [_row(tflops=3e-5, gbps=0.4), _row(tokens=16, tflops=6e-5, gbps=0.9)]
    text = table(rows)
    assert "TFLOP/s" not in text and "GB/s" not in text
    assert _column(rows, "MFLOP/s") == ["30.00", "60.00"]
    assert _column(rows, "MB/s") == ["400", "900"]


def test_gpu_rates_keep_tflops_and_gbps():
    rows = [_row(tflops=0.5, gbps=3000.0), _row(tokens=4096, tflops=600.0, gbps=4000.0)]
    assert _column(rows, "TFLOP/s") == ["0.50", "600.00"] and _column(rows, "GB/s") == ["3000", "4000"]


def test_cpu_rows_show_min_spread_and_both_ratios():
    row = _row(moekit_min_us=3900.0, moekit_spread=0.04, grouped_mm_spread=0.02, eager_spread=0.03)
    assert _column([row], "min us") == ["3900.0"] and _column([row], "spread") == ["4%"]
    assert _column([row], "x vs gmm") == ["1.10"] and _column([row], "x vs eager") == ["2.00"]  # 4400, 8000 / 4000
    assert "min us" in table([row])
    assert "min us" not in table([_row()])  # no rounds (CUDA's do_bench, older files): no such columns
    md = markdown([row]).splitlines()
    assert len({line.count("|") for line in md}) == 1


def test_noise_warning_names_the_busy_points():
    quiet = _row(moekit_spread=0.03, grouped_mm_spread=0.05, eager_spread=0.02)
    busy = _row(tokens=16, moekit_spread=0.04, grouped_mm_spread=0.35, eager_spread=0.02)
    assert noise_warning([quiet, _row()]) is None
    warning = noise_warning([quiet, busy])
    assert "olmoe-1b-7b T=16 (grouped_mm 35.0%)" in warning and "T=1 " not in warning  # which variant: the
    # table shows moekit's spread only


def test_files_without_the_cpu_fields_still_read(tmp_path):
    old = {k: v for k, v in _row().as_dict().items() if "min_us" not in k and "spread" not in k}
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"meta": {}, "ceilings": None, "rows": [old]}))
    (row,) = read_json(path)
    assert row.moekit_min_us is None and row.max_spread is None


def test_rows_off_the_reference_are_marked_and_named():
    # A wrong kernel is a fast row: its error column is flagged against the row's tolerance and a warning names it.
    good = _row(max_rel_err=4e-3, max_rel_err_tol=4e-2)
    wrong = _row(tokens=16, max_rel_err=0.5, max_rel_err_tol=4e-2)
    nan = _row(tokens=64, max_rel_err=float("nan"), max_rel_err_tol=4e-2)
    assert _column([good, wrong, nan], "max rel err") == ["4.00e-03", "5.00e-01!", "nan!"]
    assert error_warning([good]) is None and error_warning([_row(max_rel_err=0.5)]) is None  # older files: no tol
    warning = error_warning([good, wrong, nan])
    assert "olmoe-1b-7b T=16 torch bfloat16 (5.00e-01 > 0.04)" in warning and "T=64" in warning
    assert "T=1 " not in warning
    assert "(2.00e-01 > 0.15)" in error_warning([_row(max_rel_err=0.2, max_rel_err_tol=0.15, quant="fp8_block")])
