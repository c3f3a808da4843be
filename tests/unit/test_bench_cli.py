"""`teelab bench boot` and `teelab bench image`: bad counts are refused before anything runs."""

from __future__ import annotations

import json

import pytest

from harness.cli import main


@pytest.mark.parametrize("bench", ["boot", "image"])
@pytest.mark.parametrize("runs", ["0", "-1"])
def test_a_run_count_below_one_is_a_usage_error(
    bench: str, runs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", bench, "-n", runs, "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "E102"
