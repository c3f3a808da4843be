"""guest-init's enclave role, run on the host: /app/run started once with its output on the console and
its exit status said, and the document line an application reports with, as the harness parses it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from teelab_guest import enclave_app


@pytest.fixture
def console(tmp_path: Path) -> Path:
    path = tmp_path / "console"
    path.touch()
    return path


def script(tmp_path: Path, body: str, mode: int = 0o755) -> Path:
    path = tmp_path / "run"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


def test_the_app_runs_with_its_output_on_the_console_and_its_status_is_said(tmp_path, console) -> None:
    app = script(tmp_path, 'echo "out $TEELAB_PROBE"; echo err >&2; read line || echo "no stdin"; exit 3\n')
    said: list[str] = []
    os.environ["TEELAB_PROBE"] = "env-kept"
    try:
        status = enclave_app.run(str(app), said.append, console=str(console))
    finally:
        del os.environ["TEELAB_PROBE"]
    assert status == 3 and said == ["TEELAB-APP-EXIT status=3"]
    assert console.read_text() == "out env-kept\nerr\nno stdin\n"
    assert re.search(enclave_app.EXIT_REGEX, said[0])["status"] == "3"  # type: ignore[index]


def test_an_app_ended_by_a_signal_reports_minus_the_signal(tmp_path, console) -> None:
    app = script(tmp_path, "kill -TERM $$\n")
    said: list[str] = []
    assert enclave_app.run(str(app), said.append, console=str(console)) == -15
    assert re.search(enclave_app.EXIT_REGEX, said[-1])["status"] == "-15"  # type: ignore[index]


def test_an_app_that_cannot_start_is_reported_not_raised(tmp_path, console) -> None:
    said: list[str] = []
    app = script(tmp_path, "exit 0\n", mode=0o644)
    assert enclave_app.run(str(app), said.append, console=str(console)) == enclave_app.NOT_EXECUTABLE
    assert said[0].startswith(f"teelab: cannot run {app}: Permission denied")
    assert said[1] == "TEELAB-APP-EXIT status=126"


def test_start_runs_the_app_in_a_thread_once_and_not_at_all_without_one(tmp_path, console) -> None:
    assert enclave_app.start(print, str(tmp_path / "no-app")) is None
    app = script(tmp_path, 'echo "ran" >> "$0.count"\n')
    said: list[str] = []
    thread = enclave_app.start(said.append, str(app), console=str(console))
    assert thread is not None and thread.daemon and thread.name == "enclave-app"
    thread.join(10)
    assert said == ["TEELAB-APP-EXIT status=0"]
    assert Path(f"{app}.count").read_text() == "ran\n"


def test_a_document_line_round_trips_through_console_noise() -> None:
    document, nonce, key = bytes(range(256)) * 11, os.urandom(32), os.urandom(120)
    line = enclave_app.document_line(document, nonce=nonce, public_key=key)
    assert line.startswith("TEELAB-APP-DOCUMENT nonce=") and "\n" not in line
    console = (
        f"[    1.2] kernel noise\r\nTEELAB-READY role=enclave uptime=2.1\r\n{line}\r\n"
        "TEELAB-APP-EXIT status=0\r\n"
    )
    parsed = enclave_app.parse_document_line(console)
    assert parsed == enclave_app.AppDocument(document=document, nonce=nonce, public_key=key)
    empty = enclave_app.parse_document_line(enclave_app.document_line(b"d", nonce=b"", public_key=b""))
    assert empty == enclave_app.AppDocument(b"d", b"", b"")


def test_no_document_line_parses_as_none() -> None:
    assert (
        enclave_app.parse_document_line("TEELAB-READY role=enclave uptime=2.1\nTEELAB-APP-EXIT status=1\n")
        is None
    )
    assert enclave_app.parse_document_line("TEELAB-APP-DOCUMENT nonce=zz public_key= document=") is None
    for garbled in ("nonce=abc public_key= document=QQ==", "nonce= public_key= document=A"):
        assert enclave_app.parse_document_line(f"TEELAB-APP-DOCUMENT {garbled}") is None


class FakeMachine:
    """What ``wait_for_app`` reads of a machine: the console and its name."""

    def __init__(self, console: str) -> None:
        self.console = console
        self.console_log = Path("console.log")
        self.spec = type("Spec", (), {"name": "enclave-test"})()

    def wait_for_console(self, pattern: str, timeout: float) -> re.Match[str]:
        match = re.search(pattern, self.console)
        assert match is not None
        return match

    def console_text(self) -> str:
        return self.console


def test_wait_for_app_returns_the_reported_document_or_says_why_not() -> None:
    from harness.enclave.errors import EnclaveAppFailed
    from harness.enclave.plan import wait_for_app

    line = enclave_app.document_line(b"doc", nonce=b"\x01", public_key=b"key")
    ok = FakeMachine(f"TEELAB-READY role=enclave uptime=1.0\r\n{line}\r\nTEELAB-APP-EXIT status=0\r\n")
    assert wait_for_app(ok).document == b"doc"  # type: ignore[arg-type]
    for console, said in (
        (f"{line}\r\nTEELAB-APP-EXIT status=1\r\n", "exited with status 1"),
        ("Traceback ...\r\nTEELAB-APP-EXIT status=0\r\n", "reported no attestation document"),
        ("TEELAB-APP-DOCUMENT nonce=a public_key= document=A\r\nTEELAB-APP-EXIT status=0\r\n", "reported no"),
    ):
        with pytest.raises(EnclaveAppFailed, match=said) as caught:
            wait_for_app(FakeMachine(console))  # type: ignore[arg-type]
        assert (caught.value.code, caught.value.exit_status) == ("E934", 1)
