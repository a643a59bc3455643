"""``moekit bench``: latency, throughput and % of the hardware floor (MEASURING.md) for MoE shapes.

    shapes.py     presets (MEASURING.md) and dims from a transformers config.json
    floor.py      bytes, flops, measured ceilings -> floor
    baselines.py  torch grouped_mm and the eager loop
    timing.py     medians; CUDA-graph replays for decode-sized calls; on CPU interleaved rounds (min, spread)
    run.py        one point: inputs, correctness vs the reference, timings
    report.py     table, markdown, JSON, plot
"""

from moekit.bench.floor import Ceilings, floor_us, measure_ceilings
from moekit.bench.run import Row, bench_point
from moekit.bench.shapes import PRESETS, MoEShape, shape_from_hf_config

__all__ = ["PRESETS", "Ceilings", "MoEShape", "Row", "bench_point", "floor_us", "measure_ceilings",
           "shape_from_hf_config"]
