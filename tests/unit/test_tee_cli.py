"""`teelab tee status` and `teelab bench tee`: what they print (the figures themselves are not tested)."""

from __future__ import annotations

import json

import pytest

from harness.cli import main


def test_status_names_the_backend_of_each_kind_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tee", "status", "--json"]) == 0
    rows = {row["kind"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"snp", "tdx", "sgx"}
    for row in rows.values():
        assert row["backend"].endswith("Backend") and row["why"]
        assert row["emulated"] == row["backend"].startswith("Emulated")


@pytest.mark.parametrize("kind", ["snp", "tdx"])
def test_bench_tee_reports_one_sample_per_request(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    main(["bench", "tee", "--kind", kind, "-n", "5", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "tee-service" and result["params"]["kind"] == kind
    assert len(result["samples"]) == 5 and all(s > 0 for s in result["samples"])
    assert result["bars"][0]["figure"] == "median" and result["requests_per_second"] > 0
