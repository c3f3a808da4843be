"""``bench_kms_versus``: the lab KMS and moto's server each in its own process, the same signed Decrypt load
against both in interleaved rounds, every sampled answer checked, and the two ratios the bars hold."""

from __future__ import annotations

from harness.bench.kms_versus import TARGETS, VersusResult, bench_kms_versus


def test_a_short_side_by_side_run_measures_all_three_and_the_ratios() -> None:
    seen: list[str] = []
    results = bench_kms_versus(rounds=2, clients=8, requests=60, on_result=lambda r: seen.append(r.unit))
    *targets, summary = results
    assert [r.params["target"] for r in targets] == list(TARGETS) and seen == ["ms"] * 3 + ["ratio"]
    for result in targets:
        assert result.errors == 0 and len(result.samples) == 2 * 60
        assert len(result.extra["rps_by_round"]) == 2 and result.rps > 0
    assert isinstance(summary, VersusResult)
    by_target = {r.params["target"]: r.rps for r in targets}
    assert summary.figures["teelab/moto"] == round(by_target["teelab decrypt"] / by_target["moto decrypt"], 3)
    assert summary.figures["recipient/plain"] == round(
        by_target["teelab decrypt-recipient"] / by_target["teelab decrypt"], 3
    )
    assert {b["figure"] for b in summary.bar_results()} == {"teelab/moto", "recipient/plain"}
    assert len(summary.extra["teelab/moto by round"]) == 2
