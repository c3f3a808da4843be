"""The KMS as its own process: its log goes to a file in the KMS dir (a pipe nobody reads could stall it),
and a server that cannot start says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.kms import KmsProcess, Listen
from harness.kms.errors import ServerStartError


def test_the_server_logs_to_a_file_and_stops(tmp_path: Path) -> None:
    with KmsProcess(tmp_path / "kms", Listen(port=0)) as kms:
        assert kms.endpoint.startswith("http://127.0.0.1:")
        assert kms.log_path == tmp_path / "kms" / "server.log" and kms.log_path.exists()
    assert kms.proc is not None and kms.proc.poll() is not None


def test_a_server_that_cannot_listen_reports_its_log(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError) as failed:
        KmsProcess(tmp_path / "kms", Listen(host="203.0.113.7", port=1)).start(timeout=30)
    assert failed.value.evidence["stderr"], "the server's own words should come with the error"
