"""Benchmark results: summary figures and bars."""

from harness.bench.result import Bar, BenchResult


def test_figures_and_bars() -> None:
    result = BenchResult("boot", "s", {"image": "enclave"}, samples=[3.2, 2.1, 2.5, 2.4, 9.0])
    result.bars.append(Bar("median", "<=", 3.0))
    assert result.figures["median"] == 2.5 and result.figures["max"] == 9.0
    assert result.ok
    result.bars.append(Bar("max", "<=", 5.0))
    assert not result.ok
    data = result.to_dict()
    assert data["bars"][1] == {"figure": "max", "op": "<=", "limit": 5.0, "value": 9.0, "holds": False}


def test_a_result_without_samples_misses_its_bars() -> None:
    result = BenchResult("boot", "s", {}, bars=[Bar("median", "<=", 3.0)])
    assert not result.ok
