"""The examples run as documented and report full agreement."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

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
