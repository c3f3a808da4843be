"""The error hierarchy: stable codes, one class per code, hints, JSON view, `teelab explain`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import errors
from harness.cli import main

HARNESS = Path(__file__).resolve().parents[2] / "harness"


def test_explain_knows_every_code_defined_in_the_source() -> None:
    """`teelab explain` imports the error modules by name: a module with codes it forgets is caught here."""
    defined = {
        code
        for path in HARNESS.rglob("*.py")
        for code in re.findall(r'^\s+code = "(E\d+)"', path.read_text(), re.M)
    }
    listed = subprocess.run(
        [sys.executable, "-c", "from harness.cli import explain, main; main(['explain'])"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert defined - set(re.findall(r"^(E\d+) ", listed, re.M)) == set()


def test_every_code_is_unique_and_explained() -> None:
    assert len(errors.REGISTRY) > 10
    for code, cls in errors.REGISTRY.items():
        assert code == cls.code and code[0] == "E" and code[1:].isdigit()
        assert cls.title and cls.explanation, code


def test_reusing_a_code_is_refused_at_class_creation() -> None:
    with pytest.raises(TypeError, match="E101"):

        class Clash(errors.LabError):
            code = "E101"


def test_message_carries_code_and_hint_and_json_keeps_evidence() -> None:
    err = errors.ConfigError("accel must be kvm or tcg", hint="set TEELAB_ACCEL=tcg", given="qemu")
    assert str(err) == "[ E101 ] accel must be kvm or tcg\n  hint: set TEELAB_ACCEL=tcg"
    assert err.to_dict()["evidence"] == {"given": "qemu"}
    assert err.exit_status == 2


def test_explain_prints_title_and_explanation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "401"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("E401: QEMU failed to start")
    assert main(["explain", "E9999"]) == 2
    assert capsys.readouterr().err.startswith("[ E102 ] unknown error code E9999")


def test_docs_error_table_is_current() -> None:
    from pathlib import Path

    from harness.cli.explain import errors_markdown

    docs = Path(__file__).parents[2] / "docs" / "errors.md"
    assert docs.read_text() == errors_markdown(), "run: teelab explain --markdown > docs/errors.md"
