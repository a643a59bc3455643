"""int8 per-channel experts (W8A8, activations per token) through moekit.quantize and the torch backend."""

import pytest
import torch

from tests.quant.cases import check_end_to_end, check_storage


def test_storage():
    check_storage("int8_channel", torch.int8)


@pytest.mark.parametrize(("num_tokens", "top_k", "hidden", "inter", "dtype"), [
    (1, 2, 256, 192, torch.bfloat16),   # decode: one token
    (7, 1, 130, 67, torch.float32),     # odd T, top_k = 1, odd H and I; fp32: the tight reference tolerance
    (9, 8, 256, 128, torch.float16),    # top_k = E
])
def test_matches_references(num_tokens, top_k, hidden, inter, dtype):
    check_end_to_end("int8_channel", num_tokens=num_tokens, top_k=top_k, hidden=hidden, inter=inter, dtype=dtype)


def test_empty_expert_and_bias_and_relu2():
    # expert 3 receives no tokens; biases stay in the layer dtype; non-gated w13 [E, I, H].
    check_end_to_end("int8_channel", empty_experts=(3,), bias=True)
    check_end_to_end("int8_channel", activation="relu2")
