"""Launch configurations of the Triton MoE pipeline, from explicit heuristics (no autotuning on the hot path).

``choose_config`` returns a frozen ``MoEKernelConfig``; a caller (or a test) may pass its own instead. A tuned
table ``moekit/ops/tuned/<gpu>/<preset>.json`` — ``{"E,H,I,K": {"<max tokens>": {config fields}}}`` — overrides
the heuristics for the shapes it lists; tables are optional, few and small.

The reasoning, in terms of R = rows per active expert (about N / min(N, E), N = T·K):
- Decode (R ≤ 16): the layer streams every routed expert's weights once, so it is memory-bound and what matters
  is enough bytes in flight: ≥ ~2 programs per SM, each with a deep (4-stage) pipeline of wide K tiles (8-bit
  codes past one token: 256-wide steps in 3 stages, so each step reads 256-byte runs of a weight row as bf16 does).
  GEMM1's programs are (expert blocks) × I / BLOCK_N — for few experts or small I, shrink BLOCK_N; GEMM2's are
  (expert blocks) × H / BLOCK_N — split K (partials summed by the top-k reduction) when that is too few.
- Prefill (R ≥ 64): tensor-core bound; the largest tile whose padding waste stays small — BLOCK_M up to 128 —
  with GROUP_M swizzling so an expert's weight tiles are reused from L2 across its row blocks.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

_TUNED_DIR = Path(__file__).parent / "tuned"
# The ways grouped_gemm_wna16 multiplies weight codes (its kernel's docstring): scale each dot's product,
# dequantize the weight tile before one dot (4-bit codes read as int32 words where aligned, or always as bytes),
# or FMAs without tensor cores for decode.
WNA16_VARIANTS = ("postscale", "dequant", "dequant_bytes", "dequant_split", "dequant_pairs", "gluon_pairs", "gemv")


def tuned_dir() -> Path:
    """Where tuned tables live: ``$MOEKIT_TUNED_DIR`` if set, else ``moekit/ops/tuned``."""
    return Path(os.environ.get("MOEKIT_TUNED_DIR") or _TUNED_DIR)


@dataclass(frozen=True, kw_only=True)
class GemmConfig:
    """Tile of one grouped GEMM (BLOCK_M is shared by both GEMMs: see ``MoEKernelConfig``)."""

    block_n: int
    block_k: int
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    # A block whose second half is padding runs a half-height tile (see grouped_gemm_kernel); needs block_m >= 32.
    half_tail: bool = False
    # How ``grouped_gemm_wna16`` multiplies its weight codes (one of WNA16_VARIANTS; the other GEMMs ignore it).
    # None: ``wna16_variant``'s choice for the layout.
    variant: str | None = None
    # ``grouped_gemm_wna16``'s dequant variants: multiply as acc^T = w @ a^T (the dequantized weights as the MMA's
    # register operand; see its kernel). The other GEMMs ignore it.
    swap_ab: bool = False

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name}: expected a power of two >= 16, got {v}")
        if self.split_k < 1 or self.group_m < 1:
            raise ValueError(f"GemmConfig: split_k and group_m must be >= 1, got {self.split_k}, {self.group_m}")
        if self.variant is not None and self.variant not in WNA16_VARIANTS:
            raise ValueError(f"GemmConfig.variant: expected one of {WNA16_VARIANTS} or None, got {self.variant!r}")


@dataclass(frozen=True, kw_only=True)
class FusedDecodeConfig:
    """Tile of ``fused_decode`` (both GEMMs of a routed row in one program per slice of I).

    block_i: I columns a program owns (GEMM 1 outputs, GEMM 2's K); the grid is (routed rows) x I / block_i.
    block_k: GEMM 1's K tile over H.  block_h: GEMM 2's output columns a step.
    """

    block_i: int
    block_k: int = 128
    block_h: int = 128
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self) -> None:
        for name in ("block_i", "block_k", "block_h"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"FusedDecodeConfig.{name}: expected a power of two >= 16, got {v}")


@dataclass(frozen=True, kw_only=True)
class MoEKernelConfig:
    """Everything the Triton backend decides per call.

    Attributes:
        block_m: rows per block of the padded layout (align and both GEMMs).
        gemm1: x @ w13[e].T with the activation in its epilogue (``split_k`` must be 1: the activation needs
            the whole sum).
        gemm2: a @ w2[e].T with the routing weight in its epilogue.
        y_fp32: keep GEMM2's per-row outputs in fp32 (else the activation dtype) until the top-k reduction.
        fused: run both GEMMs in one launch per (routed row, I slice) instead (``moekit.ops.fused_decode``;
            float weights at decode sizes); ``block_m``, ``gemm1`` and ``gemm2`` are then unused.
    """

    block_m: int
    gemm1: GemmConfig
    gemm2: GemmConfig
    y_fp32: bool = True
    fused: FusedDecodeConfig | None = None

    def __post_init__(self) -> None:
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"MoEKernelConfig.block_m: expected a power of two >= 16, got {self.block_m}")
        if self.gemm1.split_k != 1:
            raise ValueError(f"MoEKernelConfig.gemm1.split_k: the fused activation needs 1, got {self.gemm1.split_k}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> MoEKernelConfig:
        return MoEKernelConfig(
            block_m=d["block_m"], gemm1=GemmConfig(**d["gemm1"]), gemm2=GemmConfig(**d["gemm2"]),
            y_fp32=d.get("y_fp32", True),
            fused=FusedDecodeConfig(**d["fused"]) if d.get("fused") else None,
        )


@dataclass(frozen=True, kw_only=True)
class MoEShape:
    """What the heuristics look at: sizes of one call and of the device."""

    num_tokens: int
    top_k: int
    num_experts: int
    hidden: int
    inter: int  # I (w2 is [E, H, I])
    gated: bool = True
    num_sms: int = 132
    elem_bytes: int = 2
    # Which tuned tables apply (``tuned/<gpu>/``); None: the current CUDA device's.
    gpu: str | None = None
    # The weights' format: a float dtype name, or the 8-bit scheme (``moekit.quantize``'s names, e.g. "fp8_block";
    # elem_bytes is then 1), or a weight-only integer scheme ("w4a16_g128": ``wna16_bits``; elem_bytes is the
    # activations'). Tuned entries are keyed by it: an 8-bit layer has other best tiles than a bf16 one.
    weights: str = "bfloat16"
    # Whether this call runs the Gluon decode kernel (``moekit.ops.gluon_wna16.gluon_decode``): the device runs
    # Gluon (sm_90, Triton >= 3.6) and the activations are bf16 (what its mxfp4 pieces take and where its tiles
    # were measured). The tiles sized for it depend on it (mxfp4 decode, wider 4-bit decode tiles):
    # elsewhere they would fall back to Triton kernels on tiles never measured there.
    gluon: bool = False

    @property
    def table_key(self) -> str:
        """The key of this shape's entries in a tuned table: "E,H,I,K" for 2-byte float weights (bf16 and fp16
        share tiles), "E,H,I,K,<weights>" for every other format."""
        key = f"{self.num_experts},{self.hidden},{self.inter},{self.top_k}"
        return key if self.weights in ("bfloat16", "float16") else f"{key},{self.weights}"


def wgrad_config(n_dim: int, k_dim: int) -> GemmConfig:
    """Tile of ``grouped_wgrad`` (the backward's weight gradients): an [n, k] output tile per program, the rows of
    one expert as the reduction. There is one program per (expert, tile) whatever the row count, so the tile is
    as large as the weight allows (fewer re-reads of the gathered rows) without leaving SMs idle on small weights.
    """
    block_n = 128 if n_dim >= 128 else 64
    block_k = 128 if k_dim >= 128 else 64
    return GemmConfig(block_n=block_n, block_k=block_k, num_warps=8 if block_n * block_k >= 128 * 128 else 4,
                      num_stages=3)


def choose_config(shape: MoEShape) -> MoEKernelConfig:
    """A tuned table entry if one covers ``shape``, else the heuristics of the module docstring."""
    tuned = _lookup_tuned(shape)
    return tuned if tuned is not None else heuristic_config(shape)


def fused_decode_config(s: MoEShape) -> FusedDecodeConfig | None:
    """The fused decode's tile when it should run (``moekit.ops.fused_decode``), else None.

    Float weights, small experts (I <= 1024) and at most 32 routed rows, and no more than half the expert count
    (each routed row streams its expert alone: rows that share experts would read them again). Each program reads a [H, BLOCK_I]
    column slice of w2, runs of 2·BLOCK_I bytes, so it pays only where the three launches' ramps and tails
    are a large share of a short call. H200, bf16 layer µs, unfused -> fused with BLOCK_I = 64
    (``benchmarks/probes/fused_decode_layer.py``, docs/perf/NOTES.md): qwen3-30b-a3b T = 1 29.8 -> 28.5, T = 4
    83.8 -> 81.0; olmoe-1b-7b T = 1 35.4 -> 33.3, T = 4 102.2 -> 94.9. It lost on the large experts (gpt-oss-120b
    T = 1 59.6 -> 74.5, deepseek-v3 173.7 -> 175.5, mixtral-8x7b 173.7 -> 213.8) and with narrower slices
    (BLOCK_I = 16: qwen3 T = 1 31.3, deepseek-v3 266).
    """
    rows = s.num_tokens * s.top_k
    # Each routed row reads its expert alone: rows sharing experts (few experts, or a few rows too many) would
    # stream them several times.
    if s.weights not in ("bfloat16", "float16", "float32") or rows > min(32, s.num_experts // 2) or s.inter > 1024:
        return None
    return FusedDecodeConfig(block_i=64, block_k=128 if s.elem_bytes <= 2 else 64)


def heuristic_config(s: MoEShape) -> MoEKernelConfig:
    cfg = _gemm_config(s)
    fused = fused_decode_config(s)
    return cfg if fused is None else replace(cfg, fused=fused)


def _gemm_config(s: MoEShape) -> MoEKernelConfig:
    num_rows = s.num_tokens * s.top_k
    active = max(1, min(num_rows, s.num_experts))
    rows_per_expert = num_rows / active
    # BLOCK_M: the smallest tile that holds an active expert's rows, so padding stays under ~half a tile; 16 is
    # the smallest tl.dot M. From ~100 rows an expert on, 128-row tiles win despite the padding (H100, T=4096:
    # 8% faster than 64 at 128 rows an expert for deepseek-v3, 4% for gpt-oss).
    # Random routing spreads the counts by about sqrt(R): at R = 16 half the experts overflow a 16-row tile and
    # stream their weights twice, so 16-row tiles are kept only while R + 2·sqrt(R) fits (R <= 9; H100: 32-row
    # tiles 5% faster for mixtral at T=64, 2.4% for qwen3 at T=256, both R = 16).
    if rows_per_expert + 2 * rows_per_expert**0.5 <= 16:
        block_m = 16
    elif rows_per_expert <= 48:
        block_m = 32
    elif rows_per_expert <= 96:
        block_m = 64
    else:
        block_m = 128
    blocks = active * -(-int(rows_per_expert) // block_m)
    target = 2 * s.num_sms  # programs that keep every SM streaming with a second program to hide tails
    bits = wna16_bits(s.weights)
    if bits is not None:
        return _wna16_config(s, bits, block_m, blocks, target)

    if s.elem_bytes == 1 and rows_per_expert >= 24:
        # 8-bit codes, from ~24 rows an expert on: 64 x 128 tiles of 128-wide K (the bytes of a bf16 64-wide K
        # stage), 4 warps, 4 stages (96 KB: two programs an SM), wide GROUP_M swizzle. Each K tile's product gets
        # its scales before it is added (block scales; fp32 adds for channel/tensor, see the kernel), which needs
        # a second accumulator-sized register block: the bf16 128 x 256 tile spills. H200 (docs/perf/NOTES.md
        # §8-bit tiles): deepseek-v3 fp8_block T=4096 7.2-7.5 ms against 17.9 ms on the bf16 tiles and 8.0 ms on
        # 128 x 128 x 8 warps; T=1024 (32 rows an expert) 3.2 ms against 4.4 ms on the decode tiles.
        g = GemmConfig(block_n=128, block_k=128, group_m=32, num_warps=4, num_stages=4)
        return MoEKernelConfig(block_m=64, gemm1=g, gemm2=g, y_fp32=False)

    if block_m <= 32:
        # Memory-bound: 128-wide K tiles (256 B per bf16 row) and 4 stages keep ~64 KB in flight per program
        # (8-bit codes: below).
        if s.elem_bytes == 1 and block_m == 16 and s.num_tokens > 1:
            # 8-bit codes: 256-wide K steps read the same 256-byte run of each weight row (block scales: two
            # 128-wide sub-tiles, each scaled on its own), 3 stages. H200 (NOTES.md "8-bit decode tiles again"):
            # 3-4% on deepseek-v3 and mixtral at T = 4-64, 0-1.5% on qwen3; at T = 1 (one row a block) it lost
            # 3-8%, and 32-row tiles moved nothing.
            return _decode_config(s, block_m, blocks, target, 256, stages=3)
        return _decode_config(s, block_m, blocks, target, 128 if s.elem_bytes <= 2 else 64)


    # Compute-bound: 64 x 128 tiles per 4 warps, or 128 x 256 per 8 (128 accumulator registers a thread; the
    # wide tile halves the A re-reads: 1.32x on mixtral at T=4096 on an H100 against 128 x 128), 64-wide K and as
    # many stages as shared memory holds (48 KB a stage at 128 x 256).
    # With 128-row blocks an expert's last block is on average half padding (~24% of the rows at 2 blocks an
    # expert): a block whose second half is padding runs a 64-row tile (H100, four runs: -1…-4% on most
    # 128-row prefill cells, NOTES §5; 32-row tails of 64-row blocks gained nothing, so only here).
    if block_m == 128:
        gemm1 = GemmConfig(block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3, half_tail=True)
    else:
        gemm1 = GemmConfig(block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4)
    gemm2 = gemm1
    # y [N, H] is written once and read once by the reduction; in fp32 those bytes are a visible share of a
    # prefill of small experts, in the activation dtype they cost half and lose nothing beyond its rounding.
    return MoEKernelConfig(block_m=block_m, gemm1=gemm1, gemm2=gemm2, y_fp32=False)


def _decode_config(s: MoEShape, block_m: int, blocks: int, target: int, bk: int, stages: int = 4) -> MoEKernelConfig:
    """Memory-bound tiles (rows of ``block_m`` <= 32) of K width ``bk`` in ``stages`` stages: ``blocks`` row
    blocks, ``target`` programs wanted per GEMM."""
    # GEMM1's BLOCK_N counts weight rows: for a gated activation half gate, half up, so a tile yields
    # BLOCK_N / 2 outputs. Shrink it until the grid fills the chip.
    per_out = 2 if s.gated else 1
    bn1 = 128
    while bn1 > 16 * per_out and blocks * -(-s.inter * per_out // bn1) < target:
        bn1 //= 2
    gemm1 = GemmConfig(block_n=bn1, block_k=bk, num_warps=4, num_stages=stages)
    bn2 = 64
    while bn2 > 32 and blocks * -(-s.hidden // bn2) < target:
        bn2 //= 2
    # Split K of GEMM2 while the grid is short of the target and each split keeps >= 4 K tiles. grouped_gemm
    # gives every split ceil(tiles / S) K tiles, so for a ragged I the last splits could get none (programs
    # that only write zeros; I = 4100, BLOCK_K = 128: 33 tiles in 8 splits of 5, the 8th starts past the end).
    split = 1
    k_tiles = -(-s.inter // bk)
    while (blocks * -(-s.hidden // bn2) * split < target and s.inter // (2 * split) >= 4 * bk
           and (2 * split - 1) * -(-k_tiles // (2 * split)) < k_tiles):
        split *= 2
    gemm2 = GemmConfig(block_n=bn2, block_k=bk, split_k=split, num_warps=4, num_stages=stages)
    return MoEKernelConfig(block_m=block_m, gemm1=gemm1, gemm2=gemm2, y_fp32=True)


# Weight-only integer schemes ("w4a16_g128", "w4a16_g128_asym", "w8a16_g32", ...): codes of 4 or 8 bits.
_WNA16_SCHEME = re.compile(r"w([48])a16(?:_|$)")
_WNA16_GROUP = re.compile(r"_g(\d+)")  # absent: one group a row ("channel")


def wna16_bits(weights: str) -> int | None:
    """4 or 8 for a weight-only integer scheme name (``MoEShape.weights``), 4 for "mxfp4" (4-bit e2m1 codes on the
    same kernel and tiles), else None."""
    if weights == "mxfp4":
        return 4
    m = _WNA16_SCHEME.match(weights)
    return int(m.group(1)) if m else None


def wna16_variant(block_m: int, row_per_block: bool) -> str:
    """The ``grouped_gemm_wna16`` variant for a config that names none (a caller's or an older tuned entry).

    Decode tiles (one routed row a block, or BLOCK_M <= 32): "dequant_bytes"; prefill tiles: "dequant" (the
    H200 measurements in ``_wna16_config``).
    """
    return "dequant_bytes" if row_per_block or block_m <= 32 else "dequant"


def _wna16_config(s: MoEShape, bits: int, block_m: int, blocks: int, target: int) -> MoEKernelConfig:
    """Tiles and variants of ``grouped_gemm_wna16`` (integer weight codes, float activations; variants in
    ``moekit.ops._kernels.grouped_gemm_wna16``).

    A weight element costs bits/16 of a bf16 one, so the layer stays bound by the weight stream up to more rows
    an expert than bf16, but each code also costs a few integer ops to dequantize, once per tile of rows.
    - Decode (one routed row a block at T = 1, or BLOCK_M <= 32: R <~ 9-48 rows an expert): "dequant_bytes"
      on the bf16 decode rules for BLOCK_N and split-K, with K tiles of 128 B of codes per weight row (256
      columns at 4 bits, 128 at 8), so that a program keeps as many weight bytes in flight per stage as the bf16
      decode tile; at T = 1 the grid aims at ~4 programs an SM (BLOCK_N shrinks, GEMM2 splits K). Measured on
      an H200 (w4a16_g128, layer µs, ``benchmarks/probes/wna16_layer.py``; docs/perf/NOTES.md): the byte loads
      beat the int32-word "dequant" by 14-33% from T = 4 to 64 (mixtral T = 64: 612 against 873) and tie or win
      against "gemv" at T = 1 (qwen3 25.7 against 30.0; deepseek-v3 134 against 132); "gemv" loses 1.5-11x
      once a block holds more than one row.
      Integer 4-bit codes past one token: "dequant_pairs" (the same tiles; int32 words, nibbles r and r + 4 of a
      word dequantized as one packed pair straight into wgmma's register operand, four swapped dots a sub-tile):
      14-20% ahead of "dequant_split" (the low and high nibbles as two unswapped dots) from T = 4 to 64 and on
      qwen3/deepseek-v3's T = 256 decode tiles (mixtral T = 16: 351 against 429 µs; deepseek-v3 T = 64: 2293
      against 2771), but behind "dequant_bytes" at T = 1 on qwen3 and deepseek-v3 (30 against 26, 149 against
      134) and far behind "dequant" on prefill tiles; GEMMs it is not given keep "dequant_split" past one token
      (4-8% ahead of "dequant_bytes" at T = 16-64) and "dequant_bytes" at one. At T = 1 with twice the heuristic's BLOCK_N it wins on large experts
      (deepseek-v3 113.5 against 133.8 µs, mixtral 119.5 against 130.9) and loses on small ones (qwen3-30b-a3b
      27.6 against 25.9): taken from H·I >= 4M weights an expert. Measured with groups of 128 (dots 32 wide):
      only sub-tiles of >= 128 columns take it (whole-row groups: 64-wide dots, unmeasured; groups of 64 or K
      tiles of 64, e.g. K = 2880, keep the byte loads).
      Named "gluon_pairs" since 2026-11-29: the same pieces in a Gluon kernel on sm_90 (``moekit.ops.gluon_wna16``:
      wgmmas left in flight, group scales in fp32; elsewhere, or for what it does not take, "dequant_pairs"),
      layer µs on an H200 (``wna16_layer.py --variants dequant_pairs,gluon_pairs``): mixtral T = 1 / 4 / 16 / 64
      121.0 / 274.0 / 357.7 / 520.8 -> 78.5 / 200.6 / 307.0 / 330.6, deepseek-v3 115.7 / 375.2 / 1047.7 / 2322.9
      -> 102.0 / 283.2 / 816.3 / 1785.4, qwen3-30b-a3b T = 4 / 16 / 64 58.4 / 130.3 / 181.1 -> 58.2 / 123.4 / 167.2.
      Tiles the Gluon kernel does not take (a gated tile of fewer than 128 weight rows: 64 outputs, one
      warpgroup, at least) run "dequant_pairs": deepseek-v3's GEMM 1 at T = 1 (64 rows), so its T = 1 gain is
      GEMM 2's. mxfp4 decode takes the Gluon kernel too, on its own tiles where the device runs it
      (``_mxfp4_gluon_config``; ``MoEShape.gluon``): gpt-oss-120b T = 1 / 16 / 256 / 1024 85.6 / 562.9 / 1328 / 2068
      -> 51.3 / 365.0 / 877.4 / 1483 µs (H200); elsewhere the byte loads below. Where the call runs Gluon, its
      16-slot blocks take twice the BLOCK_N too (GEMM 1 two warpgroups, 128 outputs; GEMM 2 128 rows), layer µs
      on an H200 (``wna16_layer.py --variants gluon_pairs --block-n 1,2``): deepseek-v3 T = 4 / 16 / 64 282.8 /
      821.0 / 1783.6 -> 264.6 / 747.1 / 1661.2, qwen3-30b-a3b 58.3 / 123.4 / 168.1 -> 54.2 / 110.0 / 149.5,
      mixtral-8x7b T = 16 307.2 -> 260.9 (T = 4 200.3 -> 202.8: level); 32-slot blocks lost (mixtral T = 64 330.2
      -> 343.6).
    - Otherwise compute-bound: "dequant" (the dot accumulates in place and is pipelined like a bf16 GEMM; the
      old per-dot scaling left the tensor cores waiting on each product, 0.25-0.39x of bf16 at T = 4096 on an
      H200; the word loads beat the byte loads by 4-11% here) on the bf16 prefill shapes: 64 x 128 tiles of 4 warps, 128 x 128 of 8 warps with the half tail from
      128-row blocks, 64-wide K (the dequantized [BLOCK_N, BLOCK_K] tile lives in registers beside the
      accumulator).
    - mxfp4 past one token swaps the MMA's operands (``GemmConfig.swap_ab``: acc^T = w @ a^T, the dequantized
      weights a register operand of wgmma instead of a tile stored to shared memory): gpt-oss-120b on an H200,
      T = 16 623 -> 558 µs, T = 4096 7429 -> 4415; T = 1 123 against 85 (kept unswapped). Integer codes lost
      with it at every measured point (qwen3-30b-a3b, mixtral-8x7b, deepseek-v3 at T = 1-4096: 3-40% slower,
      but mixtral T = 64 on byte loads, 585 against 613, still behind "dequant_split"'s 565).
    Untuned on a GPU: ``benchmarks/probes/wna16_timing.py`` times the variants and tiles against each other;
    tuned tables hold exceptions under the key "E,H,I,K,<scheme>".
    """
    bk = 256 if bits == 4 else 128
    # mxfp4 with 16-bit activations past one token: the weights as the MMA's register operand (swap_ab).
    swap = s.weights == "mxfp4" and s.num_tokens > 1 and s.elem_bytes == 2
    if s.num_tokens == 1 or block_m <= 32:
        cfg = _decode_config(s, block_m, blocks, 2 * target if s.num_tokens == 1 else target, bk)
        k1, k2 = _k_tile_dividing(bk, s.hidden), _k_tile_dividing(bk, s.inter)
        # "dequant_pairs" (integer 4-bit codes, 16-bit activations, the measured sub-tiles: ``_pairs_tile``, so
        # each GEMM decides for itself); one token only on large experts, with twice the BLOCK_N. Else byte loads,
        # with the nibbles split past one token.
        int4 = bits == 4 and s.weights != "mxfp4"
        group = _WNA16_GROUP.search(s.weights)
        candidate = int4 and s.elem_bytes == 2 and (s.num_tokens > 1 or s.hidden * s.inter >= _PAIRS_T1_MIN)
        otherwise = "dequant_split" if int4 and s.num_tokens > 1 else "dequant_bytes"

        def gemm(g: GemmConfig, k_tile: int, k_dim: int, n_out: int, gated: bool) -> GemmConfig:
            pairs = candidate and _pairs_tile(k_tile, int(group.group(1)) if group else k_dim, k_dim)
            # Twice the bytes a program: one token (H200 probe), and 16-slot blocks where the Gluon kernel runs
            # and still takes the doubled tile (else it would run "dequant_pairs" on tiles never measured there).
            wider = s.gluon and block_m <= 16 and gluon_tile_fits(2 * g.block_n, g.num_warps, n_out, gated)
            wide = 2 if pairs and (s.num_tokens == 1 or wider) else 1
            return replace(g, variant="gluon_pairs" if pairs else otherwise, block_k=k_tile,
                           block_n=wide * g.block_n, swap_ab=swap)

        cfg = replace(cfg, gemm1=gemm(cfg.gemm1, k1, s.hidden, s.inter, s.gated),
                      gemm2=gemm(cfg.gemm2, k2, s.inter, s.hidden, False))
        return _mxfp4_gluon_config(s, cfg, blocks, target) if s.weights == "mxfp4" and s.gluon else cfg
    if block_m == 128:
        # mxfp4's swapped 128-row tiles: 256 weight rows (two wgmma M blocks a warpgroup): gpt-oss-120b T = 4096 on
        # an H200 4448 -> 3989 µs (docs/perf/NOTES.md); 64-row blocks keep 128.
        g = GemmConfig(block_n=256 if swap else 128, block_k=64, group_m=8, num_warps=8, num_stages=3,
                       half_tail=True, variant="dequant", swap_ab=swap)
    else:
        g = GemmConfig(block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4, variant="dequant",
                       swap_ab=swap)
    return MoEKernelConfig(block_m=block_m, gemm1=g, gemm2=g, y_fp32=False)


def gluon_tile_fits(block_n: int, num_warps: int, n_out: int, gated: bool) -> bool:
    """Whether the Gluon decode kernel takes BLOCK_N weight rows on ``num_warps`` warps for ``n_out`` outputs (gated:
    half gate, half up rows): whole warpgroups of 64-row wgmma blocks, at most 256 rows a TMA box, dividing the
    outputs (``moekit.ops.gluon_wna16.gluon_unsupported`` checks the same with ``GluonTiles``)."""
    out_n = block_n // 2 if gated else block_n
    wg = max(1, num_warps // 4, block_n // 128)
    return num_warps % 4 == 0 and out_n % (64 * wg) == 0 and n_out % out_n == 0 and out_n <= 256


def _mxfp4_gluon_config(s: MoEShape, cfg: MoEKernelConfig, blocks: int, target: int) -> MoEKernelConfig:
    """mxfp4 decode tiles on the Gluon kernel ("gluon_pairs", ``moekit.ops.gluon_wna16``) for each GEMM its tile
    divides (else that GEMM keeps ``cfg``'s byte loads): GEMM 1 128 weight rows a program (gated: 64 outputs, the
    kernel's least), GEMM 2 64 (gpt-oss's H = 2880 is no multiple of 128), K steps of 128, GEMM 2 split while the
    grid is short of ``target`` programs and each split keeps >= 4 steps."""
    gemm1, gemm2 = cfg.gemm1, cfg.gemm2
    if gluon_tile_fits(128 if s.gated else 64, 4, s.inter, s.gated):
        gemm1 = GemmConfig(block_n=128 if s.gated else 64, block_k=128, num_warps=4, num_stages=4,
                           variant="gluon_pairs")
    if gluon_tile_fits(64, 4, s.hidden, False):
        split = 1
        while blocks * (s.hidden // 64) * split < target and s.inter // (2 * split) >= 4 * 128:
            split *= 2
        gemm2 = GemmConfig(block_n=64, block_k=128, split_k=split, num_warps=4, num_stages=4, variant="gluon_pairs")
    return replace(cfg, gemm1=gemm1, gemm2=gemm2)


def k_tiles(block_k: int, group_size: int, k_dim: int, bits: int) -> tuple[int, int]:
    """(BLOCK_K, SUB_K) of ``grouped_gemm_wna16`` for a configured K tile and the weights' group size: SUB_K columns
    lie in one group (the kernel scales a sub-tile by one group's scale) and divide BLOCK_K. Raises naming the
    argument when no K tile fits."""
    # 4 bits: a sub-tile may run as two dots of SUB_K/2 columns (even, odd); tl.dot needs a K of at least 16.
    min_sub = 32 if bits == 4 else 16
    if block_k < min_sub:
        raise ValueError(f"config.block_k: {bits}-bit weights need a K tile >= {min_sub}, got {block_k}")
    if group_size >= k_dim or group_size % block_k == 0:
        return block_k, block_k
    if block_k % group_size == 0 and group_size >= min_sub:
        return block_k, group_size
    # A group size that is not a power of two (96): the largest power-of-two tile that divides it.
    tile = block_k
    while tile > min_sub and group_size % tile:
        tile //= 2
    if group_size % tile:
        raise ValueError(f"b.group_size: {bits}-bit weights need a group size that is a multiple of a K tile (a "
                         f"power of two >= {min_sub}) or a power of two >= {min_sub} dividing it, got {group_size}")
    return tile, tile


def _pairs_tile(block_k: int, group_size: int, k_dim: int) -> bool:
    """Whether the heuristic gives a GEMM with this K tile and group size "dequant_pairs": it would run them (whole
    int32 words of codes: K a multiple of 8) on sub-tiles of >= 128 columns, the measured dots of 32 (H200, groups
    of 128) or wider. Narrower sub-tiles (groups of 64, K tiles of 64) would run them on 16-wide dots, unmeasured:
    they keep the byte-load choice."""
    try:
        return k_dim % 8 == 0 and k_tiles(block_k, group_size, k_dim, 4)[1] >= 128
    except ValueError:
        return False


def pairs_sub_tile(sub_k: int) -> bool:
    """Whether ``grouped_gemm_wna16``'s "dequant_pairs" runs on K sub-tiles of ``sub_k`` columns (``k_tiles``): its
    four dots a sub-tile are sub_k / 4 wide, and tl.dot needs a K of at least 16."""
    return sub_k >= 64


# One token on "dequant_pairs": experts of at least this many weights (H·I; qwen3-30b-a3b has 1.6M, deepseek-v3 15M).
_PAIRS_T1_MIN = 4 << 20


def _k_tile_dividing(block_k: int, k: int) -> int:
    """The largest K tile <= ``block_k`` (halving, down to 32) that divides ``k``, else ``block_k``. A K that
    the tile does not divide masks the loads of every tile of the weight-only kernel, not only the last: on an
    H200, gpt-oss-120b (K = 2880) in mxfp4 ran 1757 µs at T = 16 with 256-wide tiles and 626 µs with 64-wide ones
    (docs/perf/NOTES.md)."""
    tile = block_k
    while k % tile and tile > 32:
        tile //= 2
    return tile if k % tile == 0 else block_k


def _lookup_tuned(s: MoEShape) -> MoEKernelConfig | None:
    folder = tuned_dir() / (s.gpu or gpu_name())
    table = _tuned_tables(str(folder)).get(s.table_key)
    if not table:
        return None
    # Entries are keyed by the largest token count they were tuned for: take the first that covers T. A null
    # entry keeps the heuristic for its range (it ends the range of a tuned entry below it).
    for max_tokens in sorted(table, key=int):
        if s.num_tokens <= int(max_tokens):
            entry = table[max_tokens]
            return MoEKernelConfig.from_dict(entry) if entry is not None else None
    return None


@functools.cache
def gpu_name(device: torch.device | None = None) -> str:
    """Folder name of a device's tuned tables, e.g. ``h100_80gb_hbm3`` (the current CUDA device by default)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return "cpu"
    return torch.cuda.get_device_name(device).lower().replace("nvidia ", "").replace(" ", "_")


@functools.cache
def _tuned_tables(folder: str) -> dict:
    return _read_tables(Path(folder))


def _read_tables(folder: Path) -> dict:
    merged: dict = {}
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            merged.update(json.loads(path.read_text()))
    return merged


__all__ = [
    "WNA16_VARIANTS", "FusedDecodeConfig", "GemmConfig", "MoEKernelConfig", "MoEShape", "choose_config",
    "fused_decode_config", "gpu_name", "heuristic_config", "k_tiles", "pairs_sub_tile", "tuned_dir", "wna16_bits",
    "wna16_variant",
]
