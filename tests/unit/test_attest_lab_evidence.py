"""Lab-issued SNP reports, TDX quotes and attestation documents: they verify when the policy names the lab
root, and each way they can be wrong fails with its own reason."""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2
import pytest
from teelab_guest.binding import report_data

from harness import paths
from harness.attest import LabAuthority, NonceBook, Policy, verify
from harness.attest.nitro import ALG_ES384, encode_cose_sign1, encode_payload, sig_structure

KINDS = ("snp", "tdx", "nitro")
MEASUREMENT = bytes(range(48))
OTHER = b"\xee" * 48
PUBLIC_KEY = b"0\x82\x01\x22 a SubjectPublicKeyInfo stands here"
VENDOR_ROOT = {"snp": "amd-milan", "tdx": "intel-sgx", "nitro": "aws-nitro"}
MISMATCH = {"snp": "measurement-mismatch", "tdx": "mrtd-mismatch", "nitro": "pcr-mismatch"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="session")
def lab() -> LabAuthority:
    return LabAuthority.load_or_create(paths.state_dir() / "lab-ca")


def issue(
    lab: LabAuthority,
    kind: str,
    *,
    measurement: bytes = MEASUREMENT,
    debug: bool = False,
    nonce: bytes = b"",
    public_key: bytes = PUBLIC_KEY,
) -> bytes:
    if kind == "snp":
        return lab.snp_report(
            report_data(nonce, public_key),
            measurement=measurement,
            policy=0x30000 | (1 << 19 if debug else 0),
        )
    if kind == "tdx":
        return lab.tdx_quote(report_data(nonce, public_key), mrtd=measurement, td_attributes=int(debug))
    pcrs = {0: bytes(48), 1: bytes(48), 2: bytes(48)} if debug else {0: measurement, 1: OTHER, 2: OTHER}
    return lab.attestation_document(
        pcrs=pcrs, public_key=public_key, user_data=None, nonce=nonce or None, module_id="lab-enclave"
    )


def policy(kind: str, *, measurement: bytes | None = MEASUREMENT, **extra: Any) -> Policy:
    if measurement is not None:
        extra[{"snp": "measurement", "tdx": "mrtd", "nitro": "pcrs"}[kind]] = (
            {0: measurement} if kind == "nitro" else measurement
        )
    return Policy(roots=extra.pop("roots", ("lab",)), **extra)


@pytest.mark.parametrize("kind", KINDS)
def test_lab_evidence_verifies_against_the_named_lab_root(lab: LabAuthority, kind: str) -> None:
    verdict = verify(issue(lab, kind), policy(kind, public_key=PUBLIC_KEY))
    assert verdict.ok, verdict.reasons
    assert (verdict.kind, verdict.root) == (kind, "lab")
    assert verdict.claims["public_key"] == PUBLIC_KEY.hex()
    assert verdict.claims["debug"] is False


@pytest.mark.parametrize("kind", KINDS)
def test_lab_evidence_under_a_policy_without_the_lab_root_says_how_to_trust_it(
    lab: LabAuthority, kind: str
) -> None:
    verdict = verify(issue(lab, kind), policy(kind, roots=("amd-milan", "intel-sgx", "aws-nitro")))
    assert not verdict.ok
    untrusted = [r for r in verdict.reasons if r.code == "untrusted-root"]
    assert untrusted and 'roots = ["lab"]' in untrusted[0].message, verdict.reasons


@pytest.mark.parametrize("kind", KINDS)
def test_a_different_expected_measurement_is_its_own_reason(lab: LabAuthority, kind: str) -> None:
    verdict = verify(issue(lab, kind), policy(kind, measurement=OTHER))
    assert verdict.codes == {MISMATCH[kind]}


