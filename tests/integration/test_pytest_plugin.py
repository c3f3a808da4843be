"""The pytest plugin as a lab suite uses it: a suite written only with its fixtures and markers, run by pytest
itself (pytester), boots a confidential guest that verifies, and skips hardware it lacks with the reason."""

from __future__ import annotations

import pytest

from harness.host.probe import probe
from harness.pytest_plugin import missing_hardware

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.vm

LAB_SUITE = """
import pytest
from teelab_guest import protocol

from harness.attest import LAB, Policy, default_lab_dir, verify

GET_EVIDENCE = (
    "import sys; from teelab_guest.evidence import get_evidence; "
    "sys.stdout.buffer.write(get_evidence(bytes(64)).blob)"
)


def test_a_cvm_image_boots_with_its_tee_and_its_evidence_verifies(boot_guest):
    guest = boot_guest("cvm", name="plugin-cvm")
    blob = guest.agent.exec(["python3", "-c", GET_EVIDENCE], check=True).stdout
    verdict = verify(blob, Policy(roots=(LAB,), lab_dir=default_lab_dir(), report_data=bytes(64)))
    assert verdict.ok, verdict.reasons


def test_the_cvm_factory_gives_a_tdx_guest(cvm):
    guest = cvm("cvm", kind="tdx", name="plugin-tdx", vcpus=1)
    blob = guest.agent.exec(["python3", "-c", GET_EVIDENCE], check=True).stdout
    verdict = verify(blob, Policy(roots=(LAB,), lab_dir=default_lab_dir(), report_data=bytes(64)))
    assert verdict.ok and verdict.kind == "tdx", verdict.reasons


@pytest.mark.snp
def test_needs_snp_hardware():
    pass
"""


def test_a_suite_written_with_the_fixtures_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_lab=LAB_SUITE)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    expected_skips = 1 if missing_hardware("snp", probe()) else 0
    result.assert_outcomes(passed=2, skipped=expected_skips)
    if expected_skips:
        result.stdout.fnmatch_lines(["*[[]snp[]]*SEV-SNP*"])
