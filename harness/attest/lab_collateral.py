"""Lab TDX and SGX collateral: what Intel's PCS serves for a platform (TCB info, QE identity, the PCK and
root CA CRLs with their issuer chains), in the PCS JSON shape ``verify(collateral=...)`` reads, signed by the
lab's Intel-shaped chain; and the SGX extension of the lab PCK certificate the TCB info is matched against."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from asn1crypto import core as asn1
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

COLLATERAL_FILE = "tdx-collateral.json"
SGX_COLLATERAL_FILE = "sgx-collateral.json"
LAB_FMSPC = hashlib.sha256(b"teelab lab FMSPC").digest()[:6]
LAB_PCE_ID = bytes(2)
LAB_CPUSVN = bytes.fromhex("03030202040100050000000000000000")
LAB_PCESVN = 13
LAB_QE_ISVSVN = 6
LAB_QE_ISVPRODID = 2  # Intel's TD quoting enclave
LAB_SGX_QE_ISVPRODID = 1  # Intel's SGX quoting enclave
LAB_QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
_SGX = "1.2.840.113741.1.13.1"


class _Pair(asn1.Sequence):
    _fields = [("id", asn1.ObjectIdentifier), ("value", asn1.Any)]


class _Pairs(asn1.SequenceOf):
    _child_spec = _Pair


class _SgxType(asn1.Enumerated):
    _map = {0: "standard", 1: "scalable", 2: "scalable-with-integrity"}


def sgx_extension() -> x509.UnrecognizedExtension:
    """The SGX extension (1.2.840.113741.1.13.1) of the lab PCK certificate: PPID, TCB, PCE id, FMSPC."""

    def pair(oid: str, value: asn1.Asn1Value) -> _Pair:
        return _Pair({"id": oid, "value": value})

    tcb = [pair(f"{_SGX}.2.{i + 1}", asn1.Integer(svn)) for i, svn in enumerate(LAB_CPUSVN)]
    tcb += [
        pair(f"{_SGX}.2.17", asn1.Integer(LAB_PCESVN)),
        pair(f"{_SGX}.2.18", asn1.OctetString(LAB_CPUSVN)),
    ]
    body = _Pairs(
        [
            pair(f"{_SGX}.1", asn1.OctetString(hashlib.sha256(b"teelab lab PPID").digest()[:16])),
            pair(f"{_SGX}.2", _Pairs(tcb)),
            pair(f"{_SGX}.3", asn1.OctetString(LAB_PCE_ID)),
            pair(f"{_SGX}.4", asn1.OctetString(LAB_FMSPC)),
            pair(f"{_SGX}.5", _SgxType("standard")),
        ]
    )
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(_SGX), body.dump())


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def tcb_info(tee_tcb_svn: bytes | None, *, issued: dt.datetime, until: dt.datetime) -> dict[str, Any]:
    """TCB info v3 for the lab platform: one UpToDate level at the lab's CPUSVN and PCESVN. For TDX (a
    ``tee_tcb_svn``) the level also needs that TEE_TCB_SVN, and the lab TDX module (MRSIGNERSEAM zero, SEAM
    attributes zero) is listed at its version and SVN; SGX TCB info (None) has neither."""
    tcb: dict[str, Any] = {"sgxtcbcomponents": [{"svn": svn} for svn in LAB_CPUSVN], "pcesvn": LAB_PCESVN}
    info: dict[str, Any] = {
        "id": "SGX" if tee_tcb_svn is None else "TDX",
        "version": 3,
        "issueDate": _iso(issued),
        "nextUpdate": _iso(until),
        "fmspc": LAB_FMSPC.hex().upper(),
        "pceId": LAB_PCE_ID.hex().upper(),
        "tcbType": 0,
        "tcbEvaluationDataNumber": 1,
    }
    if tee_tcb_svn is not None:
        module = {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8}
        module_level = {"tcb": {"isvsvn": tee_tcb_svn[0]}, "tcbDate": _iso(issued), "tcbStatus": "UpToDate"}
        info["tdxModule"] = module
        info["tdxModuleIdentities"] = [
            {"id": f"TDX_{tee_tcb_svn[1]:02X}", **module, "tcbLevels": [module_level]}
        ]
        tcb["tdxtcbcomponents"] = [{"svn": svn} for svn in tee_tcb_svn]
    info["tcbLevels"] = [{"tcb": tcb, "tcbDate": _iso(issued), "tcbStatus": "UpToDate", "advisoryIDs": []}]
    return info


def qe_identity(
    mrsigner: bytes, *, issued: dt.datetime, until: dt.datetime, sgx: bool = False
) -> dict[str, Any]:
    """The identity of the lab quoting enclave (TD_QE, or QE for SGX quotes): its MRSIGNER, ISVPRODID,
    attributes, ISVSVN level."""
    return {
        "id": "QE" if sgx else "TD_QE",
        "version": 2,
        "issueDate": _iso(issued),
        "nextUpdate": _iso(until),
        "tcbEvaluationDataNumber": 1,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": LAB_QE_ATTRIBUTES.hex().upper(),
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": mrsigner.hex().upper(),
        "isvprodid": LAB_SGX_QE_ISVPRODID if sgx else LAB_QE_ISVPRODID,
        "tcbLevels": [{"tcb": {"isvsvn": LAB_QE_ISVSVN}, "tcbDate": _iso(issued), "tcbStatus": "UpToDate"}],
    }


def _sign(key: ec.EllipticCurvePrivateKey, text: str) -> str:
    r, s = decode_dss_signature(key.sign(text.encode(), ec.ECDSA(hashes.SHA256())))
    return (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()


def _crl(
    issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, issued: dt.datetime, until: dt.datetime
) -> str:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(issued)
        .next_update(until)
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.DER).hex()


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def issue_collateral(
    *,
    root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    pck_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    tcb_signing: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    qe_mrsigner: bytes,
    tee_tcb_svn: bytes | None,
    issued: dt.datetime,
    until: dt.datetime,
) -> dict[str, str]:
    """Signed lab collateral (the keys of ``verify(collateral=...)``): TCB info and QE identity signed by the
    lab TCB signing key, an empty PCK CRL from the lab PCK CA and an empty root CA CRL from the lab root.
    TDX collateral for ``tee_tcb_svn``; SGX collateral when it is None."""
    sgx = tee_tcb_svn is None
    tcb_text = json.dumps(tcb_info(tee_tcb_svn, issued=issued, until=until), separators=(",", ":"))
    qe_text = json.dumps(qe_identity(qe_mrsigner, issued=issued, until=until, sgx=sgx), separators=(",", ":"))
    signing_chain = _pem(tcb_signing[0], root[0])
    return {
        "tcb_info": tcb_text,
        "tcb_info_signature": _sign(tcb_signing[1], tcb_text),
        "tcb_info_issuer_chain": signing_chain,
        "qe_identity": qe_text,
        "qe_identity_signature": _sign(tcb_signing[1], qe_text),
        "qe_identity_issuer_chain": signing_chain,
        "pck_crl": _crl(pck_ca[0], pck_ca[1], issued, until),
        "pck_crl_issuer_chain": _pem(pck_ca[0], root[0]),
        "root_ca_crl": _crl(root[0], root[1], issued, until),
    }