@pytest.mark.parametrize("kind", KINDS)
def test_debug_evidence_is_refused_unless_the_policy_allows_it(lab: LabAuthority, kind: str) -> None:
    evidence = issue(lab, kind, debug=True)
    refused = verify(evidence, policy(kind, measurement=None))
    assert refused.codes == {"debug-not-allowed"} and refused.claims["debug"] is True
    assert verify(evidence, policy(kind, measurement=None, allow_debug=True)).ok


@pytest.mark.parametrize("kind", KINDS)
def test_nonces_are_single_use_and_expire(lab: LabAuthority, kind: str) -> None:
    clock = Clock()
    book = NonceBook(ttl=60, clock=clock)
    fresh, late, _ = book.issue(), book.issue(), book.issue()
    bound = {"nonce_book": book, "public_key": PUBLIC_KEY}

    def check(nonce: bytes) -> set[str]:
        return verify(issue(lab, kind, nonce=nonce), policy(kind, nonce=nonce, **bound)).codes

    assert check(fresh) == set()
    assert check(fresh) == {"nonce-reused"}
    assert check(b"never issued by the book") == {"nonce-unknown"}
    clock.now += 61
    assert check(late) == {"nonce-stale"}


def _with_unreadable_certificate(lab: LabAuthority, kind: str, nonce: bytes) -> bytes:
    """Evidence bound to ``nonce`` whose endorsing certificate cannot be parsed: no signature is checked."""
    if kind == "tdx":
        quote = issue(lab, "tdx", nonce=nonce)
        at = quote.index(b"-----BEGIN CERTIFICATE-----") + 40
        return quote[:at] + b"!" + quote[at + 1 :]
    _, intermediate, root = lab.enclave_chain()
    payload = encode_payload(
        module_id="lab-enclave",
        digest="SHA384",
        timestamp=1_700_000_000_000,
        pcrs={0: MEASUREMENT, 1: OTHER, 2: OTHER},
        certificate=b"\x30 not a certificate",
        cabundle=[root.der, intermediate.der],
        public_key=PUBLIC_KEY,
        user_data=None,
        nonce=nonce,
    )
    return encode_cose_sign1(cbor2.dumps({1: ALG_ES384}), payload, bytes(96))


@pytest.mark.parametrize("kind", ("tdx", "nitro"))
def test_evidence_with_an_unreadable_certificate_does_not_use_up_the_nonce(
    lab: LabAuthority, kind: str
) -> None:
    book = NonceBook()
    nonce = book.issue()
    bound = {"nonce": nonce, "nonce_book": book, "public_key": PUBLIC_KEY}
    forged = verify(_with_unreadable_certificate(lab, kind, nonce), policy(kind, **bound))
    assert "malformed" in forged.codes and not forged.ok
    assert book.check(nonce) is None
    assert verify(issue(lab, kind, nonce=nonce), policy(kind, **bound)).ok


def test_every_unreadable_certificate_of_a_document_is_named(lab: LabAuthority) -> None:
    leaf, intermediate, root = lab.enclave_chain()

    def document(certificate: bytes, cabundle: list[bytes]) -> bytes:
        payload = encode_payload(
            module_id="lab-enclave",
            digest="SHA384",
            timestamp=1_700_000_000_000,
            pcrs={0: MEASUREMENT},
            certificate=certificate,
            cabundle=cabundle,
            public_key=None,
            user_data=None,
            nonce=None,
        )
        protected = cbor2.dumps({1: ALG_ES384})
        return encode_cose_sign1(protected, payload, lab.sign_es384(sig_structure(protected, payload)))

    garbage = b"\x30 not a certificate"
    both = verify(document(garbage, [root.der, intermediate.der, garbage]), policy("nitro"))
    assert both.codes == {"malformed"} and both.fields() == {"certificate", "cabundle.2"}
    extra = verify(document(leaf.der, [root.der, intermediate.der, garbage]), policy("nitro"))
    assert extra.codes == {"malformed"} and extra.fields() == {"cabundle.2"} and extra.root == "lab"


