"""TDX collateral is required: a quote without it is refused as ``collateral-missing`` unless the policy
allows that; lab quotes verify with the lab CA's own collateral, which checks the lab quoting enclave's
identity."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from teelab_guest.binding import report_data

from harness.attest import LabAuthority, NonceBook, Policy, PolicyError, parse_tdx_quote, verify

VECTORS = Path(__file__).parents[1] / "vectors" / "tdx"
VENDOR_AT = dt.datetime(2025, 6, 20, tzinfo=dt.UTC)  # inside the vendor collateral's window


def lab_policy(lab: LabAuthority, **needs: object) -> Policy:
    return Policy(roots=("lab",), lab_dir=lab.directory, **needs)  # type: ignore[arg-type]


def lab_key(lab: LabAuthority, name: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((lab.directory / f"{name}.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def raw_signature(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def with_qe_report(lab: LabAuthority, quote: bytes, **changes: object) -> bytes:
    """``quote`` with its QE report changed and signed again by the lab PCK: a quoting enclave the lab PCK
    vouches for, other than the lab's own."""
    parsed = parse_tdx_quote(quote)
    qe = dataclasses.replace(parsed.qe_report, **changes)
    signature = raw_signature(lab_key(lab, "intel-pck"), qe.to_bytes())
    return dataclasses.replace(parsed, qe_report=qe, qe_report_signature=signature).to_bytes()


def test_a_vendor_quote_without_collateral_is_refused_unless_the_policy_allows_it() -> None:
    quote = (VECTORS / "quote.bin").read_bytes()
    refused = verify(quote, Policy(tcb_statuses=("UpToDate",)), now=VENDOR_AT)
    assert not refused.ok and refused.codes == {"collateral-missing"}
    assert refused.fields() == {"collateral"}
    allowed = verify(quote, Policy(allow_missing_collateral=True), now=VENDOR_AT)
    assert allowed.ok and any("collateral" in note for note in allowed.notes)


def test_a_quote_without_collateral_does_not_use_up_its_nonce(lab: LabAuthority, tmp_path: Path) -> None:
    book = NonceBook()
    nonce = book.issue()
    quote = lab.tdx_quote(report_data(nonce, b""), mrtd=bytes(48))
    copy = shutil.copytree(lab.directory, tmp_path / "lab-ca")
    (copy / "tdx-collateral.json").rename(tmp_path / "collateral.json")  # a lab CA without its collateral
    bare = Policy(roots=("lab",), lab_dir=copy, nonce=nonce, nonce_book=book)
    assert verify(quote, bare).codes == {"collateral-missing"}
    collateral = json.loads((tmp_path / "collateral.json").read_text())
    assert verify(quote, bare, collateral=collateral).ok  # the nonce is still unused


def test_lab_quotes_verify_with_the_lab_collateral(lab: LabAuthority) -> None:
    verdict = verify(lab.tdx_quote(bytes(64), mrtd=bytes(48)), lab_policy(lab))
    assert verdict.ok, verdict.reasons
    tcb = verdict.claims["tcb"]
    assert (tcb["status"], tcb["qe_status"], tcb["module_status"]) == ("UpToDate",) * 3
    assert not verdict.notes


def test_the_lab_collateral_is_pcs_shaped_and_never_used_for_vendor_quotes(lab: LabAuthority) -> None:
    collateral = json.loads((lab.directory / "tdx-collateral.json").read_text())
    vendor = (VECTORS / "quote.bin").read_bytes()
    both = Policy(roots=("intel-sgx", "lab"), lab_dir=lab.directory)
    assert verify(vendor, both, now=VENDOR_AT).codes == {"collateral-missing"}
    # given explicitly, it does not fit: its chains end at the lab root, the quote's at Intel's
    given = verify(vendor, both, now=VENDOR_AT, collateral=collateral)
    assert "collateral-mismatch" in given.codes and not given.ok


@pytest.mark.parametrize(
    ("changes", "code", "named"),
    [
        ({"mrsigner": b"\x66" * 32}, "qe-identity-mismatch", "MRSIGNER"),
        ({"isv_prod_id": 1}, "qe-identity-mismatch", "ISVPRODID"),
        ({"attributes": bytes.fromhex("13") + bytes(15)}, "qe-identity-mismatch", "ATTRIBUTES"),
        ({"isv_svn": 5}, "tcb-status", "QE Revoked"),
    ],
)
def test_a_quoting_enclave_other_than_the_identity_is_refused(
    lab: LabAuthority, changes: dict, code: str, named: str
) -> None:
    quote = with_qe_report(lab, lab.tdx_quote(bytes(64), mrtd=bytes(48)), **changes)
    verdict = verify(quote, lab_policy(lab))
    assert not verdict.ok and verdict.codes == {code}
    assert any(named in reason.message for reason in verdict.reasons)
    assert verify(quote, lab_policy(lab, allow_missing_collateral=True)).codes == {code}


def test_allow_missing_collateral_must_be_a_boolean() -> None:
    with pytest.raises(PolicyError):
        Policy.from_mapping({"allow_missing_collateral": "yes"})
    assert Policy.from_mapping({"allow_missing_collateral": True}).allow_missing_collateral


def test_a_pck_certificate_with_a_negative_serial_is_refused_not_raised(lab: LabAuthority) -> None:
    quote = parse_tdx_quote(lab.tdx_quote(bytes(64), mrtd=bytes(48)))
    leaf, ca, root = lab.intel_chain()
    cert = asn1_x509.Certificate.load(leaf.der)
    tbs = cert["tbs_certificate"]
    tbs["serial_number"] = -abs(tbs["serial_number"].native)
    signature = lab_key(lab, "intel-pck-ca").sign(tbs.dump(force=True), ec.ECDSA(hashes.SHA256()))
    forged = asn1_x509.Certificate(
        {
            "tbs_certificate": tbs,
            "signature_algorithm": cert["signature_algorithm"],
            "signature_value": signature,
        }
    )
    pem = b"".join(
        [
            b"-----BEGIN CERTIFICATE-----\n",
            base64.encodebytes(forged.dump()),
            b"-----END CERTIFICATE-----\n",
            ca.pem().encode(),
            root.pem().encode(),
            b"\0",
        ]
    )
    evidence = dataclasses.replace(quote, pck_chain=pem).to_bytes()
    verdict = verify(evidence, lab_policy(lab))
    assert not verdict.ok and verdict.codes == {"malformed"}
    assert any("negative serial" in reason.message for reason in verdict.reasons)


def test_collateral_signed_by_a_pck_key_is_refused(lab: LabAuthority) -> None:
    """A platform's PCK key may sign QE reports, not the TCB info and QE identity that judge them."""
    collateral = json.loads((lab.directory / "tdx-collateral.json").read_text())
    pck_key, chain = lab_key(lab, "intel-pck"), "".join(c.pem() for c in lab.intel_chain())
    for key in ("tcb_info", "qe_identity"):
        collateral[f"{key}_signature"] = raw_signature(pck_key, collateral[key].encode()).hex()
        collateral[f"{key}_issuer_chain"] = chain
    verdict = verify(lab.tdx_quote(bytes(64), mrtd=bytes(48)), lab_policy(lab), collateral=collateral)
    assert verdict.codes == {"collateral-mismatch"}
    assert verdict.fields() == {"collateral.tcb_info_issuer_chain", "collateral.qe_identity_issuer_chain"}
