"""Writes gptqmodel_v1.safetensors: GPTQ tensors packed by GPTQModel itself and its own dequantization, the oracle
``tests/quant/test_gptqmodel_oracle.py`` checks moekit's GPTQ reader against (bit for bit, without GPTQModel
installed). Not a test; run it by hand where GPTQModel 7.6 imports (its CPU path: ``BUILD_CUDA_EXT=0 pip install
--no-deps gptqmodel==7.6.0`` plus the few modules its ``TorchLinear`` imports):

    GPTQMODEL_CPU_WORKERS=2 python tests/quant/data/make_gptqmodel_fixture.py

Each case: a [N = 64, K = 256] linear whose weights are exactly s · (q − z) for random codes q, zero points z and
fp16 scales s (so GPTQModel's packer, which rounds (W + s·z) / s, stores q itself), packed by ``TorchLinear.pack``
(its in-memory "v2" zeros), dequantized by ``TorchLinear.dequantize_weight`` (the oracle, fp16 [K, N]), then
written as a checkpoint writes it: ``convert_gptq_v2_to_v1_format_module`` (the "v1" zeros of
``checkpoint_format: gptq``, one subtracted from each packed word, borrows included). Cases: symmetric (z = 8);
asymmetric with zero points 0 and 15 planted in every group (a 0 borrows from its neighbour in v1); 8-bit
asymmetric; act order (a permuted ``g_idx``); and an AWQ (GEMM) case packed by GPTQModel's ``pack_awq`` and
dequantized by its ``dequantize_gemm``.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptqmodel.nn_modules.qlinear.torch import TorchLinear
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm, pack_awq
from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

N, K, G = 64, 256, 64


def case(name: str, bits: int, sym: bool, desc_act: bool, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    groups = K // G
    q = torch.randint(0, maxq + 1, (N, K), generator=gen)
    if sym:
        z = torch.full((N, groups), 1 << (bits - 1))
    else:
        z = torch.randint(0, maxq + 1, (N, groups), generator=gen)
        z[::3] = 0  # zero points of 0 (v1 borrows) and of the maximum in every group column
        z[1::3] = maxq
    s = (torch.rand(N, groups, generator=gen) * 0.02 + 0.001).half()
    g_idx = torch.arange(K) // G
    if desc_act:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    w = (s.float()[:, g_idx] * (q - z[:, g_idx]).float())
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight.data = w
    mod = TorchLinear(bits=bits, group_size=G, sym=sym, desc_act=desc_act, in_features=K, out_features=N,
                      pack_dtype=torch.int32)
    mod.pack(linear, s.float(), z.int(), g_idx.int())
    mod.post_init()
    mod.eval()
    ref = mod.dequantize_weight().to(torch.float16)  # [K, N]
    assert torch.equal(ref.float(), (w.t().half()).float()), name  # the packer stored q exactly
    convert_gptq_v2_to_v1_format_module(mod, types.SimpleNamespace(bits=bits, pack_dtype=torch.int32))
    return {f"{name}.qweight": mod.qweight.clone(), f"{name}.qzeros": mod.qzeros.clone(),
            f"{name}.scales": mod.scales.clone(), f"{name}.g_idx": mod.g_idx.int().clone(),
            f"{name}.dequantized": ref.clone()}


def awq_case(name: str, seed: int) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors packed by GPTQModel's ``pack_awq`` (the [0, 2, 4, 6, 1, 3, 5, 7] nibble order) and its
    ``dequantize_gemm`` of them (fp16 [K, N]); zero points of 0 and 15 in every group."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=gen)
    z = torch.randint(0, 16, (K // G, N), generator=gen)
    z[:, ::3], z[:, 1::3] = 0, 15
    s = (torch.rand(K // G, N, generator=gen) * 0.02 + 0.001).half()
    qweight, qzeros = pack_awq(q, z, 4)
    ref = dequantize_gemm(qweight, qzeros, s, 4, G).to(torch.float16)
    return {f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": s, f"{name}.dequantized": ref}


def main() -> None:
    tensors = {}
    tensors.update(case("w4_sym", 4, True, False, 0))
    tensors.update(case("w4_asym", 4, False, False, 1))
    tensors.update(case("w8_asym", 8, False, False, 2))
    tensors.update(case("w4_sym_act_order", 4, True, True, 3))
    tensors.update(awq_case("awq_w4", 4))
    out = Path(__file__).with_name("gptqmodel_v1.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
