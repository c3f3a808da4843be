"""A lab TLS certificate for the KMS: a lab CA and a server certificate for localhost and the guests' KMS
name, kept in the KMS dir; the CA's pin that guests take from their measured kernel command line."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from teelab_guest.kms_client import KMS_HOSTNAME, PIN_ALGORITHM


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teelab"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _names_current(cert_pem: Path) -> bool:
    """Whether the server certificate names the guests' KMS host (certificates made before it did not)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    except ValueError:
        return True  # damaged: loading it fails with its own error rather than have it replaced silently
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return KMS_HOSTNAME in names.get_values_for_type(x509.DNSName)


def ensure_certificate(kms_dir: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) under ``kms_dir/tls``, made on first use (and made
    anew when the server certificate predates the guests' KMS name). The CA key is never stored: nothing
    can issue another certificate under this CA."""
    tls = kms_dir / "tls"
    ca_pem, cert_pem, key_pem = tls / "ca.pem", tls / "server.pem", tls / "server.key"
    if ca_pem.exists() and cert_pem.exists() and key_pem.exists() and _names_current(cert_pem):
        return ca_pem, cert_pem, key_pem
    tls.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    # P-256 throughout: OpenSSL verifies it several times faster than P-384, which a guest's handshake under
    # emulation feels (about 10 ms of each new connection).
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("teelab KMS lab CA"))
        .issuer_name(_name("teelab KMS lab CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [
        x509.DNSName("localhost"),
        x509.DNSName(KMS_HOSTNAME),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(KMS_HOSTNAME))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    fd = os.open(key_pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_pem, cert_pem, key_pem


def server_context(kms_dir: Path) -> ssl.SSLContext:
    _, cert_pem, key_pem = ensure_certificate(kms_dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_pem, key_pem)
    return context


def ca_certificate_pem(kms_dir: Path) -> str:
    """The CA certificate, PEM: what a host hands a guest, which trusts it only if it matches its pin."""
    return ensure_certificate(kms_dir)[0].read_text()


def ca_pin(kms_dir: Path) -> str:
    """``sha256:<hex>`` of the CA certificate's DER: ``teelab.kms_ca=`` on a guest's command line."""
    der = ssl.PEM_cert_to_DER_cert(ca_certificate_pem(kms_dir))
    return f"{PIN_ALGORITHM}:{hashlib.sha256(der).hexdigest()}"


def client_context(kms_dir: Path) -> ssl.SSLContext:
    """What a host-side client verifies the KMS with: this dir's lab CA alone."""
    return ssl.create_default_context(cafile=ensure_certificate(kms_dir)[0])
