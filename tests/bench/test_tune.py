"""moekit tune: the candidate grid, the choice of a winner, the table's JSON round trip, the CLI without CUDA."""

import json
import math
from dataclasses import replace

import pytest
import torch

from moekit.bench.shapes import PRESETS
from moekit.cli import main
from moekit.ops import heuristics
from moekit.ops.heuristics import MoEShape, choose_config, heuristic_config
from moekit.bench.tune import candidate_configs, tune_preset

PRESET = PRESETS["olmoe-1b-7b"]


def _shape(t):
    return MoEShape(num_tokens=t, top_k=PRESET.top_k, num_experts=PRESET.num_experts, hidden=PRESET.hidden_size,
                    inter=PRESET.intermediate_size)


@pytest.mark.parametrize("num_tokens", [1, 64, 4096])  # decode grid, mid, prefill grid
def test_candidates_start_with_the_heuristic_and_are_distinct(num_tokens):
    cands = candidate_configs(_shape(num_tokens))
    assert next(iter(cands)) == "heuristic" and cands["heuristic"] == heuristic_config(_shape(num_tokens))
    assert len(set(cands.values())) == len(cands) >= 4
    assert all(c.gemm1.split_k == 1 for c in cands.values())


def test_tune_writes_a_table_that_choose_config_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_TUNED_DIR", str(tmp_path))
    heuristics._tuned_tables.cache_clear()
    fast = {1: "bk64", 1024: "bm64"}  # wins at T=1 and T=1024; the heuristic stays best at 16 and 4096
    calls = []

    def measure(t, configs):
        calls.append((t, sorted(configs)))
        return {name: (50.0 if name == fast.get(t) else 100.0 + len(name) * 0.1 * (name != "heuristic"))
                for name in configs}

    points, path = tune_preset(PRESET, [1, 16, 1024, 4096], measure=measure, log=lambda s: None)
    assert [p.best_name for p in points] == ["bk64", "heuristic", "bm64", "heuristic"]
    assert path == tmp_path / heuristics.gpu_name() / "olmoe-1b-7b.json"
    table = json.loads(path.read_text())["64,2048,1024,8"]
    assert list(table) == ["1", "16", "1024"] and table["16"] is None  # 4096: trailing heuristic, not written
    assert sum(1 for t, _ in calls if t == 1) == 2  # a winner is timed twice
    assert choose_config(_shape(1)) == candidate_configs(_shape(1))["bk64"]
    assert choose_config(_shape(8)) == heuristic_config(_shape(8))  # (1, 16]: the null entry
    assert choose_config(_shape(700)) == candidate_configs(_shape(1024))["bm64"]  # (16, 1024]
    assert choose_config(_shape(4096)) == heuristic_config(_shape(4096))

    # A noisy win that the second timing does not confirm: T=1 goes back to the heuristic, the rest of the table
    # stays; alone in a new file it writes nothing.
    def flaky_measure():
        flaky = iter([0.5, 1.0])
        return lambda t, c: {n: 100.0 * (next(flaky) if n == "bk64" else 1) for n in c if n in ("heuristic", "bk64")}

    points, path2 = tune_preset(PRESET, [1], measure=flaky_measure(), log=lambda s: None)
    assert points[0].best_name == "heuristic" and path2 == path
    assert json.loads(path.read_text())["64,2048,1024,8"] == {"16": None, "1024": table["1024"]}
    path.unlink()
    points, path2 = tune_preset(PRESET, [1], measure=flaky_measure(), log=lambda s: None)
    assert points[0].best_name == "heuristic" and path2 is None and not path.exists()
    heuristics._tuned_tables.cache_clear()


KEY = "64,2048,1024,8"  # olmoe-1b-7b's table key


def _wins(winners: dict[int, str]):
    """A measure where ``winners[T]`` is the fastest candidate at T (the heuristic elsewhere)."""
    return lambda t, configs: {n: 50.0 if n == winners.get(t) else 100.0 + (n != "heuristic") for n in configs}


