"""The lab certificate authority: persistent AMD-, Intel- and enclave-shaped chains with their keys, and the
issuers of lab evidence (SNP reports, TDX and SGX quotes, attestation documents) in the vendors' exact wire
formats."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from harness import paths
from harness.attest.certs import Anchor, Cert
from harness.attest.errors import IssueError, LabAuthorityError
from harness.attest.lab_certificates import (
    CERT_NAMES,
    KEY_NAMES,
    LOCK_FILE,
    MANIFEST,
    PCK_SGX,
    LabCertificates,
    load_lab_certificates,
    read_cert,
    unusable,
    vcek_file,
)
from harness.attest.lab_collateral import (
    COLLATERAL_FILE,
    SGX_COLLATERAL_FILE,
)
from harness.attest.lab_creation import (
    create_authority,
    issue_sgx_collateral,
    issue_tdx_material,
    issue_vcek,
    read_key,
    write_file,
)
from harness.attest.lab_quotes import (
    QuoteIssuer,
    check_len,
    check_range,
    raw_signature,
)
from harness.attest.nitro import ALG_ES384, encode_cose_sign1, encode_payload, sig_structure
from harness.attest.snp import SIGNED_SIZE, TcbVersion, build_snp_report, write_snp_cert_table

_P384_ORDER = (
    0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
)
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


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
                    create_authority(directory)
        return cls.load(directory)

    @classmethod
    def load(cls, directory: Path | str) -> LabAuthority:
        directory = Path(directory).absolute()
        public = load_lab_certificates(directory)
        if public is None:
            raise LabAuthorityError(
                f"no lab CA in {directory}", hint="create one with LabAuthority.load_or_create"
            )
        keys = {name: read_key(directory, name) for name in KEY_NAMES}
        for name in CERT_NAMES:
            if keys[name].public_key().public_bytes(*_SPKI) != public.certs[
                name
            ].x509.public_key().public_bytes(*_SPKI):
                raise unusable(directory, f"{name}.key does not match {name}.pem")
        try:
            seed = (directory / "amd-chip-seed.key").read_bytes()
        except OSError as exc:
            raise unusable(directory, f"lacks its chip seed ({exc})") from None
        if not (directory / COLLATERAL_FILE).exists():
            with paths.exclusive_lock(directory / LOCK_FILE):
                if not (directory / COLLATERAL_FILE).exists():
                    issue_tdx_material(directory, keys, public)
        if not (directory / SGX_COLLATERAL_FILE).exists():
            with paths.exclusive_lock(directory / LOCK_FILE):
                if not (directory / SGX_COLLATERAL_FILE).exists():
                    issue_sgx_collateral(directory, keys, public)
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
        return read_cert(self.directory, f"{PCK_SGX}.pem"), c["intel-pck-ca"], c["intel-root"]

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
                pem = issue_vcek(
                    self._keys["amd-ask"],
                    self.public.certs["amd-ask"].x509,
                    self._vcek_key(tcb),
                    tcb,
                    self.chip_id,
                )
                write_file(self.directory / vcek_file(tcb), pem, 0o644)
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
