"""The examples run as documented and report full agreement."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_hf_generate_agrees(family):
    pytest.importorskip("transformers")
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_generate.py"), "--family", family,
                          "--tokens", "12"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    agree = [line for line in run.stdout.splitlines() if "agrees on" in line]
    assert len(agree) == 3, run.stdout
    assert all("12/12 tokens" in line for line in agree), run.stdout