@pytest.mark.parametrize("case", ["heuristic-wins-below", "win-above", "inside-a-range", "other-key"])
def test_tune_merges_into_the_tables_file(tmp_path, monkeypatch, case):
    # A run replaces only the T values it tunes: tuning gpt-oss-120b at T=1 (the heuristic won) used to delete its
    # committed table, and tuning deepseek-v3 at T=4096 alone dropped its T=1 entry.
    monkeypatch.setenv("MOEKIT_TUNED_DIR", str(tmp_path))
    heuristics._tuned_tables.cache_clear()
    path = tmp_path / heuristics.gpu_name() / "olmoe-1b-7b.json"
    path.parent.mkdir(parents=True)
    a = candidate_configs(_shape(1))["bk64"].to_dict()
    b = candidate_configs(_shape(4096))["bm64"].to_dict()
    other = {"8,4096,14336,2": {"16": a}}  # another shape's table in the same file (hand-merged files exist)
    old, tokens, winners, want = {
        "heuristic-wins-below": ({"1024": None, "4096": b}, [1], {}, {"1024": None, "4096": b}),
        "win-above": ({"1": a}, [4096], {4096: "bm64"}, {"1": a, "4096": b}),
        # T=64 tuned inside the null range (16, 1024]: the heuristic keeps (16, 64], b keeps (64, 1024]
        "inside-a-range": ({"16": None, "1024": b, "4096": a}, [64], {}, {"64": None, "1024": b, "4096": a}),
        "other-key": ({"4": a}, [1, 4], {}, None),
    }[case]
    path.write_text(json.dumps({KEY: old, **other}))
    points, written = tune_preset(PRESET, tokens, measure=_wins(winners), log=lambda s: None)
    doc = json.loads(path.read_text())
    assert doc.get(KEY) == want and {k: v for k, v in doc.items() if k != KEY} == other
    assert written == (path if want else None)
    heuristics._tuned_tables.cache_clear()
    if case == "win-above":  # each old entry still covers exactly its old range
        assert choose_config(_shape(1)) == candidate_configs(_shape(1))["bk64"]
        assert choose_config(_shape(2048)) == candidate_configs(_shape(4096))["bm64"]
    heuristics._tuned_tables.cache_clear()


def test_tune_refuses_a_malformed_tables_file_before_the_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_TUNED_DIR", str(tmp_path))
    path = tmp_path / heuristics.gpu_name() / "olmoe-1b-7b.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    calls = []
    with pytest.raises(ValueError, match="olmoe-1b-7b.json: not valid JSON"):
        tune_preset(PRESET, [1], measure=lambda t, c: calls.append(t), log=lambda s: None)
    assert calls == [] and path.read_text() == "{not json"


@pytest.mark.parametrize("others", [100.0, math.inf])
def test_tune_raises_when_the_heuristic_fails(tmp_path, monkeypatch, others):
    # A heuristic that fails the accuracy check (or does not compile) times as inf: no gain can be measured
    # against it, and every call without a table runs it. It used to write a table ("inf 5.0 100.0%"), or, with
    # every candidate inf, print "nan%" and "no table".
    monkeypatch.setenv("MOEKIT_TUNED_DIR", str(tmp_path))

    def measure(t, configs):  # T=1 is fine; at T=16 the heuristic fails and the others time as ``others``
        return {n: 100.0 if t == 1 else math.inf if n == "heuristic" else others for n in configs}

    with pytest.raises(RuntimeError, match="T=16: the heuristic's config timed as inf"):
        tune_preset(PRESET, [1, 16], measure=measure, log=lambda s: None)
    assert not (tmp_path / heuristics.gpu_name()).exists()


def test_8bit_decode_moves_around_its_256_wide_k_steps():
    # Past one token 8-bit decode tiles take 256-wide K steps in 3 stages: the grid tries 128 and 4 stages (a
    # move to 3 stages would be the heuristic itself, dropped as a duplicate).
    fp8 = replace(_shape(16), elem_bytes=1, weights="fp8_block")
    moves = candidate_configs(fp8)
    assert moves["heuristic"].gemm1.block_k == 256 and moves["heuristic"].gemm1.num_stages == 3
    assert moves["bk128"].gemm1.block_k == moves["bk128"].gemm2.block_k == 128
    assert moves["stages4"].gemm1.num_stages == moves["stages4"].gemm2.num_stages == 4


def test_tune_8bit_writes_its_own_table_keyed_by_scheme(tmp_path, monkeypatch):
    # An fp8 table sits beside the bf16 one (its own file, its own key) and only 8-bit calls of that scheme read it.
    monkeypatch.setenv("MOEKIT_TUNED_DIR", str(tmp_path))
    heuristics._tuned_tables.cache_clear()
    fp8 = lambda t: replace(_shape(t), elem_bytes=1, weights="fp8_block")  # noqa: E731
    assert "bm128w8" in candidate_configs(fp8(4096)) and "stages3" in candidate_configs(fp8(4096))
    seen = []

    def measure(t, configs):
        seen.append(configs["heuristic"])
        return {name: 50.0 if name == "stages3" else 100.0 for name in configs}

    points, path = tune_preset(PRESET, [4096], measure=measure, log=lambda s: None, quant="fp8_block")
    assert seen[0] == heuristic_config(fp8(4096))  # the 8-bit heuristic is the baseline
    assert path == tmp_path / heuristics.gpu_name() / "olmoe-1b-7b.fp8_block.json"
    assert list(json.loads(path.read_text())) == ["64,2048,1024,8,fp8_block"]
    assert choose_config(fp8(4096)) == candidate_configs(fp8(4096))["stages3"]
    assert choose_config(_shape(4096)) == heuristic_config(_shape(4096))
    assert choose_config(replace(fp8(4096), weights="fp8_channel")) == heuristic_config(fp8(4096))
    with pytest.raises(ValueError, match="quant: expected None or one of"):
        tune_preset(PRESET, [1], measure=measure, quant="fp4")
    for tokens in ([], [0], [4, -1], [1.5]):
        with pytest.raises(ValueError, match="tokens: expected a non-empty list of positive ints"):
            tune_preset(PRESET, tokens, measure=measure)
    heuristics._tuned_tables.cache_clear()


