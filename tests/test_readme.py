"""The README's Python example runs as written."""

import re
from pathlib import Path

import torch

from moekit.testing import assert_close


def test_readme_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    y, x, moe = scope["y"], scope["x"], scope["moe"]
    assert y.shape == x.shape
    shared = moe.shared_experts(x.view(-1, 1024))
    assert_close(scope["routed"] + shared, y.view(-1, 1024).float(), torch.float32)


def test_readme_quantize_schemes_exist():
    import moekit
    from moekit.quant import QUANT_SCHEMES

    text = (Path(__file__).parents[1] / "README.md").read_text()
    for scheme in ("fp8_block", "fp8_channel", "fp8_tensor", "int8_channel"):
        assert f"`{scheme}`" in text or f'"{scheme}"' in text
        assert scheme in QUANT_SCHEMES
    assert callable(moekit.quantize)
