"""SEV-SNP: genuine AMD reports verify against AMD roots; lab reports against the lab root only when named."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from harness import paths
from harness.attest import LabAuthority, Policy, parse_snp_report, verify
from harness.attest.snp import FIELD_SPANS, TcbVersion

VECTORS = Path(__file__).parents[1] / "vectors" / "snp"
# (folder, endorsement certificate, root, policy needs); the VLEK expired in 2025-12: pin the time.
AMD_REPORTS = [
    ("", "vcek.der", "amd-milan", {}),
    ("extra/go-sev-guest_milan", "vcek.der", "amd-milan", {"allow_debug": True}),
    ("extra/trustee_milan_vcek", "vcek.der", "amd-milan", {}),
    ("extra/trustee_milan_vlek", "vlek.der", "amd-milan", {"max_vmpl": 1}),
    ("extra/trustee_azure_genoa", "vcek.pem", "amd-genoa", {}),
]
AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="session")
def lab() -> LabAuthority:
    return LabAuthority.load_or_create(paths.state_dir() / "lab-ca")


def amd(folder: str, cert: str) -> tuple[bytes, bytes]:
    return (VECTORS / folder / "report.bin").read_bytes(), (VECTORS / folder / cert).read_bytes()


@pytest.mark.parametrize(("folder", "cert", "root", "needs"), AMD_REPORTS)
def test_genuine_amd_reports_verify_against_their_amd_root(
    folder: str, cert: str, root: str, needs: dict
) -> None:
    report, endorsement = amd(folder, cert)
    verdict = verify(report, Policy(**needs), certificates=[endorsement], now=AT)
    assert verdict.ok, verdict.reasons
    assert verdict.kind == "snp" and verdict.root == root
    assert verdict.claims["measurement"] == parse_snp_report(report).measurement.hex()


@pytest.mark.parametrize(("folder", "cert", "root", "needs"), AMD_REPORTS)
def test_genuine_amd_reports_are_refused_by_a_lab_only_policy(
    folder: str, cert: str, root: str, needs: dict
) -> None:
    report, endorsement = amd(folder, cert)
    verdict = verify(report, Policy(roots=("lab",), **needs), certificates=[endorsement], now=AT)
    assert not verdict.ok
    assert verdict.codes == {"untrusted-root"} and verdict.root == root


def test_lab_report_verifies_only_when_the_policy_names_lab(lab: LabAuthority) -> None:
    report = lab.snp_report(bytes(64), measurement=b"\x11" * 48)
    assert verify(report, Policy(roots=("lab",), measurement=b"\x11" * 48)).ok
    refused = verify(report, Policy())  # vendor roots only: the default
    assert refused.codes == {"untrusted-root"} and refused.root == "lab"
    milan_only = verify(report, Policy(roots=("amd-milan",)))
    assert milan_only.codes == {"untrusted-root"}


def test_lab_report_tcb_and_chip_id_equal_the_vcek_extensions(lab: LabAuthority) -> None:
    tcb = TcbVersion(bootloader=2, tee=1, snp=9, microcode=80)
    report = parse_snp_report(lab.snp_report(bytes(64), measurement=bytes(48), tcb=tcb))
    vcek = lab.vcek(tcb)
    assert vcek.amd is not None and vcek.amd.tcb == tcb == report.reported_tcb
    assert vcek.amd.hwid == report.chip_id == lab.chip_id
    assert verify(lab.snp_report(bytes(64), measurement=bytes(48), tcb=tcb), Policy(roots=("lab",))).ok


def test_report_round_trips_byte_exact_for_every_vector() -> None:
    for folder, cert, _, _ in AMD_REPORTS:
        data = amd(folder, cert)[0]
        assert parse_snp_report(data).to_bytes() == data
    assert sum(size for _, size in FIELD_SPANS.values()) == 1184


@pytest.mark.parametrize("version", [2, 3, 5])
def test_lab_issues_every_report_version_and_claims_follow_it(lab: LabAuthority, version: int) -> None:
    data = lab.snp_report(bytes(64), measurement=bytes(48), version=version)
    verdict = verify(data, Policy(roots=("lab",)))
    assert verdict.ok and verdict.claims["version"] == version
    assert ("cpuid_fam_id" in verdict.claims) is (version >= 3)
    assert ("current_mit_vector" in verdict.claims) is (version >= 5)
    assert parse_snp_report(data).to_bytes() == data


def test_a_recreated_lab_ca_is_not_confused_with_the_old_one(tmp_path: Path) -> None:
    import shutil

    first = LabAuthority.load_or_create(tmp_path / "ca")
    report = first.snp_report(bytes(64), measurement=bytes(48))
    shutil.rmtree(tmp_path / "ca")
    second = LabAuthority.load_or_create(tmp_path / "ca")
    assert second.chip_id != first.chip_id
    verdict = verify(report, Policy(roots=("lab",), lab_dir=tmp_path / "ca"))
    # the new lab's VCEK is for another chip: it is not offered as the report's endorsement
    assert verdict.codes == {"certificate-missing"}


def test_amd_serial_number_zero_is_accepted_deliberately_and_silently() -> None:
    import gc
    import warnings

    from cryptography.utils import CryptographyDeprecationWarning

    from harness.attest import certs

    report, der = amd("", "vcek.der")
    certs._cache.pop(certs.fingerprint(der), None)  # parse it now, not from the cache
    gc.collect()  # an earlier test's unclosed socket must not warn inside the block below
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cert = certs.load_cert(der)
        verdict = verify(report, Policy(), certificates=[der], now=AT)
    assert verdict.ok
    # only warnings about this certificate count: other tests' threads and sockets may warn meanwhile
    cryptography_warns = CryptographyDeprecationWarning
    about_it = [w for w in seen if issubclass(w.category, cryptography_warns) or "serial" in str(w.message)]
    assert not about_it, [str(w.message) for w in about_it]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading the serial is what cryptography warns about
        assert cert.x509.serial_number == 0


@pytest.mark.parametrize(("folder", "cert", "root", "needs"), AMD_REPORTS)
def test_a_genuine_report_without_its_endorsement_is_missing_a_certificate(
    tmp_path: Path, folder: str, cert: str, root: str, needs: dict
) -> None:
    """Even where the lab CA has a VCEK at the report's TCB: that VCEK is for the lab's chip only."""
    report, _ = amd(folder, cert)
    lab = LabAuthority.load_or_create(tmp_path / "lab-ca")
    lab.vcek(parse_snp_report(report).reported_tcb)
    verdict = verify(report, Policy(roots=(root, "lab"), lab_dir=lab.directory, **needs), now=AT)
    assert verdict.codes == {"certificate-missing"} and verdict.root is None
