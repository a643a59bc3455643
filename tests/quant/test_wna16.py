"""4/8-bit weight-only experts (w4a16 / w8a16 with group scales): QuantParams, the quant method and its
checkpoint loaders (compressed-tensors pack-quantized, GPTQ v1, AWQ), the torch backend, the Triton refusal."""

import pytest
import torch

from moekit import QuantParams


def _scales(e=2, n=4, g=2, dtype=torch.bfloat16):
    return torch.ones(e, n, g, dtype=dtype)


@pytest.mark.parametrize(("weight_dtype", "group_size", "zp", "scheme"), [
    ("int4", 128, False, "w4a16_g128"),
    ("int4", 128, True, "w4a16_g128_asym"),
    ("int8", 128, False, "w8a16_g128"),
    ("int4", 32, False, "w4a16_g32"),
    ("int4", -1, False, "w4a16_channel"),   # one group per row
])
def test_quant_params_scheme_and_describe(weight_dtype, group_size, zp, scheme):
    s = _scales()
    z = torch.zeros_like(s, dtype=torch.uint8) if zp else None
    q = QuantParams(weight_dtype=weight_dtype, granularity="group", group_size=group_size, w13_scale=s, w2_scale=s,
                    w13_zp=z, w2_zp=z)
    assert q.scheme == scheme and q.is_quantized and q.act_granularity is None
    assert q.bits == (4 if weight_dtype == "int4" else 8)
    assert q.describe() == (f"{weight_dtype} group {group_size} {'asym' if zp else 'sym'} "
                            "(activations unquantized)")


def test_quant_params_8bit_cases_unchanged():
    s = torch.ones(2, 4, 1)
    q = QuantParams(weight_dtype="int8", act_dtype="int8", granularity="channel", w13_scale=s, w2_scale=s)
    assert q.scheme == "int8_channel" and q.bits is None and q.group_size is None


@pytest.mark.parametrize(("change", "field"), [
    ({"act_dtype": "int8"}, "quant.act_dtype"),              # weight-only
    ({"group_size": 0}, "quant.group_size"),
    ({"group_size": True}, "quant.group_size"),
    ({"group_size": None}, "quant.group_size"),
    ({"weight_dtype": "fp8_e4m3"}, "quant.weight_dtype"),
    ({"w13_zp": torch.zeros(2, 4, 2, dtype=torch.uint8)}, "quant.w13_zp/w2_zp"),     # only one of the pair
    ({"w13_zp": torch.zeros(2, 4, 2), "w2_zp": torch.zeros(2, 4, 2)}, "quant.w13_zp"),  # float zero points
    ({"w13_zp": torch.zeros(2, 4, 3, dtype=torch.uint8), "w2_zp": torch.zeros(2, 4, 3, dtype=torch.uint8)},
     "quant.w13_zp"),                                          # not the scales' shape
    ({"w13_scale": torch.ones(4, 2)}, "quant.w13_scale"),    # not [E, N, G]
    ({"w2_scale": torch.ones(2, 4, 2, dtype=torch.int32)}, "quant.w2_scale"),
    ({"granularity": "channel", "group_size": None}, "quant.granularity"),  # int4 needs groups
])
def test_quant_params_refusals_name_the_field(change, field):
    kw = dict(weight_dtype="int4", granularity="group", group_size=128, w13_scale=_scales(), w2_scale=_scales())
    kw.update(change)
    with pytest.raises(ValueError, match=field):
        QuantParams(**kw)


def test_group_size_only_with_groups():
    s = torch.ones(2, 4, 1)
    with pytest.raises(ValueError, match="quant.group_size"):
        QuantParams(weight_dtype="int8", granularity="channel", group_size=128, w13_scale=s, w2_scale=s)

