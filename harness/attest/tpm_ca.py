"""The lab's TPM authorities, beside the lab CA: a TPM root, the TPM manufacturer CA that signs vTPMs' EK
certificates (through swtpm's own ``swtpm_localca``) and the attestation-key CA that certifies an AK once it
has proved, by credential activation, that it lives in the TPM of a certified EK (what Azure's AIK service
does for its vTPMs).

Files, in ``<lab CA>/tpm/``: ``tpm-root``, ``tpm-manufacturer`` and ``tpm-ak-ca`` as ``.pem`` and ``.key``
(keys 0600), and ``swtpm_localca``'s serial and lock files.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import paths
from harness.attest.certs import Anchor, Cert, load_cert
from harness.attest.errors import LabAuthorityError

TPM_DIR = "tpm"
ROOT, MANUFACTURER, AK_CA = "tpm-root", "tpm-manufacturer", "tpm-ak-ca"
NAMES = (ROOT, MANUFACTURER, AK_CA)
ORG = "teelab lab TPM authority (not a vendor)"
EPOCH = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
# An AK certificate names the EK certificate it was activated against (SHA-256 of its DER) and the AK's TPM
# name; OIDs under the UUID arc (2.25), as this lab has no enterprise number.
EK_BINDING_OID = x509.ObjectIdentifier("2.25.284199512170145183335893094440851355397")
AK_NAME_OID = x509.ObjectIdentifier("2.25.284199512170145183335893094440851355398")
TCG_AK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.3")  # tcg-kp-AIKCertificate


def default_tpm_dir() -> Path:
    """``tpm`` beside the lab CA's files (``<state dir>/lab-ca/tpm``)."""
    return paths.state_dir() / "lab-ca" / TPM_DIR


@dataclass(frozen=True)
class AkBinding:
    """What an AK certificate says: the EK certificate's SHA-256 and the AK's TPM name."""

    ek_fingerprint: bytes
    ak_name: bytes


class TpmAuthority:
    """The lab TPM root and its two CAs; ``load_or_create`` makes them once (under a file lock)."""

    def __init__(self, directory: Path, certs: dict[str, Cert], keys: dict[str, ec.EllipticCurvePrivateKey]):
        self.directory = directory
        self.certs = certs
        self._keys = keys

    @classmethod
    def load_or_create(cls, directory: Path | str | None = None) -> TpmAuthority:
        directory = Path(directory or default_tpm_dir()).absolute()
        if not (directory / f"{AK_CA}.pem").exists():
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            with paths.exclusive_lock(directory / ".lock"):
                if not (directory / f"{AK_CA}.pem").exists():
                    _create(directory)
        certs = load_tpm_certificates(directory)
        if certs is None:
            raise LabAuthorityError(
                f"no lab TPM authority in {directory}", hint="remove the folder to remake it"
            )
        keys = {name: _read_key(directory, name) for name in NAMES}
        return cls(directory, certs, keys)

    def anchor(self) -> Anchor:
        return Anchor("lab", "tpm", self.certs[ROOT])

    def signing_key_path(self) -> Path:
        """The manufacturer CA's key, which ``swtpm_localca`` signs EK certificates with."""
        return self.directory / f"{MANUFACTURER}.key"

    def issue_ak_certificate(
        self, ak_public: ec.EllipticCurvePublicKey, ek_cert: Cert, ak_name: bytes
    ) -> Cert:
        """Certify an AK that answered a credential made for ``ek_cert``'s key and ``ak_name``."""
        issuer = self.certs[AK_CA].x509
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"AK {ak_name.hex()[:16]}"))
            .issuer_name(issuer.subject)
            .public_key(ak_public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([TCG_AK_CERTIFICATE]), critical=False)
            .add_extension(
                x509.UnrecognizedExtension(EK_BINDING_OID, bytes.fromhex(ek_cert.fingerprint)), critical=False
            )
            .add_extension(x509.UnrecognizedExtension(AK_NAME_OID, ak_name), critical=False)
        )
        cert = builder.sign(self._keys[AK_CA], hashes.SHA256())
        return load_cert(cert.public_bytes(serialization.Encoding.DER), field="ak_certificate")


def ak_binding(cert: Cert) -> AkBinding | None:
    """The EK and AK name an AK certificate binds, or None when it carries neither extension."""
    try:
        ek = cert.x509.extensions.get_extension_for_oid(EK_BINDING_OID).value
        name = cert.x509.extensions.get_extension_for_oid(AK_NAME_OID).value
    except x509.ExtensionNotFound:
        return None
    return AkBinding(bytes(ek.value), bytes(name.value))  # type: ignore[attr-defined]


def load_tpm_certificates(directory: Path | str | None = None) -> dict[str, Cert] | None:
    """The TPM root and CAs of a lab (public parts only), or None when there is none yet."""
    directory = Path(directory or default_tpm_dir())
    try:
        return {name: load_cert(_pem_to_der((directory / f"{name}.pem").read_bytes())) for name in NAMES}
    except FileNotFoundError:
        return None


def tpm_anchor(directory: Path | str | None = None) -> Anchor | None:
    certs = load_tpm_certificates(directory)
    return None if certs is None else Anchor("lab", "tpm", certs[ROOT])


def _pem_to_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
        ]
    )


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _create(directory: Path) -> None:
    """Make the three keys and certificates; the AK CA's certificate is written last (it marks completion)."""
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in NAMES}
    subjects = {
        ROOT: "teelab lab TPM root",
        MANUFACTURER: "teelab lab TPM manufacturer CA",
        AK_CA: "teelab lab AK CA",
    }
    made: dict[str, x509.Certificate] = {}
    for name in NAMES:
        issuer = ROOT if name != ROOT else name
        issuer_name = _name(subjects[issuer])
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(subjects[name]))
            .issuer_name(issuer_name)
            .public_key(keys[name].public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(EPOCH)
            .not_valid_after(dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=365 * 20))
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None if name == ROOT else 0), critical=True
            )
            .add_extension(_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(keys[name].public_key()), critical=False)
            .sign(keys[issuer], hashes.SHA256())
        )
        made[name] = cert
    for name in NAMES:
        pem = keys[name].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write(directory / f"{name}.key", pem, 0o600)
    for name in NAMES:
        _write(directory / f"{name}.pem", made[name].public_bytes(serialization.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_key(directory: Path, name: str) -> ec.EllipticCurvePrivateKey:
    path = directory / f"{name}.key"
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise LabAuthorityError(f"lab TPM authority key {path} unreadable ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise LabAuthorityError(f"lab TPM authority key {path} is not an EC key")
    return key