@pytest.mark.parametrize("kind", KINDS)
def test_evidence_bound_to_another_nonce_or_key_is_refused(lab: LabAuthority, kind: str) -> None:
    evidence = issue(lab, kind, nonce=b"nonce-1")
    code = "binding-mismatch" if kind != "nitro" else "nonce-mismatch"
    assert verify(evidence, policy(kind, nonce=b"nonce-2", public_key=PUBLIC_KEY)).codes == {code}
    wrong_key = verify(evidence, policy(kind, nonce=b"nonce-1", public_key=b"another key"))
    assert wrong_key.codes == {"binding-mismatch" if kind != "nitro" else "public-key-mismatch"}


@pytest.mark.parametrize("kind", KINDS)
def test_lab_evidence_is_refused_by_a_policy_without_the_lab_root(lab: LabAuthority, kind: str) -> None:
    evidence = issue(lab, kind)
    for roots in ((VENDOR_ROOT[kind],), Policy().roots):
        verdict = verify(evidence, policy(kind, roots=roots))
        assert verdict.codes == {"untrusted-root"} and verdict.root == "lab"


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_evidence_is_refused_as_truncated(lab: LabAuthority, kind: str) -> None:
    evidence = issue(lab, kind)
    for cut in (evidence[:-1], evidence[:200], evidence[:3]):
        verdict = verify(cut, policy(kind))
        assert verdict.codes == {"truncated"} and not verdict.ok and verdict.root is None


@pytest.mark.parametrize("kind", KINDS)
def test_every_failed_check_is_listed_not_just_the_first(lab: LabAuthority, kind: str) -> None:
    evidence = issue(lab, kind, debug=True, nonce=b"n", measurement=OTHER)
    verdict = verify(
        evidence, policy(kind, roots=(VENDOR_ROOT[kind],), nonce=b"other", public_key=PUBLIC_KEY)
    )
    assert {"untrusted-root", "debug-not-allowed", MISMATCH[kind]} <= verdict.codes
    assert ("binding-mismatch" if kind != "nitro" else "nonce-mismatch") in verdict.codes


def test_snp_policy_bits_vmpl_and_minimum_tcb(lab: LabAuthority) -> None:
    base = policy("snp")
    migrating = lab.snp_report(bytes(64), measurement=MEASUREMENT, policy=0x30000 | 1 << 18)
    assert verify(migrating, base).codes == {"migrate-ma-not-allowed"}
    assert verify(migrating, dataclasses.replace(base, allow_migrate_ma=True)).ok
    smt = lab.snp_report(bytes(64), measurement=MEASUREMENT, platform_info=1)
    no_smt = dataclasses.replace(base, allow_smt=False)
    assert verify(smt, base).ok
    assert verify(smt, no_smt).fields() == {"policy", "platform_info"}
    no_smt_guest = lab.snp_report(bytes(64), measurement=MEASUREMENT, policy=0x20000)
    assert verify(no_smt_guest, no_smt).ok
    vmpl2 = lab.snp_report(bytes(64), measurement=MEASUREMENT, vmpl=2)
    assert verify(vmpl2, base).codes == {"vmpl-not-allowed"}
    assert verify(vmpl2, dataclasses.replace(base, max_vmpl=2)).ok
    old = lab.snp_report(
        bytes(64), measurement=MEASUREMENT, tcb={"bootloader": 1, "tee": 0, "snp": 5, "microcode": 50}
    )
    floor = {"bootloader": 1, "tee": 0, "snp": 8, "microcode": 0}
    assert verify(old, dataclasses.replace(base, min_tcb=floor)).codes == {"tcb-too-low"}
    assert verify(
        lab.snp_report(bytes(64), measurement=MEASUREMENT), dataclasses.replace(base, min_tcb=floor)
    ).ok


