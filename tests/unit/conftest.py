"""Fixtures unit tests share: a lab CA of their own, a KMS that trusts it (a test module may override either),
and the ``teelab`` command run in this process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from harness import cli
from harness.attest import LabAuthority
from harness.kms import KmsServer


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> LabAuthority:
    """A lab CA made for this test module."""
    return LabAuthority.load_or_create(tmp_path_factory.mktemp("lab-ca"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, lab: LabAuthority) -> Iterator[KmsServer]:
    """A KMS in this process, trusting ``lab`` where a key policy names the lab root."""
    with KmsServer.start(tmp_path_factory.mktemp("kms") / "kms", lab_dir=lab.directory) as srv:
        yield srv


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``teelab ARGS`` in this process through the real entry point: (exit status, stdout, stderr)."""

    def invoke(*args: str) -> tuple[int, str, str]:
        status = cli.main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return invoke
