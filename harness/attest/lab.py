"""The lab CA: persistent AMD-, Intel- and enclave-shaped certificate chains, and the issuers of lab evidence
(SNP reports, TDX and SGX quotes, attestation documents) in the vendors' exact wire formats."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from harness import paths
from harness.attest import certs as certs_mod
from harness.attest.certs import Anchor, Cert, der_ia5string, der_integer, load_cert, load_pem_certs
from harness.attest.errors import EvidenceError, IssueError, LabAuthorityError
from harness.attest.lab_collateral import (
    COLLATERAL_FILE,
    SGX_COLLATERAL_FILE,
    issue_collateral,
    sgx_extension,
)
from harness.attest.lab_quotes import (
    LAB_QE_MRSIGNER,
    LAB_TEE_TCB_SVN,
    QuoteIssuer,
    check_len,
    check_range,
    raw_signature,
)
from harness.attest.nitro import ALG_ES384, encode_cose_sign1, encode_payload, sig_structure
from harness.attest.snp import SIGNED_SIZE, TcbVersion, build_snp_report, write_snp_cert_table

LAB_FORMAT = 1
MANIFEST = "authority.json"
LOCK_FILE = ".lock"
DEFAULT_TCB = TcbVersion(bootloader=4, tee=0, snp=22, microcode=213)
# Lab certificates are valid from this date, so evidence pinned to earlier test times still verifies.
LAB_EPOCH = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
LAB_ORG = "teelab lab CA (not a vendor)"
_P384_ORDER = (
    0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
# The certificates, in the order a person would read them; keys carry the same names.
CERT_NAMES = (
    "amd-ark",
    "amd-ask",
    "intel-root",
    "intel-pck-ca",
    "intel-pck",
    "enclave-root",
    "enclave-ca",
    "enclave-leaf",
)
KEY_NAMES = (*CERT_NAMES, "intel-qe-ak")
# Issued on first load (so lab CAs made before TDX collateral existed get them too): the PCK leaf with its SGX
# extension, which lab quotes carry, and the TCB signing certificate of the lab collateral.
PCK_SGX = "intel-pck-sgx"
TCB_SIGNING = "intel-tcb-signing"


def default_lab_dir() -> Path:
    """Where the lab CA lives unless told otherwise: ``lab-ca`` under the state dir."""
    return paths.state_dir() / "lab-ca"


# --- public material: what a verifier needs ---------------------------------------------------------------
@dataclass(frozen=True)
class LabCertificates:
    """The lab CA's certificates and chip facts, read from its directory (never its keys)."""

    directory: Path
    certs: Mapping[str, Cert]
    chip_id: bytes
    tcb: TcbVersion
    _vceks: dict[TcbVersion, Cert] = field(default_factory=dict, compare=False, repr=False)

    def anchors(self) -> tuple[Anchor, ...]:
        return (
            Anchor("lab", "snp", self.certs["amd-ark"]),
            Anchor("lab", "tdx", self.certs["intel-root"]),
            Anchor("lab", "nitro", self.certs["enclave-root"]),
        )

    def intermediates(self) -> tuple[Cert, ...]:
        return (self.certs["amd-ask"], self.certs["intel-pck-ca"], self.certs["enclave-ca"])

    def tdx_collateral(self) -> dict[str, Any] | None:
        """The lab's TDX collateral (PCS JSON shape) for lab quotes, once a LabAuthority has issued it."""
        return self._collateral(COLLATERAL_FILE)

    def sgx_collateral(self) -> dict[str, Any] | None:
        """The lab's SGX collateral (SGX TCB info, the QE identity) for lab SGX quotes, once issued."""
        return self._collateral(SGX_COLLATERAL_FILE)

    def _collateral(self, file: str) -> dict[str, Any] | None:
        try:
            text = (self.directory / file).read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _unusable(self.directory, f"{file} unreadable ({exc})") from None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise _unusable(self.directory, f"{file} is not JSON ({exc})") from None
        return value if isinstance(value, dict) else None

    def vcek(self, tcb: TcbVersion) -> Cert | None:
        """The lab VCEK for ``tcb``, if the lab has issued one (one per TCB, as AMD's KDS does)."""
        cached = self._vceks.get(tcb)
        if cached is None:
            try:
                cached = _read_cert(self.directory, _vcek_file(tcb))
            except FileNotFoundError:
                return None
            self._vceks[tcb] = cached
        return cached


