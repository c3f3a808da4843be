"""``teelab bench unseal``'s figures: the medians of TLS and plain round trips, their ratio held to 1.10, and
no secret other than the sealed one; its counts are checked before anything boots."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from harness.bench.unseal import BARS, UnsealBenchResult


def result(tls: list[float], plain: list[float], wrong: int = 0) -> UnsealBenchResult:
    bench = UnsealBenchResult(name="unseal", unit="ms", params={}, wrong_secrets=wrong)
    bench.bars = list(BARS)
    bench.warm = {"tls": tls, "plain": plain}
    bench.samples = [t / p for t, p in zip(tls, plain, strict=True)]
    bench.cold = {"tls": [60.0], "plain": [30.0]}
    bench.first = {"tls": 200.0, "plain": 30.0}
    return bench


def test_the_ratio_is_of_the_medians_and_holds_at_1_10() -> None:
    within = result(tls=[10.9, 11.0, 50.0], plain=[10.0, 10.0, 10.0])
    assert within.figures["tls_median_ms"] == 11.0 and within.figures["plain_median_ms"] == 10.0
    assert within.figures["tls_over_plain"] == 1.1 and within.ok
    assert within.figures["paired_ratio_median"] == 1.1  # 1.09, 1.1 and 5.0, round by round
    assert within.figures["cold_tls_over_plain"] == 2.0 and within.figures["first_tls_ms"] == 200.0
    beyond = result(tls=[11.2, 11.2, 11.2], plain=[10.0, 10.0, 10.0])
    assert beyond.figures["tls_over_plain"] == 1.12 and not beyond.ok
    data = beyond.to_dict()
    assert data["tls_ms"] == [11.2, 11.2, 11.2] and data["cold_plain_ms"] == [30.0]
    assert {b["figure"]: b["holds"] for b in data["bars"]} == {"tls_over_plain": False, "wrong_secrets": True}


def test_a_wrong_secret_fails_the_run() -> None:
    assert not result(tls=[10.0], plain=[10.0], wrong=1).ok


@pytest.mark.parametrize("args", [["-n", "0"], ["--cold", "-1"], ["-n", "x"]])
def test_bad_counts_are_usage_errors(run: Callable[..., tuple[int, str, str]], args: list[str]) -> None:
    status, _out, err = run("bench", "unseal", *args)
    assert status == 2 and "E102" in err
