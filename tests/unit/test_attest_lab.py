"""The lab CA: created once per directory (also under a race), persisted with private keys 0600, and its
chains and evidence checkable with plain cryptography, not only with teelab's verifier."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from harness import paths
from harness.attest import (
    LabAuthority,
    Policy,
    parse_snp_cert_table,
    parse_snp_report,
    parse_tdx_quote,
    verify,
)
from harness.attest.errors import IssueError, LabAuthorityError
from harness.attest.lab_certificates import CERT_NAMES, KEY_NAMES, load_lab_certificates

PRINT_CA = (
    "import sys, json; from harness.attest import LabAuthority; "
    "lab = LabAuthority.load_or_create(sys.argv[1]); "
    "print(json.dumps({n: c.fingerprint for n, c in lab.public.certs.items()} | {'chip': lab.chip_id.hex()}))"
)


@pytest.fixture(scope="session")
def lab() -> LabAuthority:
    return LabAuthority.load_or_create(paths.state_dir() / "lab-ca")


def fingerprints(lab: LabAuthority) -> dict[str, str]:
    return {n: c.fingerprint for n, c in lab.public.certs.items()} | {"chip": lab.chip_id.hex()}


def test_two_processes_racing_on_first_creation_agree_and_later_loads_see_the_same_ca(tmp_path: Path) -> None:
    directory = tmp_path / "lab-ca"
    racers = [
        subprocess.Popen([sys.executable, "-c", PRINT_CA, str(directory)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [json.loads(p.communicate(timeout=120)[0]) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    assert outputs[0] == outputs[1]
    assert fingerprints(LabAuthority.load_or_create(directory)) == outputs[0]
    assert fingerprints(LabAuthority.load(directory)) == outputs[0]


def test_private_keys_are_0600_in_a_0700_directory(lab: LabAuthority) -> None:
    assert stat.S_IMODE(lab.directory.stat().st_mode) == 0o700
    for name in KEY_NAMES:
        assert stat.S_IMODE((lab.directory / f"{name}.key").stat().st_mode) == 0o600, name
    assert stat.S_IMODE((lab.directory / "amd-chip-seed.key").stat().st_mode) == 0o600


def test_a_damaged_lab_ca_is_refused_with_a_hint(tmp_path: Path, lab: LabAuthority) -> None:
    damaged = tmp_path / "lab-ca"
    damaged.mkdir()
    for path in lab.directory.iterdir():
        if path.is_file():
            (damaged / path.name).write_bytes(path.read_bytes())
    (damaged / "intel-pck.pem").write_bytes((damaged / "enclave-leaf.pem").read_bytes())
    with pytest.raises(LabAuthorityError, match=r"intel-pck\.pem does not match") as err:
        LabAuthority.load(damaged)
    assert err.value.hint and "remove" in err.value.hint


def _vcek_pem(lab: LabAuthority) -> str:
    return f"amd-vcek-{lab.tcb.to_bytes().hex()}.pem"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d, lab: (d / "authority.json").write_text("[1]"), "not a JSON object"),
        (lambda d, lab: _edit_manifest(d, certs=None), "incomplete"),
        (lambda d, lab: _edit_manifest(d, chip_id=None), "incomplete"),
        (lambda d, lab: _edit_manifest(d, tcb="zz"), "incomplete"),
        (lambda d, lab: _edit_manifest(d, tcb="00"), "TCB of 1 bytes"),
        (lambda d, lab: (d / "amd-ark.pem").write_text("junk"), "amd-ark.pem"),
        (lambda d, lab: (d / _vcek_pem(lab)).write_text(""), "amd-vcek-"),
    ],
)
def test_a_damaged_lab_ca_stops_verification_with_e820_not_a_crash(
    tmp_path: Path, lab: LabAuthority, damage: Callable[[Path, LabAuthority], object], message: str
) -> None:
    damaged = tmp_path / "lab-ca"
    damaged.mkdir()
    for path in lab.directory.iterdir():
        if path.is_file():
            (damaged / path.name).write_bytes(path.read_bytes())
    damage(damaged, lab)
    report = lab.snp_report(bytes(64), measurement=bytes(48))
    with pytest.raises(LabAuthorityError, match=message) as err:
        verify(report, Policy(roots=("lab",), lab_dir=damaged))
    assert err.value.code == "E820" and "remove" in (err.value.hint or "")


def _edit_manifest(directory: Path, **changes: object) -> None:
    manifest = json.loads((directory / "authority.json").read_text())
    for key, value in changes.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    (directory / "authority.json").write_text(json.dumps(manifest))


def test_lab_certificates_are_cached_per_directory_not_per_relative_path(
    tmp_path: Path, lab: LabAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied, other = tmp_path / "a" / "lab-ca", tmp_path / "b" / "lab-ca"
    copied.mkdir(parents=True)
    for path in lab.directory.iterdir():
        if path.is_file():
            (copied / path.name).write_bytes(path.read_bytes())
    other_ark = LabAuthority.load_or_create(other).public.certs["amd-ark"].fingerprint
    stamp = (copied / "authority.json").stat().st_mtime_ns
    os.utime(other / "authority.json", ns=(stamp, stamp))  # as a copy that kept its times would have

    def ark_of_lab_ca_here() -> str:
        public = load_lab_certificates("lab-ca")
        assert public is not None
        return public.certs["amd-ark"].fingerprint

    monkeypatch.chdir(copied.parent)
    assert ark_of_lab_ca_here() != other_ark
    monkeypatch.chdir(other.parent)
    assert ark_of_lab_ca_here() == other_ark


def test_the_amd_chain_is_ark_ask_vcek_with_rsa_pss_and_the_vcek_carries_tcb_and_hwid(
    lab: LabAuthority,
) -> None:
    vcek, ask, ark = (c.x509 for c in lab.amd_chain())
    for child, parent in ((vcek, ask), (ask, ark), (ark, ark)):
        child.verify_directly_issued_by(parent)
        assert child.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS
    assert (
        isinstance(vcek.public_key(), ec.EllipticCurvePublicKey)
        and vcek.public_key().curve.name == "secp384r1"
    )
    extensions = {
        e.oid.dotted_string: e.value.value
        for e in vcek.extensions
        if e.oid.dotted_string.startswith("1.3.6.1.4.1.3704")
    }
    assert extensions["1.3.6.1.4.1.3704.1.4"] == lab.chip_id
    tcb = lab.tcb
    for oid, value in (("3.1", tcb.bootloader), ("3.2", tcb.tee), ("3.3", tcb.snp), ("3.8", tcb.microcode)):
        raw = extensions[f"1.3.6.1.4.1.3704.1.{oid}"]
        assert raw[0] == 0x02 and int.from_bytes(raw[2:], "big") == value
    assert ask.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_lab_snp_report_verifies_with_plain_cryptography(lab: LabAuthority) -> None:
    data = lab.snp_report(b"\x01" * 64, measurement=b"\x02" * 48)
    report = parse_snp_report(data)
    r, s = report.signature
    lab.vcek().x509.public_key().verify(encode_dss_signature(r, s), data[:0x2A0], ec.ECDSA(hashes.SHA384()))
    assert report.chip_id == lab.chip_id and report.reported_tcb == lab.tcb
    assert len(data) == 1184 and report.measurement == b"\x02" * 48 and report.signing_key == "vcek"


def test_a_lab_tdx_quote_is_signed_and_certified_like_intels(lab: LabAuthority) -> None:
    import hashlib

    data = lab.tdx_quote(b"\x03" * 64, mrtd=b"\x04" * 48, rtmrs=[b"\x05" * 48])
    quote = parse_tdx_quote(data)
    assert (quote.version, quote.header.att_key_type, quote.header.tee_type) == (4, 2, 0x81)
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + quote.attestation_key)
    signature = quote.signature
    key.verify(
        encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")),
        data[:0x278],
        ec.ECDSA(hashes.SHA256()),
    )
    chain = x509.load_pem_x509_certificates(quote.pck_chain_pem)
    assert [c.fingerprint(hashes.SHA256()).hex() for c in chain] == [c.fingerprint for c in lab.intel_chain()]
    qe_sig = quote.qe_report_signature
    chain[0].public_key().verify(
        encode_dss_signature(int.from_bytes(qe_sig[:32], "big"), int.from_bytes(qe_sig[32:], "big")),
        quote.qe_report.to_bytes(),
        ec.ECDSA(hashes.SHA256()),
    )
    assert (
        quote.qe_report.report_data[:32]
        == hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest()
    )
    assert (
        quote.pck_chain.endswith(b"\0") and quote.body.rtmr0 == b"\x05" * 48 and quote.body.rtmr1 == bytes(48)
    )


def test_a_lab_attestation_document_is_a_cose_sign1_a_nitro_verifier_would_parse(lab: LabAuthority) -> None:
    data = lab.attestation_document(
        pcrs={0: b"\x06" * 48},
        public_key=b"pk",
        user_data=None,
        nonce=b"n",
        module_id="i-lab-enc",
        timestamp_ms=1_700_000_000_000,
    )
    protected, unprotected, payload, signature = cbor2.loads(data)
    assert cbor2.loads(protected) == {1: -35} and unprotected == {} and len(signature) == 96
    body = cbor2.loads(payload)
    assert list(body) == [
        "module_id",
        "digest",
        "timestamp",
        "pcrs",
        "certificate",
        "cabundle",
        "public_key",
        "user_data",
        "nonce",
    ]
    assert (body["digest"], body["timestamp"], body["user_data"], body["nonce"]) == (
        "SHA384",
        1_700_000_000_000,
        None,
        b"n",
    )
    leaf = x509.load_der_x509_certificate(body["certificate"])
    root, intermediate = (x509.load_der_x509_certificate(d) for d in body["cabundle"])
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    leaf.public_key().verify(
        encode_dss_signature(int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")),
        to_sign,
        ec.ECDSA(hashes.SHA384()),
    )


def test_certificates_are_exported_as_pem_and_the_snp_cert_table_carries_the_amd_chain(
    lab: LabAuthority,
) -> None:
    pems = lab.certificates_pem()
    assert set(pems) == {*CERT_NAMES, "amd-vcek"}
    assert all(p.startswith("-----BEGIN CERTIFICATE-----") for p in pems.values())
    table = dict(parse_snp_cert_table(lab.snp_cert_table()))
    assert [table["vcek"], table["ask"], table["ark"]] == [c.der for c in lab.amd_chain()]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda lab: lab.snp_report(b"short", measurement=bytes(48)), "report_data"),
        (lambda lab: lab.snp_report(bytes(64), measurement=bytes(47)), "measurement"),
        (lambda lab: lab.snp_report(bytes(64), measurement=bytes(48), vmpl=4), "vmpl"),
        (lambda lab: lab.snp_report(bytes(64), measurement=bytes(48), tcb={"snp": 300}), "tcb"),
        (lambda lab: lab.tdx_quote(bytes(64), mrtd=bytes(48), rtmrs=[bytes(48)] * 5), "rtmrs"),
        (lambda lab: lab.tdx_quote(bytes(64), mrtd=bytes(48), td_attributes=-1), "td_attributes"),
        (
            lambda lab: lab.attestation_document(
                pcrs={32: bytes(48)}, public_key=None, user_data=None, nonce=None, module_id="m"
            ),
            "pcrs",
        ),
        (
            lambda lab: lab.attestation_document(
                pcrs={0: bytes(48)}, public_key=None, user_data=bytes(1025), nonce=None, module_id="m"
            ),
            "user_data",
        ),
    ],
)
def test_issuers_refuse_bad_arguments_naming_the_field(lab: LabAuthority, call, field: str) -> None:
    with pytest.raises(IssueError) as err:
        call(lab)
    assert err.value.evidence["field"] == field and err.value.code == "E821"
