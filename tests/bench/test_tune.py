"""moekit tune: the candidate grid, the choice of a winner, the table's JSON round trip, the CLI without CUDA."""

import json
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

    # A noisy win that the second timing does not confirm leaves no table (and removes a stale one).
    flaky = iter([0.5, 1.0])
    points, path2 = tune_preset(PRESET, [1], measure=lambda t, c: {n: 100.0 * (next(flaky) if n == "bk64" else 1)
                                                                   for n in c if n in ("heuristic", "bk64")},
                                log=lambda s: None)
    assert points[0].best_name == "heuristic" and path2 is None and not path.exists()
    heuristics._tuned_tables.cache_clear()


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
    free()
