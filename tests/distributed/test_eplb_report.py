"""``moekit eplb``: plans from a recorded load file (JSON/CSV) or a synthetic skew, the printed table, the PNG,
and the one-line exit-2 answer to every input mistake."""

import json
import re
import sys

import pytest
import torch

from moekit.cli import main
from moekit.distributed import ExpertLoadRecorder, write_expert_load
from moekit.distributed.eplb_report import linear_rank_loads, make_plan, synthetic_load

EXAMPLE_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]


def _usage_error(capsys, argv) -> str:
    """``argv`` must exit 2 with one line on stderr and print nothing on stdout; returns that line."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1 and "Traceback" not in err
    return err.strip()


@pytest.fixture
def example_file(tmp_path):
    path = tmp_path / "load.json"
    write_expert_load(path, torch.tensor(EXAMPLE_WEIGHT))
    return path


def test_plan_from_recorded_file(example_file, capsys):
    assert main(["eplb", str(example_file), "--ranks", "8", "--redundant", "4", "--groups", "4",
                 "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 layers, 12 experts -> 16 slots on 8 ranks (hierarchical: 4 groups on 2 nodes)" in out
    # The published example's balancedness after; before = experts 0-11 split 2 per rank.
    before = linear_rank_loads(torch.tensor(EXAMPLE_WEIGHT), 8)
    before = (before.max(1).values / before.mean(1)).tolist()
    assert f"    0  {before[0]:>6.2f}    1.21" in out and f"    1  {before[1]:>6.2f}    1.24" in out
    # Layer 1 is the less balanced one before: shown per rank, with rank 0 holding experts 7 and 10.
    assert "layer 1: per-rank load" in out
    assert [line.split()[-2:] for line in out.splitlines() if line.startswith("   0  ")] == [["7", "10"]]


def test_plan_from_csv_recorded_by_the_recorder(tmp_path, capsys):
    rec = ExpertLoadRecorder(3, 8, window=4)
    for _ in range(5):
        for layer in range(3):
            rec.record(layer, torch.tensor([[0, 1], [0, 2], [0, 0]]))
        rec.step()
    path = tmp_path / "load.csv"
    rec.save(path)
    assert main(["eplb", str(path), "--ranks", "4", "--layer", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 layers, 8 experts -> 8 slots on 4 ranks (global: one node)" in out and "layer 2: per-rank" in out


def test_synthetic_skew_is_seeded_and_improves_balance(tmp_path, capsys):
    argv = ["eplb", "--synthetic-skew", "1.2", "--layers", "3", "--experts", "32", "--tokens", "20000",
            "--ranks", "8", "--redundant", "8"]
    assert main(argv + ["--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(argv + ["--seed", "3"]) == 0
    assert capsys.readouterr().out == first
    assert main(argv + ["--seed", "4"]) == 0
    assert capsys.readouterr().out != first
    plan = make_plan(synthetic_load(3, 32, 1.2, 20000, 3), num_redundant=8, num_groups=1, num_nodes=1, num_ranks=8)
    assert bool((plan.balancedness_after < plan.balancedness_before).all())
    assert synthetic_load(3, 32, 1.2, 20000, 3).sum(1).tolist() == [20000] * 3


def test_global_fallback_is_named(example_file, capsys):
    assert main(["eplb", str(example_file), "--ranks", "4", "--groups", "3", "--nodes", "2"]) == 0
    assert "(global: 3 groups do not divide over 2 nodes)" in capsys.readouterr().out


def test_png(example_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    assert main(["eplb", str(example_file), "--ranks", "8", "--redundant", "4", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib(example_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    err = _usage_error(capsys, ["eplb", str(example_file), "--ranks", "4", "--png", str(tmp_path / "p.png")])
    assert err.startswith("moekit eplb: --png: plots need matplotlib") and "moekit[bench]" in err


@pytest.mark.parametrize("argv,match", [
    ([], "give a load file or --synthetic-skew S, exactly one of them"),
    (["{file}", "--synthetic-skew", "1"], "exactly one of them"),
    (["{file}", "--experts", "8"], "--experts: only with --synthetic-skew"),
    (["{file}", "--redundant", "1"], r"--redundant 1: 12 experts \+ 1 redundant = 13 slots, not a multiple of "
                                     r"--ranks 4 \(every rank holds the same number\); e.g. --redundant 4"),
    (["{file}", "--groups", "5"], "--groups 5: does not divide the 12 experts"),
    (["{file}", "--nodes", "3"], "--nodes 3: does not divide --ranks 4"),
    (["{file}", "--redundant", "-4"], "--redundant: expected an int >= 0, got -4"),
    (["{file}", "--layer", "2"], r"--layer: expected a layer in \[0, 2\), got 2"),
    (["--synthetic-skew", "-1"], "--synthetic-skew: expected a finite number >= 0"),
    (["--synthetic-skew", "nan"], "--synthetic-skew: expected a finite number >= 0"),
    (["--synthetic-skew", "1", "--experts", "0"], "--experts: expected an int >= 1, got 0"),
    (["{dir}/missing.json"], "missing.json: No such file or directory"),
    (["{dir}/bad.json"], "bad.json: not valid JSON"),
    (["{dir}/load.txt"], "expected a .json or .csv file"),
    (["{file}", "--png", "{dir}/no/such/plan.png"], "--png .*: the folder .* does not exist"),
])
def test_bad_input_exits_2(example_file, tmp_path, capsys, argv, match):
    (tmp_path / "bad.json").write_text("{oops")
    argv = [a.format(file=example_file, dir=tmp_path) for a in argv]
    err = _usage_error(capsys, ["eplb", *argv, "--ranks", "4"])
    assert err.startswith("moekit eplb: ")
    assert re.search(match, err), err


def test_missing_ranks_is_a_usage_error(example_file, capsys):
    assert main(["eplb", str(example_file)]) == 2
    assert "--ranks" in capsys.readouterr().err


def test_linear_rank_loads_uneven_split():
    # 10 experts over 4 ranks: 3, 3, 2, 2 (vLLM's linear map).
    loads = linear_rank_loads(torch.arange(10).view(1, 10), 4)
    assert loads.tolist() == [[0 + 1 + 2, 3 + 4 + 5, 6 + 7, 8 + 9]]
    assert json.dumps(loads.tolist())