def test_tune_weight_only_writes_its_own_table_keyed_by_scheme(tmp_path, monkeypatch):
    # A w4a16 layer's table: its own file and key, with the activations' element size (its K tiles are the
    # WNA16 heuristic's), read back by calls of that scheme only.
    monkeypatch.setenv("MOEKIT_TUNED_DIR", str(tmp_path))
    heuristics._tuned_tables.cache_clear()
    w4 = lambda t: replace(_shape(t), weights="w4a16_g128")  # noqa: E731
    seen = []

    def measure(t, configs):
        seen.append(configs["heuristic"])
        return {name: 50.0 if name == "bk64" else 100.0 for name in configs}

    points, path = tune_preset(PRESET, [1], measure=measure, log=lambda s: None, quant="w4a16_g128")
    assert seen[0] == heuristic_config(w4(1)) and seen[0].gemm1.block_k == 256  # 128 B of 4-bit codes a row
    assert path == tmp_path / heuristics.gpu_name() / "olmoe-1b-7b.w4a16_g128.json"
    assert list(json.loads(path.read_text())) == ["64,2048,1024,8,w4a16_g128"]
    assert choose_config(w4(1)) == candidate_configs(w4(1))["bk64"]
    assert choose_config(replace(w4(1), weights="w8a16_g128")) == heuristic_config(replace(w4(1), weights="w8a16_g128"))
    heuristics._tuned_tables.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cli_tune_without_cuda_exits_2(capsys):
    assert main(["tune", "--preset", "qwen3-30b-a3b", "--tokens", "1"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["tune", "--preset", "qwen3-30b-a3b", "--quant", "w4a16_g128"]) == 2  # a known scheme: only CUDA
    assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["tune", "--preset", "nope"]) == 2


def test_measure_skips_a_candidate_the_op_refuses(monkeypatch):
    # A K tile of 16 is below what 4-bit codes take (the weight-only GEMM's config check refuses it): that candidate
    # times as inf with one log line and the others are still timed; a ValueError from anything else propagates.
    # The kernels run in the interpreter here (tiny layer, fp16: the interpreter's bf16 dot is wrong).
    from moekit.bench import tune
    from moekit.bench.shapes import MoEShape as Preset
    from tests.kernel.test_triton_experts_wna16 import DECODE

    tiny = Preset(name="tiny", num_experts=4, hidden_size=128, intermediate_size=64, top_k=2)
    monkeypatch.setattr(tune, "time_us", lambda fn, device, graph: (fn(), 7.0)[1])
    lines = []
    measure, free = tune.gpu_measure(tiny, torch.device("cpu"), torch.float16, quant="mxfp4", log=lines.append)
    refused = replace(DECODE, gemm1=replace(DECODE.gemm1, block_k=16))
    times = measure(1, {"heuristic": DECODE, "bk16": refused})
    assert times == {"heuristic": 7.0 / tune.ROTATE, "bk16": float("inf")}  # one timing covers ROTATE calls
    assert len(lines) == 1 and lines[0].startswith("T=1: bk16 skipped: config.block_k")

    def broken(fn, device, graph):
        raise ValueError("a bug, not a refused config")

    monkeypatch.setattr(tune, "time_us", broken)
    with pytest.raises(ValueError, match="a bug"):
        measure(1, {"heuristic": DECODE})

    # A wrong output: a candidate is skipped with the error in its log line; the heuristic's is a bug, raised.
    monkeypatch.setattr(tune, "rel_errors", lambda got, ref: (0.5, 0.1))
    lines.clear()
    assert measure(1, {"wrong": DECODE}) == {"wrong": float("inf")}
    assert lines == [f"T=1: wrong skipped: max rel err 0.5 >= {tune.MAX_REL_ERR} against the torch backend"]
    with pytest.raises(RuntimeError, match="T=1: the heuristic's config fails the accuracy check .* 0.5"):
        measure(1, {"heuristic": DECODE})
    free()
