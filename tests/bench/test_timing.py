"""CPU timing: interleaved rounds within a budget, with a median, a minimum and a spread per variant."""

import pytest
import torch

from moekit.bench.timing import time_cpu, time_us


def test_rounds_interleave_the_variants():
    order = []
    timings = time_cpu({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, budget_s=0.0,
                       min_rounds=3, max_rounds=10)
    # one warm-up call each, then 3 rounds of a, b (a zero budget still takes min_rounds)
    assert order == ["a", "b"] * 4
    for t in timings.values():
        assert t.rounds == 3 and 0 < t.min_us <= t.median_us and t.spread >= 0


def test_rounds_stop_at_max_rounds():
    timings = time_cpu({"f": lambda: None}, budget_s=60.0, min_rounds=1, max_rounds=7)
    assert timings["f"].rounds == 7


def test_spread_is_the_interquartile_range_over_the_median(monkeypatch):
    ticks = iter([0.0] + [x for i, d in enumerate([1, 1, 2, 3, 9]) for x in (10.0 * i, 10.0 * i + d)])
    monkeypatch.setattr("moekit.bench.timing.time.perf_counter", lambda: next(ticks))
    t = time_cpu({"f": lambda: None}, budget_s=-1.0, min_rounds=5, max_rounds=5)["f"]
    # samples 1, 1, 2, 3, 9 s: median 2, quartiles 1 and 3
    assert (t.median_us, t.min_us, t.spread) == (2e6, 1e6, pytest.approx(1.0))


@pytest.mark.parametrize("kwargs, match", [({"fns": {}}, "fns"),
                                           ({"fns": {"f": lambda: None}, "min_rounds": 0}, "min_rounds")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_cpu(**kwargs)


def test_time_us_on_cpu_is_a_median():
    assert time_us(lambda: sum(range(100)), torch.device("cpu"), graph=False) > 0
