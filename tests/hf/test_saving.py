"""A converted model saves and loads under its transformers names (moekit/hf/saving.py).

``convert`` then ``save_pretrained`` must write the checkpoint the unconverted model writes: same keys, same
tensors, so that stock transformers (no moekit) loads it back to the same logits. A converted model's own
``state_dict`` must load back into it, and so must the unconverted model's.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import moekit.hf as mh  # noqa: E402
from moekit.testing import assert_close  # noqa: E402
from tests.hf.tiny_models import build, input_ids  # noqa: E402
from tests.test_hf import CONVERT_FAMILIES, CONVERT_ONLY_FAMILIES, CORE_FAMILIES  # noqa: E402

MOEKIT_NAMES = ("routed_experts.", "shared_experts.gate_up_proj", ".w13", ".w2_bias")


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _saved(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


# One family per layout the save path rewrites: fused experts (qwen3_moe), Mixtral's per-expert checkpoint names
# (transformers renames them on load and back on save), the shared MLP's split gate/up and correction bias
# (deepseek_v3), interleaved transposed experts with biases (gpt_oss), transposed experts (aria, llama4), DBRX's
# split w1/v1, a sigmoid-gated shared expert (qwen2_moe), a [1, E] correction bias (ernie4_5_moe), JetMoE.
SAVE_FAMILIES = [
    "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "aria", "llama4", "dbrx", "qwen2_moe", "ernie4_5_moe", "jetmoe",
]  # fmt: skip


@pytest.mark.parametrize("family", CORE_FAMILIES + CONVERT_FAMILIES + CONVERT_ONLY_FAMILIES)
def test_converted_state_dict_is_the_original(family):
    # save_pretrained starts from model.state_dict(): the same keys and tensors as before convert means the same
    # checkpoint, whatever transformers does with it afterwards.
    model = build(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    assert mh.convert(model) > 0
    state = model.state_dict()
    assert not [k for k in state if any(n in k for n in MOEKIT_NAMES)]
    assert sorted(state) == sorted(original)
    for key, value in original.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("family", SAVE_FAMILIES)
def test_save_pretrained_after_convert_loads_in_stock_transformers(family, tmp_path):
    model = build(family)
    ids = input_ids()
    reference = _logits(model, ids)
    model.save_pretrained(tmp_path / "original")
    assert mh.convert(model) > 0
    model.save_pretrained(tmp_path / "converted")

    original, converted = _saved(tmp_path / "original"), _saved(tmp_path / "converted")
    assert sorted(converted) == sorted(original)
    for key, value in original.items():
        assert torch.equal(converted[key], value), key

    loaded, info = type(model).from_pretrained(tmp_path / "converted", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert_close(_logits(loaded.eval(), ids), reference, torch.float32, name=f"{family} reloaded")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "dbrx", "llama4", "aria"])
def test_converted_state_dict_round_trips(family):
    model = build(family)
    ids = input_ids()
    reference = _logits(model, ids)
    original_state = model.state_dict()
    mh.convert(model)
    state = model.state_dict()
    assert sorted(state) == sorted(original_state)
    other = build(family, seed=1)
    mh.convert(other)
    assert other.load_state_dict(state) is not None  # strict: every key consumed, none missing
    assert_close(_logits(other, ids), reference, torch.float32, name=f"{family} own state_dict")
    third = build(family, seed=2)
    mh.convert(third)
    third.load_state_dict(original_state)  # the unconverted model's state_dict loads too
    assert_close(_logits(third, ids), reference, torch.float32, name=f"{family} original state_dict")
    assert_close(_logits(copy.deepcopy(third), ids), reference, torch.float32, name=f"{family} deepcopy")
    assert sorted(copy.deepcopy(third).state_dict()) == sorted(original_state)


def test_a_block_tensor_with_no_saved_name_refuses_conversion():
    # A tensor of the block that the converted MoE would not save under the block's names would be missing from
    # the checkpoint (and re-initialised at random on load): convert refuses such a block up front.
    model = build("qwen3_moe")
    block = model.model.layers[0].mlp
    block.register_buffer("extra_scale", torch.ones(3))
    with pytest.raises(NotImplementedError, match="extra_scale"):
        mh.moe_from_hf(block)
