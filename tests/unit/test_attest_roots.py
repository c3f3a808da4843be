"""The vendor roots shipped with teelab are the genuine ones: pinned SHA-256, self-signed, and they sign the
shipped intermediates."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

import harness.attest
from harness.attest.roots import ROOT_NAMES, VENDOR_ROOTS, vendor_anchors, vendor_intermediates

DATA = Path(harness.attest.__file__).parent / "data"
# SHA-256 of the DER, as published by the vendors and found byte-identical in independent public copies.
GENUINE = {
    "amd-milan-ark.pem": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "amd-milan-ask.pem": "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
    "amd-milan-asvk.pem": "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
    "amd-genoa-ark.pem": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "amd-genoa-ask.pem": "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
    "amd-genoa-asvk.pem": "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
    "intel-sgx-root-ca.pem": "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3",
    "aws-nitro-root-g1.pem": "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b",
}


def load(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((DATA / name).read_bytes())


def test_every_shipped_certificate_has_its_genuine_fingerprint() -> None:
    assert {p.name for p in DATA.glob("*.pem")} == set(GENUINE)
    for name, sha256 in GENUINE.items():
        assert hashlib.sha256(load(name).public_bytes(Encoding.DER)).hexdigest() == sha256, name


def test_roots_are_self_signed_and_sign_their_intermediates() -> None:
    for vendor in ("amd-milan", "amd-genoa"):
        ark = load(f"{vendor}-ark.pem")
        ark.verify_directly_issued_by(ark)
        load(f"{vendor}-ask.pem").verify_directly_issued_by(ark)
        load(f"{vendor}-asvk.pem").verify_directly_issued_by(ark)
    for name in ("intel-sgx-root-ca.pem", "aws-nitro-root-g1.pem"):
        load(name).verify_directly_issued_by(load(name))


def test_the_named_roots_are_the_shipped_files() -> None:
    assert ROOT_NAMES == ("amd-milan", "amd-genoa", "intel-sgx", "aws-nitro", "lab")
    for root, anchor in zip(VENDOR_ROOTS, vendor_anchors(), strict=True):
        assert (anchor.name, anchor.kind, anchor.cert.fingerprint) == (
            root.name,
            root.kind,
            GENUINE[root.file],
        )
    assert {c.fingerprint for c in vendor_intermediates()} == {
        GENUINE[n] for n in GENUINE if n.endswith(("ask.pem", "asvk.pem"))
    }
