"""The lab CA's Intel DCAP issuers: TDX quotes (v4) and SGX quotes (v3/v4) signed by the lab attestation
key, with the lab quoting enclave's report signed by the lab PCK leaf and the PCK chain, in Intel's layout."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from harness.attest.certs import Cert
from harness.attest.errors import IssueError
from harness.attest.lab_collateral import (
    LAB_CPUSVN,
    LAB_PCESVN,
    LAB_QE_ATTRIBUTES,
    LAB_QE_ISVPRODID,
    LAB_QE_ISVSVN,
    LAB_SGX_QE_ISVPRODID,
)
from harness.attest.sgx import SGX_FLAG_DEBUG, SGX_FLAG_MODE64BIT
from harness.attest.tdx import (
    CERT_DATA_QE_REPORT,
    EnclaveReport,
    QuoteHeader,
    TdReportBody,
    qe_certification_bytes,
)

LAB_QE_VENDOR_ID = hashlib.sha256(b"teelab lab quoting enclave").digest()[:16]
LAB_QE_MRENCLAVE = hashlib.sha256(b"teelab lab quoting enclave: code").digest()
LAB_QE_MRSIGNER = hashlib.sha256(b"teelab lab quoting enclave: signer").digest()
LAB_MRSEAM = hashlib.sha384(b"teelab lab TDX module").digest()
LAB_TEE_TCB_SVN = bytes.fromhex("06010300000000000000000000000000")
DEFAULT_XFAM = 0x00000000000602E7
SGX_FLAG_INIT = 1 << 0
DEFAULT_SGX_ATTRIBUTES = (SGX_FLAG_INIT | SGX_FLAG_MODE64BIT).to_bytes(8, "little") + (0x3).to_bytes(
    8, "little"
)
QE_AUTH_DATA = bytes(range(32))


class QuoteIssuer:
    """The quote issuers of ``LabAuthority`` (its keys ``intel-qe-ak`` and ``intel-pck``, its Intel chain)."""

    _keys: Mapping[str, Any]

    def intel_chain(self) -> tuple[Cert, Cert, Cert]:
        raise NotImplementedError

    def _init_quote_tails(self) -> None:
        self._tdx_tail = self._quote_certification_tail(LAB_QE_ISVPRODID, wrapped=True)
        self._sgx_tails = {
            3: self._quote_certification_tail(LAB_SGX_QE_ISVPRODID, wrapped=False),
            4: self._quote_certification_tail(LAB_SGX_QE_ISVPRODID, wrapped=True),
        }

    def tdx_quote(
        self,
        report_data: bytes,
        *,
        mrtd: bytes,
        rtmrs: Sequence[bytes] = (),
        td_attributes: int = 0,
        xfam: int = DEFAULT_XFAM,
        mrconfigid: bytes = bytes(48),
        mrowner: bytes = bytes(48),
        mrownerconfig: bytes = bytes(48),
        tee_tcb_svn: bytes = LAB_TEE_TCB_SVN,
        mrseam: bytes = LAB_MRSEAM,
        seam_attributes: int = 0,
    ) -> bytes:
        """A v4 TDX quote: ECDSA P-256 over header+body with the lab attestation key, then the lab QE report
        (binding SHA-256(attestation key || QE auth data), signed by the lab PCK leaf) and the PCK chain PEM
        as certification data type 5 inside type 6."""
        check_len("report_data", report_data, 64)
        check_len("mrtd", mrtd, 48)
        check_len("mrconfigid", mrconfigid, 48)
        check_len("mrowner", mrowner, 48)
        check_len("mrownerconfig", mrownerconfig, 48)
        check_len("tee_tcb_svn", tee_tcb_svn, 16)
        check_len("mrseam", mrseam, 48)
        if len(rtmrs) > 4:
            raise IssueError(f"{len(rtmrs)} RTMRs given, a TD has 4", field="rtmrs")
        for index, value in enumerate(rtmrs):
            check_len(f"rtmrs[{index}]", value, 48)
        full = [bytes(v) for v in rtmrs] + [bytes(48)] * (4 - len(rtmrs))
        for name, value in (
            ("td_attributes", td_attributes),
            ("xfam", xfam),
            ("seam_attributes", seam_attributes),
        ):
            check_range(name, value, 0, 2**64 - 1)
        header = QuoteHeader(
            4, 2, 0x81, 0, 0, LAB_QE_VENDOR_ID, hashlib.sha256(LAB_QE_VENDOR_ID).digest()[:20]
        )
        body = TdReportBody(
            tee_tcb_svn=bytes(tee_tcb_svn),
            mrseam=bytes(mrseam),
            mrsignerseam=bytes(48),
            seam_attributes=seam_attributes.to_bytes(8, "little"),
            td_attributes=td_attributes.to_bytes(8, "little"),
            xfam=xfam.to_bytes(8, "little"),
            mrtd=bytes(mrtd),
            mrconfigid=bytes(mrconfigid),
            mrowner=bytes(mrowner),
            mrownerconfig=bytes(mrownerconfig),
            rtmr0=full[0],
            rtmr1=full[1],
            rtmr2=full[2],
            rtmr3=full[3],
            report_data=bytes(report_data),
        )
        signed = header.to_bytes() + body.to_bytes()
        signature = raw_signature(self._keys["intel-qe-ak"].sign(signed, ec.ECDSA(hashes.SHA256())), 32)
        sig_data = signature + self._tdx_tail
        return signed + struct.pack("<I", len(sig_data)) + sig_data

    def sgx_quote(
        self,
        report_data: bytes,
        *,
        mrenclave: bytes,
        mrsigner: bytes = bytes(32),
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        attributes: bytes = DEFAULT_SGX_ATTRIBUTES,
        debug: bool = False,
        misc_select: int = 0,
        config_id: bytes = bytes(64),
        config_svn: int = 0,
        isv_ext_prod_id: bytes = bytes(16),
        isv_family_id: bytes = bytes(16),
        version: int = 3,
    ) -> bytes:
        """An SGX quote (v3 or v4) as the DCAP quoting library returns it for an enclave's REPORT: ECDSA P-256
        over header+report with the lab attestation key, then the lab SGX QE report (ISVPRODID 1) signed by
        the lab PCK leaf and the PCK chain PEM. ``debug`` sets ATTRIBUTES.DEBUG in ``attributes``."""
        check_len("report_data", report_data, 64)
        check_len("mrenclave", mrenclave, 32)
        check_len("mrsigner", mrsigner, 32)
        check_len("attributes", attributes, 16)
        check_len("config_id", config_id, 64)
        check_len("isv_ext_prod_id", isv_ext_prod_id, 16)
        check_len("isv_family_id", isv_family_id, 16)
        for name, value, high in (
            ("isv_prod_id", isv_prod_id, 0xFFFF),
            ("isv_svn", isv_svn, 0xFFFF),
            ("config_svn", config_svn, 0xFFFF),
            ("misc_select", misc_select, 0xFFFFFFFF),
        ):
            check_range(name, value, 0, high)
        if version not in self._sgx_tails:
            raise IssueError(f"SGX quote version {version}: the lab issues 3 or 4", field="version")
        flags = int.from_bytes(attributes[:8], "little") | (SGX_FLAG_DEBUG if debug else 0)
        body = EnclaveReport.build(
            cpu_svn=LAB_CPUSVN,
            misc_select=misc_select,
            isv_ext_prod_id=bytes(isv_ext_prod_id),
            attributes=flags.to_bytes(8, "little") + bytes(attributes[8:]),
            mrenclave=bytes(mrenclave),
            mrsigner=bytes(mrsigner),
            config_id=bytes(config_id),
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            config_svn=config_svn,
            isv_family_id=bytes(isv_family_id),
            report_data=bytes(report_data),
        )
        header = QuoteHeader(
            version,
            2,
            0,
            LAB_PCESVN,
            LAB_QE_ISVSVN,
            LAB_QE_VENDOR_ID,
            hashlib.sha256(LAB_QE_VENDOR_ID).digest()[:20],
        )
        signed = header.to_bytes() + body.to_bytes()
        signature = raw_signature(self._keys["intel-qe-ak"].sign(signed, ec.ECDSA(hashes.SHA256())), 32)
        sig_data = signature + self._sgx_tails[version]
        return signed + struct.pack("<I", len(sig_data)) + sig_data

    def _quote_certification_tail(self, qe_prod_id: int, *, wrapped: bool) -> bytes:
        """Everything of a lab quote's signature data after the quote signature: it never changes. The QE
        report is the TD QE's (ISVPRODID 2) or the SGX QE's (1); ``wrapped`` puts it in certification data
        type 6 (v4 quotes)."""
        ak = (
            self._keys["intel-qe-ak"]
            .public_key()
            .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)[1:]
        )
        qe_report = EnclaveReport.build(
            cpu_svn=LAB_CPUSVN,
            attributes=LAB_QE_ATTRIBUTES,
            mrenclave=LAB_QE_MRENCLAVE,
            mrsigner=LAB_QE_MRSIGNER,
            isv_prod_id=qe_prod_id,
            isv_svn=LAB_QE_ISVSVN,
            report_data=hashlib.sha256(ak + QE_AUTH_DATA).digest() + bytes(32),
        )
        qe_signature = raw_signature(
            self._keys["intel-pck"].sign(qe_report.to_bytes(), ec.ECDSA(hashes.SHA256())), 32
        )
        chain = "".join(c.pem() for c in self.intel_chain()).encode() + b"\0"
        qe_cert = qe_certification_bytes(qe_report, qe_signature, QE_AUTH_DATA, chain)
        if not wrapped:
            return ak + qe_cert
        return ak + struct.pack("<HI", CERT_DATA_QE_REPORT, len(qe_cert)) + qe_cert


def raw_signature(der: bytes, size: int) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def check_len(name: str, value: object, size: int) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        got = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise IssueError(f"{name} must be {size} bytes, got {got}", field=name)


def check_range(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise IssueError(f"{name} must be an integer {low}..{high}, got {value!r}", field=name)
