"""``bench_kms_versus``: the lab KMS and moto's server each in its own process, the same signed Decrypt load
against both in interleaved rounds, every sampled answer checked, and the two ratios the bars hold."""

from __future__ import annotations

import json

import pytest

from harness.bench.kms_versus import TARGETS, VersusResult, bench_kms_versus
from harness.cli import main


def test_a_short_side_by_side_run_measures_all_three_and_the_ratios() -> None:
    seen: list[str] = []
    results = bench_kms_versus(rounds=2, clients=8, requests=60, on_result=lambda r: seen.append(r.unit))
    *targets, summary = results
    assert [r.params["target"] for r in targets] == list(TARGETS) and seen == ["ms"] * 3 + ["ratio"]
    for result in targets:
        assert result.errors == 0 and len(result.samples) == 2 * 60
        assert len(result.extra["rps_by_round"]) == 2 and result.rps > 0
        assert result.extra["server_cpu_ms_per_request"] > 0  # each target's own server process was measured
    assert isinstance(summary, VersusResult)
    by_target = {r.params["target"]: r.rps for r in targets}
    assert summary.figures["teelab/moto"] == round(by_target["teelab decrypt"] / by_target["moto decrypt"], 3)
    assert summary.figures["recipient/plain"] == round(
        by_target["teelab decrypt-recipient"] / by_target["teelab decrypt"], 3
    )
    assert {b["figure"] for b in summary.bar_results()} == {"teelab/moto", "recipient/plain"}
    assert len(summary.extra["teelab/moto by round"]) == 2
    cpu = {r.params["target"]: r.extra["server_cpu_ms_per_request"] for r in targets}
    plain_over_recipient = summary.extra["server CPU per request, plain/recipient"]
    assert plain_over_recipient == pytest.approx(
        cpu["teelab decrypt"] / cpu["teelab decrypt-recipient"], abs=0.02
    )


def test_teelab_bench_kms_versus_moto_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "kms", "--versus-moto", "--rounds", "1", "--clients", "4", "--requests-per-client", "10"]
    status = main([*argv, "--json"])
    results = json.loads(capsys.readouterr().out)
    assert [r["params"].get("target") for r in results] == [*TARGETS, None]
    assert {b["figure"] for b in results[-1]["bars"]} == {"teelab/moto", "recipient/plain"}
    assert status == (0 if all(r["ok"] for r in results) else 1)
    for wrong in (["--hostile", "5"], ["--rounds", "0"], ["--mode", "decrypt"]):
        assert main([*argv, *wrong, "--json"]) == 2
        assert json.loads(capsys.readouterr().out)["error"]["code"] == "E102"
