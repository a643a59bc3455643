"""The examples run as documented and report full agreement."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.testing import TOLERANCES

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "hf_generate.py"


@pytest.fixture(scope="module")
def hf_generate():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("hf_generate", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_agreement(stdout: str, tokens: int, rows: int) -> None:
    agree = [line for line in stdout.splitlines() if "agrees on" in line]
    assert len(agree) == rows, stdout
    assert all(f"{tokens}/{tokens} tokens" in line for line in agree), stdout


def test_hf_generate_runs_from_the_command_line():
    pytest.importorskip("transformers")
    run = subprocess.run([sys.executable, str(EXAMPLE), "--family", "gpt_oss", "--tokens", "6"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    _check_agreement(run.stdout, 6, 3)


def test_hf_generate_offers_the_families_it_is_checked_with(hf_generate):
    assert set(hf_generate.FAMILIES) == set(FAMILIES)


# Every family the example offers. deepseek_v3 (RoPE sizes), dbrx (nested configs), qwen3_next (only linear
# attention layers), llama4 (a full-size nested text_config) failed to build or generate; phimoe's blocks do not
# convert, which used to end the run.
FAMILIES = ["qwen3_moe", "mixtral", "qwen2_moe", "qwen3_next", "olmoe", "deepseek_v3", "gpt_oss", "dbrx", "llama4",
            "phimoe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_generate_every_offered_family_agrees(hf_generate, family, capsys):
    assert hf_generate.main(["--family", family, "--tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    converted = family != "phimoe"
    _check_agreement(out, 4, 3 if converted else 2)
    assert ("convert skipped" in out) != converted
    assert "(0 blocks)" not in out


def test_hf_generate_refuses_a_dense_family(hf_generate, capsys):
    # A dense model used to run and report "moekit.hf.convert (0 blocks)" as if moekit had been exercised.
    assert hf_generate.main(["--family", "llama", "--tokens", "4", "--device", "cpu"]) == 2
    assert "has no MoE block" in capsys.readouterr().err


EP_BENCH = ROOT / "examples" / "ep_torchrun.py"
# A tiny deepseek-v3: E = 10 over 2 ranks (5 each), K = 8, so most tokens reach both ranks.
EP_TINY = ["--preset", "deepseek-v3", "--experts", "10", "--hidden", "64", "--intermediate", "32"]


@pytest.fixture(scope="module")
def ep_torchrun():
    spec = importlib.util.spec_from_file_location("ep_torchrun", EP_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dispatch", ["all_to_all", "allgather_reducescatter"])
def test_ep_torchrun_runs_at_world_2_on_gloo(dispatch, tmp_path):
    out = tmp_path / "ep.json"
    # --standalone: torchrun picks a free port, so concurrent test runs on one machine do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EP_BENCH),
           *EP_TINY, "--tokens", "1,7", "--dtype", "fp32", "--iters", "2", "--warmup", "1", "--dispatch", dispatch,
           "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "T/rank" in run.stdout and "comm GB/s" in run.stdout, run.stdout
    report = json.loads(out.read_text())
    assert report["meta"]["world"] == 2 and report["meta"]["dispatch"] == dispatch
    hidden_bytes, top_k = 64 * 4, 8
    for row, tokens in zip(report["rows"], [1, 7], strict=True):
        assert row["tokens"] == tokens and row["timing"] == "wall"
        assert row["max_rel_err"] <= TOLERANCES[torch.float32].max  # rank 0's EP output = the single-device layer
        assert row["single_us"] > 0 and row["layer_us"] > 0 and row["comm_us"] > 0
        assert row["compute_us"] == pytest.approx(row["layer_us"] - row["comm_us"])
        for sent in row["bytes_sent_per_rank"]:
            if dispatch == "allgather_reducescatter":
                # T rows of x, K fp32 weights and K int32 ids to the other rank, T result rows back, 8-byte count.
                assert sent == tokens * (2 * hidden_bytes + 8 * top_k) + 8
            else:
                # At most each token once to the other rank (x, K weights, K ids) and its partial result back, + the
                # counts (what allgather_reducescatter sends when every token reaches both ranks).
                assert 8 < sent <= 8 + tokens * (2 * hidden_bytes + 8 * top_k)


@pytest.mark.parametrize(("argv", "world", "message"), [
    ([], None, "WORLD_SIZE is not set"),  # not started by torchrun
    ([], 1, "expected >= 2 ranks"),
    (["--tokens", "1,0"], 2, "--tokens"),
    (["--tokens", "1,x"], 2, "--tokens"),
    (["--tp", "3"], 2, "--tp: expected a divisor of the world size 2"),
    (["--tp", "2", "--intermediate", "33"], 4, "--tp: expected a divisor of the intermediate size 33"),
    (["--experts", "3", "--top-k", "2"], 4, "--experts: expected >= ep_size 4"),
    (["--experts", "4", "--top-k", "5"], 2, "--top-k: expected <= the expert count 4"),
    (["--dispatch", "ring"], 2, "--dispatch"),
    (["--iters", "0"], 2, "--iters"),
    (["--graph-max-tokens", "-1"], 2, "--graph-max-tokens: expected >= 0"),
])
def test_ep_torchrun_refuses_bad_arguments_in_one_line(ep_torchrun, argv, world, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        ep_torchrun.parse_args(argv, world)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
