"""moekit's GPTQ reader against GPTQModel itself: tensors packed by GPTQModel 7.6's ``TorchLinear.pack`` and
written in its "v1" checkpoint format, and GPTQModel's own ``dequantize_weight`` of them (fp16), stored in
``data/gptqmodel_v1.safetensors`` by ``data/make_gptqmodel_fixture.py`` (which says how it was made), and AWQ words
packed and dequantized by its AWQ utilities. Bit for bit:
moekit's fp32 dequantization rounded to fp16 must equal GPTQModel's fp16 result."""

from pathlib import Path

import pytest
import torch

from moekit.ops.quantize_wna16 import awq_to_wna16, dequantize_gptq, dequantize_wna16, gptq_to_wna16

safetensors = pytest.importorskip("safetensors.torch")
FIXTURE = Path(__file__).parent / "data" / "gptqmodel_v1.safetensors"
GROUP = 64


def _case(name):
    t = safetensors.load_file(str(FIXTURE))
    return {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(name + ".")}


@pytest.mark.parametrize("name, bits, sym", [("w4_sym", 4, True), ("w4_asym", 4, False), ("w8_asym", 8, False)])
def test_gptq_reader_matches_gptqmodel_bit_for_bit(name, bits, sym):
    # The asymmetric cases plant zero points of 0 in every group: GPTQModel's v1 storage subtracts one from each
    # packed *word*, so a 0 borrows from its neighbour, and its reader adds the word back; a reader that adds one
    # to each field separately gets 2^bits there and one less in the neighbour.
    c = _case(name)
    w = gptq_to_wna16(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], bits=bits, group_size=GROUP, sym=sym)
    got = dequantize_wna16(w).half()
    assert torch.equal(got, c["dequantized"].t())
    want = dequantize_gptq(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], bits=bits, group_size=GROUP, sym=sym)
    assert torch.equal(want.half(), c["dequantized"].t())


def test_act_order_dequantized_matches_gptqmodel_bit_for_bit():
    # desc_act=True (a permuted g_idx): refused by the packed reader, dequantized exactly by dequantize_gptq.
    c = _case("w4_sym_act_order")
    with pytest.raises(ValueError, match="g_idx"):
        gptq_to_wna16(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], bits=4, group_size=GROUP, sym=True)
    got = dequantize_gptq(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], bits=4, group_size=GROUP, sym=True)
    assert torch.equal(got.half(), c["dequantized"].t())


def test_awq_reader_matches_gptqmodel_bit_for_bit():
    # AWQ GEMM words packed by GPTQModel's pack_awq (nibble order [0, 2, 4, 6, 1, 3, 5, 7]), zero points 0 and 15
    # included, against its dequantize_gemm.
    c = _case("awq_w4")
    got = dequantize_wna16(awq_to_wna16(c["qweight"], c["qzeros"], c["scales"], group_size=GROUP)).half()
    assert torch.equal(got, c["dequantized"].t())