def test_snp_host_data_and_report_data_reference_values(lab: LabAuthority) -> None:
    evidence = lab.snp_report(b"\x07" * 64, measurement=MEASUREMENT, host_data=b"\x05" * 32)
    assert verify(evidence, policy("snp", host_data=b"\x05" * 32, report_data=b"\x07" * 64)).ok
    assert verify(evidence, policy("snp", host_data=bytes(32))).codes == {"host-data-mismatch"}
    assert verify(evidence, policy("snp", report_data=bytes(64))).codes == {"report-data-mismatch"}


def test_snp_report_without_its_vcek_is_refused_naming_the_missing_certificate(
    lab: LabAuthority, tmp_path: Any
) -> None:
    evidence = lab.snp_report(bytes(64), measurement=MEASUREMENT)
    elsewhere = policy("snp", lab_dir=tmp_path / "no-lab-here")
    assert verify(evidence, elsewhere).codes == {"certificate-missing"}
    # The guest's certificate table carries the VCEK, but without the lab CA the chain reaches no known root.
    with_table = verify(evidence, elsewhere, certificates=[lab.snp_cert_table()])
    assert with_table.codes == {"untrusted-root"}


def test_tdx_reference_values_for_every_measurement_register(lab: LabAuthority) -> None:
    rtmrs = [bytes([i]) * 48 for i in range(4)]
    evidence = lab.tdx_quote(
        bytes(64),
        mrtd=MEASUREMENT,
        rtmrs=rtmrs,
        mrconfigid=b"\x0c" * 48,
        mrowner=b"\x0d" * 48,
        mrownerconfig=b"\x0e" * 48,
    )
    exact = policy(
        "tdx", rtmrs=rtmrs, mrconfigid=b"\x0c" * 48, mrowner=b"\x0d" * 48, mrownerconfig=b"\x0e" * 48
    )
    assert verify(evidence, exact).ok
    wrong = policy(
        "tdx", rtmrs={2: bytes(48)}, mrconfigid=bytes(48), mrowner=bytes(48), mrownerconfig=bytes(48)
    )
    verdict = verify(evidence, wrong)
    assert verdict.codes == {
        "rtmr-mismatch",
        "mrconfigid-mismatch",
        "mrowner-mismatch",
        "mrownerconfig-mismatch",
    }
    assert verdict.fields() == {"rtmr2", "mrconfigid", "mrowner", "mrownerconfig"}


def test_nitro_document_freshness_module_id_pcr_lengths_and_tagging(lab: LabAuthority) -> None:
    import datetime as dt

    issued = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    doc = lab.attestation_document(
        pcrs={0: MEASUREMENT, 1: OTHER, 2: OTHER},
        public_key=None,
        user_data=b"u",
        nonce=None,
        module_id="m-1",
        timestamp_ms=int(issued.timestamp() * 1000),
    )
    young = dt.timedelta(minutes=5)
    assert verify(doc, policy("nitro", max_age=young), now=issued + dt.timedelta(minutes=1)).ok
    assert verify(doc, policy("nitro", max_age=young), now=issued + dt.timedelta(hours=1)).codes == {
        "evidence-stale"
    }
    assert verify(doc, policy("nitro", max_age=young), now=issued - dt.timedelta(hours=1)).codes == {
        "timestamp-in-future"
    }
    assert verify(doc, policy("nitro", module_id="m-2", user_data=b"v")).codes == {
        "module-id-mismatch",
        "user-data-mismatch",
    }
    short = lab.attestation_document(
        pcrs={0: MEASUREMENT, 1: b"\x01" * 32}, public_key=None, user_data=None, nonce=None, module_id="m"
    )
    assert verify(short, policy("nitro")).fields() == {"pcrs.1"}
    tagged = lab.attestation_document(
        pcrs={0: MEASUREMENT}, public_key=None, user_data=None, nonce=None, module_id="m", tagged=True
    )
    assert tagged[:2] == b"\xd2\x84" and verify(tagged, policy("nitro")).ok