def _vcek_file(tcb: TcbVersion) -> str:
    return f"amd-vcek-{tcb.to_bytes().hex()}.pem"


def _unusable(directory: Path, problem: str) -> LabAuthorityError:
    hint = f"remove {directory} to make a new lab CA"
    return LabAuthorityError(f"lab CA in {directory}: {problem}", hint=hint)


def _read_cert(directory: Path, file: str) -> Cert:
    """The certificate in a PEM file of the lab CA: FileNotFoundError if it is absent, E820 if unusable."""
    try:
        certs = load_pem_certs((directory / file).read_bytes(), field=file)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _unusable(directory, f"{file} unreadable ({exc})") from None
    except EvidenceError as err:
        raise _unusable(directory, err.message) from None
    if not certs:
        raise _unusable(directory, f"{file} holds no certificate")
    return certs[0]


_public_cache: dict[Path, tuple[tuple[int, int, int], LabCertificates]] = {}


def load_lab_certificates(directory: Path | str) -> LabCertificates | None:
    """The lab CA in ``directory``, or None if none was created there (cached by absolute path until its
    manifest is replaced or changes)."""
    directory = Path(directory).absolute()
    try:
        info = (directory / MANIFEST).stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise _unusable(directory, f"{MANIFEST} unreadable ({exc})") from None
    stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
    cached = _public_cache.get(directory)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    manifest = _read_manifest(directory)
    try:
        fingerprints = dict(manifest["certs"])
        chip_id = bytes.fromhex(manifest["chip_id"])
        tcb = bytes.fromhex(manifest["tcb"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _unusable(directory, f"{MANIFEST} is incomplete ({type(exc).__name__}: {exc})") from None
    if len(tcb) != 8:
        raise _unusable(directory, f"{MANIFEST} has a TCB of {len(tcb)} bytes, not 8")
    loaded = {}
    for name in CERT_NAMES:
        try:
            cert = _read_cert(directory, f"{name}.pem")
        except FileNotFoundError as exc:
            raise _unusable(directory, f"lacks {name}.pem ({exc})") from None
        if cert.fingerprint != fingerprints.get(name):
            raise _unusable(directory, f"{name}.pem does not match {MANIFEST}")
        loaded[name] = cert
    public = LabCertificates(
        directory=directory, certs=loaded, chip_id=chip_id, tcb=TcbVersion.from_bytes(tcb)
    )
    _public_cache[directory] = (stamp, public)
    return public


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise _unusable(directory, f"{MANIFEST} unreadable ({exc})") from None
    if not isinstance(manifest, dict):
        raise _unusable(directory, f"{MANIFEST} is not a JSON object")
    if manifest.get("format") != LAB_FORMAT:
        raise _unusable(directory, f"format {manifest.get('format')!r}, this teelab uses {LAB_FORMAT}")
    return manifest


# --- the authority: keys and issuers ----------------------------------------------------------------------
class LabAuthority(QuoteIssuer):
    """A lab CA with its keys; get one with ``LabAuthority.load_or_create(directory)``. Thread-safe."""

    def __init__(self, public: LabCertificates, keys: Mapping[str, Any], chip_seed: bytes) -> None:
        self.public = public
        self.directory = public.directory
        self.chip_id = public.chip_id
        self.tcb = public.tcb
        self._keys = dict(keys)
        self._chip_seed = chip_seed
        self._vcek_keys: dict[TcbVersion, ec.EllipticCurvePrivateKey] = {}
        self._lock = threading.Lock()
        self._init_quote_tails()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_or_create(cls, directory: Path | str) -> LabAuthority:
        """Load the lab CA in ``directory``, creating it first if absent. Creation happens once, under a file
        lock, so processes racing on first use agree on one CA; keys are written 0600."""
        directory = Path(directory).absolute()
        cached = _authorities.get(directory)
        if cached is not None and load_lab_certificates(directory) is cached.public:
            return cached
        if not (directory / MANIFEST).exists():
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(directory, 0o700)
            with paths.exclusive_lock(directory / LOCK_FILE):
                if not (directory / MANIFEST).exists():
                    _create(directory)
        return cls.load(directory)

    @classmethod
    def load(cls, directory: Path | str) -> LabAuthority:
        directory = Path(directory).absolute()
        public = load_lab_certificates(directory)
        if public is None:
            raise LabAuthorityError(
                f"no lab CA in {directory}", hint="create one with LabAuthority.load_or_create"
            )
        keys = {name: _read_key(directory, name) for name in KEY_NAMES}
        for name in CERT_NAMES:
            if keys[name].public_key().public_bytes(*_SPKI) != public.certs[
                name
            ].x509.public_key().public_bytes(*_SPKI):
                raise _unusable(directory, f"{name}.key does not match {name}.pem")
        try:
            seed = (directory / "amd-chip-seed.key").read_bytes()
        except OSError as exc:
            raise _unusable(directory, f"lacks its chip seed ({exc})") from None
        if not (directory / COLLATERAL_FILE).exists():
            with paths.exclusive_lock(directory / LOCK_FILE):
                if not (directory / COLLATERAL_FILE).exists():
                    _issue_tdx_material(directory, keys, public)
        if not (directory / SGX_COLLATERAL_FILE).exists():
            with paths.exclusive_lock(directory / LOCK_FILE):
                if not (directory / SGX_COLLATERAL_FILE).exists():
                    _issue_sgx_collateral(directory, keys, public)
        authority = cls(public, keys, seed)
        authority.vcek()  # the VCEK of the lab's own TCB always exists
        _authorities[directory] = authority
        return authority

    # ------------------------------------------------------------------ certificates
    def certificates_pem(self) -> dict[str, str]:
        """Every lab certificate as PEM by name (amd-ark ... enclave-leaf, and amd-vcek for the lab TCB)."""
        out = {name: self.public.certs[name].pem() for name in CERT_NAMES}
        out["amd-vcek"] = self.vcek().pem()
        return out

    def anchors(self) -> tuple[Anchor, ...]:
        return self.public.anchors()

    def amd_chain(self, tcb: TcbVersion | None = None) -> tuple[Cert, Cert, Cert]:
        """(VCEK, ASK, ARK) for ``tcb`` (default: the lab's TCB)."""
        return self.vcek(tcb), self.public.certs["amd-ask"], self.public.certs["amd-ark"]

    def intel_chain(self) -> tuple[Cert, Cert, Cert]:
        """(PCK leaf with its SGX extension, PCK platform CA, root): the chain lab quotes carry."""
        c = self.public.certs
        return _read_cert(self.directory, f"{PCK_SGX}.pem"), c["intel-pck-ca"], c["intel-root"]

    def enclave_chain(self) -> tuple[Cert, Cert, Cert]:
        """(leaf, intermediate, root) of attestation documents."""
        c = self.public.certs
        return c["enclave-leaf"], c["enclave-ca"], c["enclave-root"]

    def snp_cert_table(self, tcb: TcbVersion | Mapping[str, int] | None = None) -> bytes:
        """The GHCB certificate table (VCEK, ASK, ARK) a guest gets beside its report (the auxblob)."""
        vcek, ask, ark = self.amd_chain(None if tcb is None else TcbVersion.from_value(tcb))
        return write_snp_cert_table([("vcek", vcek.der), ("ask", ask.der), ("ark", ark.der)])

    def vcek(self, tcb: TcbVersion | None = None) -> Cert:
        """The VCEK certificate for ``tcb``; issued (and persisted) the first time a TCB is used."""
        tcb = tcb or self.tcb
        existing = self.public.vcek(tcb)
        if existing is not None:
            return existing
        with self._lock, paths.exclusive_lock(self.directory / LOCK_FILE):
            existing = self.public.vcek(tcb)
            if existing is None:
                pem = _issue_vcek(
                    self._keys["amd-ask"],
                    self.public.certs["amd-ask"].x509,
                    self._vcek_key(tcb),
                    tcb,
                    self.chip_id,
                )
                _write(self.directory / _vcek_file(tcb), pem, 0o644)
                existing = self.public.vcek(tcb)
        assert existing is not None
        return existing

    def _vcek_key(self, tcb: TcbVersion) -> ec.EllipticCurvePrivateKey:
        key = self._vcek_keys.get(tcb)
        if key is None:
            # Like the PSP, derive the VCEK from the chip secret and the TCB: one key per TCB, reproducible.
            okm = HKDF(hashes.SHA384(), 64, salt=None, info=b"teelab lab VCEK" + tcb.to_bytes()).derive(
                self._chip_seed
            )
            key = ec.derive_private_key(int.from_bytes(okm, "big") % (_P384_ORDER - 1) + 1, ec.SECP384R1())
            self._vcek_keys[tcb] = key
        return key

    # ------------------------------------------------------------------ issuers
    def snp_report(
        self,
        report_data: bytes,
        *,
        measurement: bytes,
        vmpl: int = 0,
        policy: int = 0x30000,
        host_data: bytes = bytes(32),
        guest_svn: int = 0,
        tcb: TcbVersion | Mapping[str, int] | None = None,
        family_id: bytes = bytes(16),
        image_id: bytes = bytes(16),
        report_id: bytes | None = None,
        report_id_ma: bytes = b"\xff" * 32,
        id_key_digest: bytes = bytes(48),
        author_key_digest: bytes = bytes(48),
        platform_info: int = 0,
        version: int = 3,
    ) -> bytes:
        """A 1184-byte ATTESTATION_REPORT signed by the lab VCEK for ``tcb``; reported, current, committed
        and launch TCB all equal ``tcb`` (default: the lab's), chip_id equals the VCEK's hwID."""
        check_len("report_data", report_data, 64)
        check_len("measurement", measurement, 48)
        check_len("host_data", host_data, 32)
        check_len("family_id", family_id, 16)
        check_len("image_id", image_id, 16)
        check_len("report_id_ma", report_id_ma, 32)
        check_len("id_key_digest", id_key_digest, 48)
        check_len("author_key_digest", author_key_digest, 48)
        if report_id is None:
            report_id = os.urandom(32)
        check_len("report_id", report_id, 32)
        check_range("vmpl", vmpl, 0, 3)
        check_range("policy", policy, 0, 2**64 - 1)
        check_range("guest_svn", guest_svn, 0, 2**32 - 1)
        check_range("platform_info", platform_info, 0, 2**64 - 1)
        if version not in (2, 3, 5):
            raise IssueError(f"SNP report version {version}: the lab issues 2, 3 or 5", field="version")
        try:
            tcb_value = TcbVersion.from_value(tcb) if tcb is not None else self.tcb
            tcb_value.to_bytes()
        except (ValueError, TypeError) as exc:
            raise IssueError(f"bad tcb {tcb!r}: {exc}", field="tcb") from None
        self.vcek(tcb_value)
        cpuid = {"cpuid_fam_id": 0x19, "cpuid_mod_id": 0x01, "cpuid_step": 0x01} if version >= 3 else {}
        report = build_snp_report(
            version=version,
            guest_svn=guest_svn,
            policy=policy,
            family_id=bytes(family_id),
            image_id=bytes(image_id),
            vmpl=vmpl,
            signature_algo=1,
            current_tcb=tcb_value,
            platform_info=platform_info,
            key_info=0,
            report_data=bytes(report_data),
            measurement=bytes(measurement),
            host_data=bytes(host_data),
            id_key_digest=bytes(id_key_digest),
            author_key_digest=bytes(author_key_digest),
            report_id=bytes(report_id),
            report_id_ma=bytes(report_id_ma),
            reported_tcb=tcb_value,
            chip_id=self.chip_id,
            committed_tcb=tcb_value,
            current_major=1,
            current_minor=55,
            current_build=0,
            committed_major=1,
            committed_minor=55,
            committed_build=0,
            launch_tcb=tcb_value,
            **cpuid,
        )
        signed = report.to_bytes()[:SIGNED_SIZE]
        r, s = decode_dss_signature(self._vcek_key(tcb_value).sign(signed, ec.ECDSA(hashes.SHA384())))
        return signed + r.to_bytes(72, "little") + s.to_bytes(72, "little") + bytes(368)

    def attestation_document(
        self,
        *,
        pcrs: Mapping[int, bytes],
        public_key: bytes | None,
        user_data: bytes | None,
        nonce: bytes | None,
        module_id: str,
        timestamp_ms: int | None = None,
        digest: str = "SHA384",
        tagged: bool = False,
    ) -> bytes:
        """A COSE_Sign1 (ES384) attestation document as a Nitro security module writes it: payload map with
        module_id, digest, timestamp, pcrs, certificate (lab leaf) and cabundle [root, intermediate]."""
        if not isinstance(module_id, str) or not module_id:
            raise IssueError("module_id must be non-empty text", field="module_id")
        if not pcrs:
            raise IssueError("at least one PCR is needed", field="pcrs")
        for index, value in pcrs.items():
            if not isinstance(index, int) or not 0 <= index < 32:
                raise IssueError(f"PCR index {index!r} is not 0..31", field="pcrs")
            if not isinstance(value, (bytes, bytearray)) or len(value) not in (32, 48, 64):
                raise IssueError(f"PCR{index} must be 32, 48 or 64 bytes", field=f"pcrs.{index}")
        for name, value in (("public_key", public_key), ("user_data", user_data), ("nonce", nonce)):
            if value is not None and (not isinstance(value, (bytes, bytearray)) or len(value) > 1024):
                raise IssueError(f"{name} must be at most 1024 bytes or None", field=name)
        if timestamp_ms is None:
            timestamp_ms = time.time_ns() // 1_000_000
        leaf, intermediate, root = self.enclave_chain()
        payload = encode_payload(
            module_id=module_id,
            digest=digest,
            timestamp=int(timestamp_ms),
            pcrs=pcrs,
            certificate=leaf.der,
            cabundle=[root.der, intermediate.der],
            public_key=None if public_key is None else bytes(public_key),
            user_data=None if user_data is None else bytes(user_data),
            nonce=None if nonce is None else bytes(nonce),
        )
        protected = cbor2.dumps({1: ALG_ES384})
        return encode_cose_sign1(
            protected, payload, self.sign_es384(sig_structure(protected, payload)), tagged=tagged
        )

    def sign_es384(self, message: bytes) -> bytes:
        """ECDSA P-384/SHA-384 by the enclave leaf key, as COSE's raw r||s (96 bytes)."""
        return raw_signature(self._keys["enclave-leaf"].sign(message, ec.ECDSA(hashes.SHA384())), 48)


_authorities: dict[Path, LabAuthority] = {}
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- creation ---------------------------------------------------------------------------------------------
def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_key(directory: Path, name: str) -> Any:
    path = directory / f"{name}.key"
    try:
        return serialization.load_pem_private_key(
            path.read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
        )
    except (OSError, ValueError, TypeError) as exc:
        raise _unusable(directory, f"{path.name} unreadable ({exc})") from None


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, LAB_ORG),
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


def _issue_vcek(
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


def _issue_tdx_material(directory: Path, keys: Mapping[str, Any], public: LabCertificates) -> None:
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
    _write(directory / f"{TCB_SIGNING}.key", key_pem, 0o600)
    _write(directory / f"{TCB_SIGNING}.pem", _pem(signing), 0o644)
    _write(directory / f"{PCK_SGX}.pem", _pem(pck), 0o644)
    _write(directory / COLLATERAL_FILE, json.dumps(collateral, indent=2).encode() + b"\n", 0o644)


def _issue_sgx_collateral(directory: Path, keys: Mapping[str, Any], public: LabCertificates) -> None:
    """The lab SGX collateral (SGX TCB info, the SGX QE identity, the CRLs), signed like the TDX one by the
    TCB signing certificate the TDX material made."""
    signing = _read_cert(directory, f"{TCB_SIGNING}.pem").x509
    pck = _read_cert(directory, f"{PCK_SGX}.pem").x509
    collateral = issue_collateral(
        root=(public.certs["intel-root"].x509, keys["intel-root"]),
        pck_ca=(public.certs["intel-pck-ca"].x509, keys["intel-pck-ca"]),
        tcb_signing=(signing, _read_key(directory, TCB_SIGNING)),
        qe_mrsigner=LAB_QE_MRSIGNER,
        tee_tcb_svn=None,
        issued=LAB_EPOCH,
        until=min(pck.not_valid_after_utc, signing.not_valid_after_utc),
    )
    _write(directory / SGX_COLLATERAL_FILE, json.dumps(collateral, indent=2).encode() + b"\n", 0o644)


def _create(directory: Path) -> None:
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
    pub = {name: key.public_key() for name, key in keys.items()}
    made: dict[str, x509.Certificate] = {}

    def issue(
        name: str,
        subject: str,
        issuer: str | None,
        *,
        ca: bool,
        path_length: int | None,
        years: int,
        digest: hashes.HashAlgorithm,
        pss: bool = False,
    ) -> None:
        issuer_name = _name(subject) if issuer is None else made[issuer].subject
        builder = _build(subject, issuer_name, pub[name], ca=ca, path_length=path_length, years=years)
        signer = keys[name if issuer is None else issuer]
        made[name] = builder.sign(signer, digest, rsa_padding=_PSS if pss else None)

    issue("amd-ark", "ARK-Lab", None, ca=True, path_length=None, years=25, digest=hashes.SHA384(), pss=True)
    issue("amd-ask", "SEV-Lab", "amd-ark", ca=True, path_length=0, years=25, digest=hashes.SHA384(), pss=True)
    issue(
        "intel-root", "teelab lab SGX Root CA", None, ca=True, path_length=1, years=25, digest=hashes.SHA256()
    )
    issue(
        "intel-pck-ca",
        "teelab lab SGX PCK Platform CA",
        "intel-root",
        ca=True,
        path_length=0,
        years=15,
        digest=hashes.SHA256(),
    )
    issue(
        "intel-pck",
        "teelab lab SGX PCK Certificate",
        "intel-pck-ca",
        ca=False,
        path_length=None,
        years=7,
        digest=hashes.SHA256(),
    )
    issue(
        "enclave-root",
        "teelab lab enclave root",
        None,
        ca=True,
        path_length=None,
        years=25,
        digest=hashes.SHA384(),
    )
    issue(
        "enclave-ca",
        "teelab lab enclave intermediate",
        "enclave-root",
        ca=True,
        path_length=0,
        years=15,
        digest=hashes.SHA384(),
    )
    issue(
        "enclave-leaf",
        "teelab lab enclave leaf",
        "enclave-ca",
        ca=False,
        path_length=None,
        years=10,
        digest=hashes.SHA384(),
    )

    chip_seed = os.urandom(32)
    chip_id = hashlib.sha512(b"teelab lab chip id" + chip_seed).digest()
    for name, key in keys.items():
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write(directory / f"{name}.key", pem, 0o600)
    _write(directory / "amd-chip-seed.key", chip_seed, 0o600)
    for name, cert in made.items():
        _write(directory / f"{name}.pem", _pem(cert), 0o644)
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
    _write(directory / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n", 0o644)
