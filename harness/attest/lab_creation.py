"""Making the lab CA: its keys and certificates on first use, the VCEKs per TCB, the TDX and SGX collateral
and their signing certificates, written with the modes a CA's files need."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from harness.attest import certs as certs_mod
from harness.attest.certs import LAB_ORGANIZATION, der_ia5string, der_integer, load_cert
from harness.attest.lab_certificates import (
    DEFAULT_TCB,
    LAB_EPOCH,
    LAB_FORMAT,
    MANIFEST,
    PCK_SGX,
    TCB_SIGNING,
    LabCertificates,
    read_cert,
    unusable,
)
from harness.attest.lab_collateral import (
    COLLATERAL_FILE,
    SGX_COLLATERAL_FILE,
    issue_collateral,
    sgx_extension,
)
from harness.attest.lab_quotes import (
    LAB_QE_MRSIGNER,
    LAB_TEE_TCB_SVN,
)
from harness.attest.snp import TcbVersion

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


# --- creation ---------------------------------------------------------------------------------------------
def write_file(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_key(directory: Path, name: str) -> Any:
    path = directory / f"{name}.key"
    try:
        return serialization.load_pem_private_key(
            path.read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
        )
    except (OSError, ValueError, TypeError) as exc:
        raise unusable(directory, f"{path.name} unreadable ({exc})") from None


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, LAB_ORGANIZATION),
        ]
    )


def _build(
    subject: str,
    issuer: x509.Name,
    public_key: Any,
    *,
    ca: bool,
    path_length: int | None,
    years: int,
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(LAB_EPOCH)
        .not_valid_after(now + dt.timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def issue_vcek(
    ask_key: rsa.RSAPrivateKey,
    ask: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    tcb: TcbVersion,
    chip_id: bytes,
) -> bytes:
    def amd(oid: str, value: bytes) -> x509.UnrecognizedExtension:
        return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)

    extensions = [
        amd("1.3.6.1.4.1.3704.1.1", der_integer(0)),
        amd(certs_mod.OID_AMD_PRODUCT_NAME, der_ia5string("Lab")),
        amd(certs_mod.OID_AMD_BL_SPL, der_integer(tcb.bootloader)),
        amd(certs_mod.OID_AMD_TEE_SPL, der_integer(tcb.tee)),
        amd(certs_mod.OID_AMD_SNP_SPL, der_integer(tcb.snp)),
        *(amd(f"1.3.6.1.4.1.3704.1.3.{n}", der_integer(0)) for n in (4, 5, 6, 7)),
        amd(certs_mod.OID_AMD_UCODE_SPL, der_integer(tcb.microcode)),
        amd(certs_mod.OID_AMD_HWID, chip_id),
    ]
    builder = _build(
        "SEV-VCEK", ask.subject, key.public_key(), ca=False, path_length=None, years=7, extensions=extensions
    )
    return _pem(builder.sign(ask_key, hashes.SHA384(), rsa_padding=_PSS))


def issue_tdx_material(directory: Path, keys: Mapping[str, Any], public: LabCertificates) -> None:
    """The PCK leaf with its SGX extension, a TCB signing certificate, and the lab TDX collateral they make
    (the collateral file last: its presence says the rest exists)."""
    root, pck_ca = public.certs["intel-root"].x509, public.certs["intel-pck-ca"].x509
    pck = _build(
        "teelab lab SGX PCK Certificate",
        pck_ca.subject,
        keys["intel-pck"].public_key(),
        ca=False,
        path_length=None,
        years=7,
        extensions=[sgx_extension()],
    ).sign(keys["intel-pck-ca"], hashes.SHA256())
    signing_key = ec.generate_private_key(ec.SECP256R1())
    signing = _build(
        "teelab lab SGX TCB Signing",
        root.subject,
        signing_key.public_key(),
        ca=False,
        path_length=None,
        years=7,
    ).sign(keys["intel-root"], hashes.SHA256())
    collateral = issue_collateral(
        root=(root, keys["intel-root"]),
        pck_ca=(pck_ca, keys["intel-pck-ca"]),
        tcb_signing=(signing, signing_key),
        qe_mrsigner=LAB_QE_MRSIGNER,
        tee_tcb_svn=LAB_TEE_TCB_SVN,
        issued=LAB_EPOCH,
        until=min(pck.not_valid_after_utc, signing.not_valid_after_utc),
    )
    key_pem = signing_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_file(directory / f"{TCB_SIGNING}.key", key_pem, 0o600)
    write_file(directory / f"{TCB_SIGNING}.pem", _pem(signing), 0o644)
    write_file(directory / f"{PCK_SGX}.pem", _pem(pck), 0o644)
    write_file(directory / COLLATERAL_FILE, json.dumps(collateral, indent=2).encode() + b"\n", 0o644)


def issue_sgx_collateral(directory: Path, keys: Mapping[str, Any], public: LabCertificates) -> None:
    """The lab SGX collateral (SGX TCB info, the SGX QE identity, the CRLs), signed like the TDX one by the
    TCB signing certificate the TDX material made."""
    signing = read_cert(directory, f"{TCB_SIGNING}.pem").x509
    pck = read_cert(directory, f"{PCK_SGX}.pem").x509
    collateral = issue_collateral(
        root=(public.certs["intel-root"].x509, keys["intel-root"]),
        pck_ca=(public.certs["intel-pck-ca"].x509, keys["intel-pck-ca"]),
        tcb_signing=(signing, read_key(directory, TCB_SIGNING)),
        qe_mrsigner=LAB_QE_MRSIGNER,
        tee_tcb_svn=None,
        issued=LAB_EPOCH,
        until=min(pck.not_valid_after_utc, signing.not_valid_after_utc),
    )
    write_file(directory / SGX_COLLATERAL_FILE, json.dumps(collateral, indent=2).encode() + b"\n", 0o644)


@dataclass(frozen=True)
class _Issue:
    """One certificate of the lab CA: its subject, who signs it (None: itself), and its shape."""

    subject: str
    issuer: str | None
    ca: bool
    path_length: int | None
    years: int
    digest: type[hashes.HashAlgorithm]
    pss: bool = False  # RSA-PSS signatures, as AMD's ARK and ASK carry


# In issuing order (an issuer comes before what it signs), keyed by the name of the key and certificate.
_CERTIFICATES = {
    "amd-ark": _Issue("ARK-Lab", None, True, None, 25, hashes.SHA384, pss=True),
    "amd-ask": _Issue("SEV-Lab", "amd-ark", True, 0, 25, hashes.SHA384, pss=True),
    "intel-root": _Issue("teelab lab SGX Root CA", None, True, 1, 25, hashes.SHA256),
    "intel-pck-ca": _Issue("teelab lab SGX PCK Platform CA", "intel-root", True, 0, 15, hashes.SHA256),
    "intel-pck": _Issue("teelab lab SGX PCK Certificate", "intel-pck-ca", False, None, 7, hashes.SHA256),
    "enclave-root": _Issue("teelab lab enclave root", None, True, None, 25, hashes.SHA384),
    "enclave-ca": _Issue("teelab lab enclave intermediate", "enclave-root", True, 0, 15, hashes.SHA384),
    "enclave-leaf": _Issue("teelab lab enclave leaf", "enclave-ca", False, None, 10, hashes.SHA384),
}


def create_authority(directory: Path) -> None:
    """Generate every key and certificate; the manifest is written last, so a crash leaves no half CA."""
    keys: dict[str, Any] = {
        "amd-ark": rsa.generate_private_key(65537, 4096),
        "amd-ask": rsa.generate_private_key(65537, 4096),
        "intel-root": ec.generate_private_key(ec.SECP256R1()),
        "intel-pck-ca": ec.generate_private_key(ec.SECP256R1()),
        "intel-pck": ec.generate_private_key(ec.SECP256R1()),
        "intel-qe-ak": ec.generate_private_key(ec.SECP256R1()),
        "enclave-root": ec.generate_private_key(ec.SECP384R1()),
        "enclave-ca": ec.generate_private_key(ec.SECP384R1()),
        "enclave-leaf": ec.generate_private_key(ec.SECP384R1()),
    }
    made: dict[str, x509.Certificate] = {}
    for name, cert in _CERTIFICATES.items():
        issuer_name = _name(cert.subject) if cert.issuer is None else made[cert.issuer].subject
        builder = _build(
            cert.subject, issuer_name, keys[name].public_key(), ca=cert.ca, path_length=cert.path_length,
            years=cert.years,
        )  # fmt: skip
        signer = keys[name if cert.issuer is None else cert.issuer]
        made[name] = builder.sign(signer, cert.digest(), rsa_padding=_PSS if cert.pss else None)
    _write_authority(directory, keys, made)


def _write_authority(directory: Path, keys: dict[str, Any], made: dict[str, x509.Certificate]) -> None:
    chip_seed = os.urandom(32)
    chip_id = hashlib.sha512(b"teelab lab chip id" + chip_seed).digest()
    for name, key in keys.items():
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_file(directory / f"{name}.key", pem, 0o600)
    write_file(directory / "amd-chip-seed.key", chip_seed, 0o600)
    for name, cert in made.items():
        write_file(directory / f"{name}.pem", _pem(cert), 0o644)
    manifest = {
        "format": LAB_FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "chip_id": chip_id.hex(),
        "tcb": DEFAULT_TCB.to_bytes().hex(),
        "certs": {
            name: load_cert(cert.public_bytes(serialization.Encoding.DER)).fingerprint
            for name, cert in made.items()
        },
    }
    write_file(directory / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n", 0o644)
