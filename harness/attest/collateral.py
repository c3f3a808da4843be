"""Intel PCS collateral for TDX and SGX quotes: TCB info, QE identity and CRLs with their signatures and
issuer chains, the PCK certificate's SGX extensions, and the TCB status of platform, quoting enclave and (TDX)
module (the level-matching rules of Intel's quote verification library)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asn1crypto import core as asn1
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from harness.attest.certs import Anchor, Cert, Chain, build_chain, load_pem_certs
from harness.attest.checks import Findings, ecdsa_verify, raw_rs
from harness.attest.errors import CollateralError, EvidenceError
from harness.attest.policy import Policy
from harness.attest.sgx import SgxQuote
from harness.attest.tdx import TdxQuote

OID_SGX_EXTENSIONS = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX = "1.2.840.113741.1.13.1"
REQUIRED = (
    "tcb_info",
    "tcb_info_signature",
    "tcb_info_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
    "qe_identity_issuer_chain",
    "pck_crl",
    "pck_crl_issuer_chain",
    "root_ca_crl",
)
# From best to worst; the verdict's status is the worst of platform, quoting enclave and TDX module.
STATUS_ORDER = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


@dataclass(frozen=True)
class PckExtensions:
    """What the PCK certificate says about the platform: FMSPC, PCE id, the 16 CPUSVN components, PCESVN."""

    fmspc: bytes
    pce_id: bytes
    components: tuple[int, ...]
    pcesvn: int


_extensions_cache: dict[str, PckExtensions] = {}


def pck_extensions(cert: Cert) -> PckExtensions:
    """Decode the SGX extension (1.2.840.113741.1.13.1) of a PCK certificate (cached by fingerprint)."""
    cached = _extensions_cache.get(cert.fingerprint)
    if cached is None:
        cached = _pck_extensions(cert)
        if len(_extensions_cache) >= 256:
            _extensions_cache.clear()
        _extensions_cache[cert.fingerprint] = cached
    return cached


def _pck_extensions(cert: Cert) -> PckExtensions:
    try:
        raw = cert.x509.extensions.get_extension_for_oid(OID_SGX_EXTENSIONS).value.value
        top = _pairs(asn1.load(raw))
        tcb = _pairs(top[f"{_SGX}.2"])
        components = tuple(int(tcb[f"{_SGX}.2.{i}"].native) for i in range(1, 17))
        return PckExtensions(
            fmspc=bytes(top[f"{_SGX}.4"].native),
            pce_id=bytes(top[f"{_SGX}.3"].native),
            components=components,
            pcesvn=int(tcb[f"{_SGX}.2.17"].native),
        )
    except Exception as exc:  # missing extension, wrong ASN.1 shapes: all mean "not a PCK certificate"
        raise EvidenceError(
            f"the PCK certificate has no readable SGX extension ({exc})", field="pck_chain"
        ) from None


def _pairs(sequence: Any) -> dict[str, Any]:
    """A SEQUENCE OF SEQUENCE {OID, value} as a dict."""
    return {sequence[i][0].native: sequence[i][1] for i in range(len(sequence))}


@dataclass(frozen=True)
class Collateral:
    tcb_info: Mapping[str, Any]
    tcb_info_body: bytes
    tcb_info_signature: bytes
    tcb_info_chain: tuple[Cert, ...]
    qe_identity: Mapping[str, Any]
    qe_identity_body: bytes
    qe_identity_signature: bytes
    qe_identity_chain: tuple[Cert, ...]
    pck_crl: x509.CertificateRevocationList
    pck_crl_chain: tuple[Cert, ...]
    root_ca_crl: x509.CertificateRevocationList


def parse_collateral(data: Mapping[str, Any]) -> Collateral:
    """Decode collateral in the shape of Phala's dcap-qvl JSON (bodies as the exact signed JSON strings,
    signatures as hex r||s, issuer chains as PEM, CRLs as hex DER or PEM). Raises E805 naming the key."""
    if not isinstance(data, Mapping):
        raise CollateralError("collateral must be a JSON object", field="collateral")
    for key in REQUIRED:
        if not isinstance(data.get(key), str) or not data[key]:
            raise CollateralError(f"collateral.{key} is missing or not a string", field=f"collateral.{key}")
    tcb_info, tcb_body = _body(data, "tcb_info")
    qe_identity, qe_body = _body(data, "qe_identity")
    return Collateral(
        tcb_info=tcb_info,
        tcb_info_body=tcb_body,
        tcb_info_signature=_signature(data, "tcb_info_signature"),
        tcb_info_chain=_chain(data, "tcb_info_issuer_chain"),
        qe_identity=qe_identity,
        qe_identity_body=qe_body,
        qe_identity_signature=_signature(data, "qe_identity_signature"),
        qe_identity_chain=_chain(data, "qe_identity_issuer_chain"),
        pck_crl=_crl(data, "pck_crl"),
        pck_crl_chain=_chain(data, "pck_crl_issuer_chain"),
        root_ca_crl=_crl(data, "root_ca_crl"),
    )


def _body(data: Mapping[str, Any], key: str) -> tuple[dict[str, Any], bytes]:
    """A signed JSON body: the object and the exact bytes its signature covers."""
    text = data[key]
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CollateralError(f"collateral.{key} is not JSON ({exc})", field=f"collateral.{key}") from None
    if not isinstance(value, dict):
        raise CollateralError(f"collateral.{key} is not a JSON object", field=f"collateral.{key}")
    return value, text.encode()


def _signature(data: Mapping[str, Any], key: str) -> bytes:
    try:
        raw = bytes.fromhex(data[key])
    except ValueError:
        raise CollateralError(f"collateral.{key} is not hex", field=f"collateral.{key}") from None
    if len(raw) != 64:
        raise CollateralError(f"collateral.{key} must be 64 bytes (r||s)", field=f"collateral.{key}")
    return raw


def _chain(data: Mapping[str, Any], key: str) -> tuple[Cert, ...]:
    try:
        certs = load_pem_certs(data[key].encode(), field=f"collateral.{key}")
    except EvidenceError as err:
        raise CollateralError(err.message, field=f"collateral.{key}") from None
    if not certs:
        raise CollateralError(f"collateral.{key} holds no certificate", field=f"collateral.{key}")
    return certs


def _crl(data: Mapping[str, Any], key: str) -> x509.CertificateRevocationList:
    text = data[key]
    try:
        if "-----BEGIN" in text:
            return x509.load_pem_x509_crl(text.encode())
        return x509.load_der_x509_crl(bytes.fromhex(text))
    except ValueError as exc:
        raise CollateralError(f"collateral.{key} is not a CRL ({exc})", field=f"collateral.{key}") from None


def check_collateral(
    found: Findings,
    quote: TdxQuote | SgxQuote,
    pck_chain: Sequence[Cert],
    data: Mapping[str, Any],
    anchors: Sequence[Anchor],
    quote_root: Anchor | None,
    policy: Policy,
    now: dt.datetime,
) -> dict[str, Any]:
    """Every collateral check; returns the TCB claims (status, component statuses, date, advisories).
    The collateral's issuer chains must end at the root the quote's PCK chain ends at."""
    try:
        collateral = parse_collateral(data)
        pck = pck_extensions(pck_chain[0])
        return _evaluate(found, quote, pck_chain, pck, collateral, anchors, quote_root, policy, now)
    except EvidenceError as err:
        found.fail(err.reason if isinstance(err, CollateralError) else "malformed", err.field, err.message)
        return {"status": None}


def _evaluate(
    found: Findings,
    quote: TdxQuote | SgxQuote,
    pck_chain: Sequence[Cert],
    pck: PckExtensions,
    collateral: Collateral,
    anchors: Sequence[Anchor],
    quote_root: Anchor | None,
    policy: Policy,
    now: dt.datetime,
) -> dict[str, Any]:
    _check_collateral_signed(found, collateral, pck_chain, anchors, quote_root, now)
    tee = "TDX" if isinstance(quote, TdxQuote) else "SGX"
    _check_tcb_info_fits(found, collateral, pck, tee, now)
    return _tcb_claims(found, quote, collateral, pck, tee, policy)


def _check_collateral_signed(
    found: Findings,
    collateral: Collateral,
    pck_chain: Sequence[Cert],
    anchors: Sequence[Anchor],
    quote_root: Anchor | None,
    now: dt.datetime,
) -> None:
    """The TCB info and QE identity signatures and their issuer chains, and the CRLs with theirs."""
    for key, chain_certs, message, body, sig in (
        ("tcb_info", collateral.tcb_info_chain, "TCB info", collateral.tcb_info_body,
         collateral.tcb_info_signature),
        ("qe_identity", collateral.qe_identity_chain, "QE identity", collateral.qe_identity_body,
         collateral.qe_identity_signature),
    ):  # fmt: skip
        chain = build_chain(chain_certs[0], chain_certs[1:], anchors, field=f"collateral.{key}_issuer_chain")
        _check_issuer_chain(found, chain, quote_root, now, f"collateral.{key}_issuer_chain")
        if chain.anchor is not None and len(chain.certs) != 2:
            # Intel's TCB signing certificate is issued by the root itself; a PCK certificate (whose key lives
            # on a platform) or a PCK CA must not vouch for TCB levels or quoting enclaves
            found.fail(
                "collateral-mismatch",
                f"collateral.{key}_issuer_chain",
                f"the {message} is signed by {chain_certs[0].subject_text}, which the root did not issue "
                "directly (as it issues the TCB signing certificate)",
            )
        if not ecdsa_verify(chain_certs[0], raw_rs(sig), body, hashes.SHA256()):
            found.fail(
                "collateral-signature-invalid",
                f"collateral.{key}",
                f"the {message} signature does not verify with {chain_certs[0].subject_text}",
            )
    crl_chain = build_chain(
        collateral.pck_crl_chain[0],
        collateral.pck_crl_chain[1:],
        anchors,
        field="collateral.pck_crl_issuer_chain",
        leaf_signs="crls",
    )
    _check_issuer_chain(found, crl_chain, quote_root, now, "collateral.pck_crl_issuer_chain")
    _check_crls(found, collateral, pck_chain, crl_chain.certs[-1], now)


def _check_tcb_info_fits(
    found: Findings, collateral: Collateral, pck: PckExtensions, tee: str, now: dt.datetime
) -> None:
    """Both bodies within their issue/next-update window, and the TCB info for this TEE and platform."""
    tcb_info = collateral.tcb_info
    _check_window(found, "collateral.tcb_info", tcb_info, now)
    _check_window(found, "collateral.qe_identity", collateral.qe_identity, now)
    if tcb_info.get("id") != tee or tcb_info.get("version") != 3:
        found.fail(
            "collateral-mismatch",
            "collateral.tcb_info",
            f"TCB info is {tcb_info.get('id')!r} v{tcb_info.get('version')!r}, {tee} quotes need {tee} v3",
        )
    fmspc, pce_id = str(tcb_info.get("fmspc", "")).lower(), str(tcb_info.get("pceId", "")).lower()
    if fmspc != pck.fmspc.hex() or pce_id != pck.pce_id.hex():
        found.fail(
            "collateral-mismatch",
            "collateral.tcb_info",
            f"TCB info is for FMSPC {tcb_info.get('fmspc')} / PCE {tcb_info.get('pceId')}, the PCK "
            f"certificate says {pck.fmspc.hex()} / {pck.pce_id.hex()}",
        )


def _tcb_claims(
    found: Findings,
    quote: TdxQuote | SgxQuote,
    collateral: Collateral,
    pck: PckExtensions,
    tee: str,
    policy: Policy,
) -> dict[str, Any]:
    """The TCB status (the worst of platform, QE and, for TDX, module) against the policy, and its claims."""
    tcb_info = collateral.tcb_info
    qe_status = _qe_status(found, quote, collateral.qe_identity, "TD_QE" if tee == "TDX" else "QE")
    if isinstance(quote, TdxQuote):
        platform = _platform_level(tcb_info, pck, quote.body.tee_tcb_svn)
        module_status = _module_status(found, quote, tcb_info)
        statuses = [platform.get("tcbStatus") if platform else None, qe_status, module_status]
        facts: dict[str, Any] = {"tee_tcb_svn": quote.body.tee_tcb_svn.hex()}
        described = f"platform {statuses[0]}, QE {qe_status}, TDX module {module_status}"
    else:
        platform = _platform_level(tcb_info, pck, None)
        statuses = [platform.get("tcbStatus") if platform else None, qe_status]
        facts = {"cpu_svn_components": list(pck.components), "pce_svn": pck.pcesvn}
        described = f"platform {statuses[0]}, QE {qe_status}"
    advisories = _texts(platform, "advisoryIDs") if platform else []
    status = None
    if platform is None:
        found.fail(
            "tcb-status",
            "tcb",
            "no TCB level of the TCB info matches this platform (PCK CPUSVN, PCESVN"
            f"{' and TEE_TCB_SVN' if tee == 'TDX' else ''}); Intel's verifier calls this TCB_NOT_SUPPORTED",
        )
    elif all(s in STATUS_ORDER for s in statuses):
        status = max(statuses, key=STATUS_ORDER.index)  # type: ignore[arg-type]
        if status not in policy.tcb_statuses:
            found.fail(
                "tcb-status",
                "tcb",
                f"TCB status {status} ({described}; advisories {', '.join(advisories) or 'none'}) is not "
                f"one of {', '.join(policy.tcb_statuses)}",
            )
    return {
        **facts,
        "status": status,
        "platform_status": statuses[0],
        "qe_status": qe_status,
        **({"module_status": statuses[2]} if tee == "TDX" else {}),
        "tcb_date": platform.get("tcbDate") if platform else None,
        "advisory_ids": advisories,
        "fmspc": pck.fmspc.hex(),
    }


def _check_issuer_chain(
    found: Findings, chain: Chain, quote_root: Anchor | None, now: dt.datetime, field: str
) -> None:
    for problem in (*chain.problems, *chain.validity_problems(now, field)):
        found.fail(problem.code, problem.field, problem.message)
    if chain.anchor is not None and chain.anchor != quote_root:
        found.fail(
            "collateral-mismatch",
            field,
            f"the chain ends at the {chain.anchor.name} root, the quote's "
            f"PCK chain at {quote_root.name if quote_root else 'no known root'}",
        )


def _time(value: Any) -> dt.datetime | None:
    try:
        moment = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


# The collateral bodies are JSON from outside: these read them so that a value of the wrong shape counts as
# absent (and so fails its check) instead of raising.
def _maps(body: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    """The objects in the list ``body[key]``."""
    value = body.get(key)
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _texts(body: Mapping[str, Any], key: str) -> list[str]:
    value = body.get(key)
    return [str(item) for item in value] if isinstance(value, list) else []


def _level_status(owner: Mapping[str, Any], svn: int) -> str:
    """The tcbStatus of the first of ``owner``'s TCB levels whose isvsvn ``svn`` meets; "Revoked" if none."""
    for level in _maps(owner, "tcbLevels"):
        tcb = level.get("tcb")
        needed = tcb.get("isvsvn") if isinstance(tcb, Mapping) else None
        if isinstance(needed, int | float) and svn >= needed:
            return str(level.get("tcbStatus"))
    return "Revoked"


def _check_window(found: Findings, field: str, body: Mapping[str, Any], now: dt.datetime) -> None:
    issued, next_update = _time(body.get("issueDate")), _time(body.get("nextUpdate"))
    if issued is None or next_update is None:
        found.fail("collateral-malformed", field, "issueDate/nextUpdate missing or not ISO times")
    elif not issued <= now <= next_update:
        found.fail(
            "collateral-expired",
            field,
            f"valid {issued.isoformat()} .. {next_update.isoformat()}, evidence time is {now.isoformat()}",
        )


def _check_crls(
    found: Findings, collateral: Collateral, pck_chain: Sequence[Cert], root: Cert, now: dt.datetime
) -> None:
    pck_ca = collateral.pck_crl_chain[0]
    for field, crl, signer in (
        ("collateral.pck_crl", collateral.pck_crl, pck_ca),
        ("collateral.root_ca_crl", collateral.root_ca_crl, root),
    ):
        if crl.issuer.public_bytes() != signer.subject or not _crl_signed(crl, signer):
            found.fail(
                "collateral-signature-invalid", field, f"the CRL is not signed by {signer.subject_text}"
            )
        next_update = crl.next_update_utc
        if now < crl.last_update_utc or (next_update is not None and now > next_update):
            found.fail(
                "collateral-expired",
                field,
                f"CRL valid {crl.last_update_utc.isoformat()} .. "
                f"{next_update.isoformat() if next_update else '-'}",
            )
    if len(pck_chain) > 1 and pck_chain[1].subject != pck_ca.subject:
        found.fail(
            "collateral-mismatch",
            "collateral.pck_crl",
            f"the PCK CRL is for {pck_ca.subject_text}, the quote's PCK CA is {pck_chain[1].subject_text}",
        )
    for cert, crl in (
        (pck_chain[0], collateral.pck_crl),
        *((c, collateral.root_ca_crl) for c in pck_chain[1:-1]),
    ):
        serial = cert.serial
        if serial < 0:  # RFC 5280 forbids it, and CRL lookups cannot take it: unknown revocation state
            found.fail(
                "malformed",
                "pck_chain",
                f"{cert.subject_text} has a negative serial number; its revocation cannot be checked",
            )
        elif crl.get_revoked_certificate_by_serial_number(serial) is not None:
            found.fail(
                "certificate-revoked",
                "pck_chain",
                f"{cert.subject_text} (serial {serial:x}) is revoked",
            )


_crl_cache: dict[tuple[bytes, str], bool] = {}


def _crl_signed(crl: x509.CertificateRevocationList, signer: Cert) -> bool:
    """Whether ``signer`` signed ``crl`` (cached by the CRL's SHA-256 and the signer's fingerprint)."""
    key = (crl.fingerprint(hashes.SHA256()), signer.fingerprint)
    cached = _crl_cache.get(key)
    if cached is None:
        try:
            cached = crl.is_signature_valid(signer.public_key)
        except (TypeError, ValueError):  # a key type that cannot sign CRLs
            cached = False
        if len(_crl_cache) >= 256:
            _crl_cache.clear()
        _crl_cache[key] = cached
    return cached


def _masked(value: bytes, mask: bytes) -> bytes:
    return bytes(a & b for a, b in zip(value, mask, strict=False))


def _hex(body: Mapping[str, Any], key: str) -> bytes:
    try:
        return bytes.fromhex(str(body.get(key, "")))
    except ValueError:
        return b""


def _qe_status(
    found: Findings, quote: TdxQuote | SgxQuote, identity: Mapping[str, Any], wanted_id: str
) -> str | None:
    qe = quote.qe_report
    mismatches = []
    if _hex(identity, "mrsigner") != qe.mrsigner:
        mismatches.append("MRSIGNER")
    if identity.get("isvprodid") != qe.isv_prod_id:
        mismatches.append("ISVPRODID")
    misc_mask = _hex(identity, "miscselectMask")
    if _masked(qe.misc_select.to_bytes(4, "little"), misc_mask[::-1]) != _masked(
        _hex(identity, "miscselect")[::-1], misc_mask[::-1]
    ):
        mismatches.append("MISCSELECT")
    attr_mask = _hex(identity, "attributesMask")
    if _masked(qe.attributes, attr_mask) != _masked(_hex(identity, "attributes"), attr_mask):
        mismatches.append("ATTRIBUTES")
    if identity.get("id") != wanted_id:
        mismatches.append(f"id {identity.get('id')!r} (this quote needs {wanted_id})")
    if mismatches:
        found.fail(
            "qe-identity-mismatch",
            "qe_report",
            f"the quoting enclave does not match Intel's QE identity: {', '.join(mismatches)}",
        )
    return _level_status(identity, qe.isv_svn)


def _platform_level(
    tcb_info: Mapping[str, Any], pck: PckExtensions, tee_tcb_svn: bytes | None
) -> Mapping[str, Any] | None:
    """The first TCB level the platform meets: SGX components and PCESVN, and for TDX the TEE_TCB_SVN."""
    svn = tee_tcb_svn or bytes(16)
    start = 2 if svn[1] > 0 else 0  # components 0 and 1 belong to the TDX module identity
    for level in _maps(tcb_info, "tcbLevels"):
        try:
            tcb = level["tcb"]
            sgx = [int(c["svn"]) for c in tcb["sgxtcbcomponents"]]
            tdx = [int(c["svn"]) for c in tcb["tdxtcbcomponents"]] if tee_tcb_svn is not None else [0] * 16
            pcesvn = int(tcb["pcesvn"])
        except (KeyError, TypeError, ValueError):
            continue
        if len(sgx) != 16 or len(tdx) != 16:
            continue
        if (
            all(have >= need for have, need in zip(pck.components, sgx, strict=True))
            and pck.pcesvn >= pcesvn
            and all(svn[i] >= tdx[i] for i in range(start, 16))
        ):
            return level
    return None


def _module_status(found: Findings, quote: TdxQuote, tcb_info: Mapping[str, Any]) -> str | None:
    svn, version = quote.body.tee_tcb_svn[0], quote.body.tee_tcb_svn[1]
    if version == 0:
        module = tcb_info.get("tdxModule")
        _check_module(found, quote, module if isinstance(module, Mapping) else {}, "tdxModule")
        return "UpToDate"
    wanted = f"TDX_{version:02X}"
    for identity in _maps(tcb_info, "tdxModuleIdentities"):
        if str(identity.get("id", "")).upper() == wanted:
            _check_module(found, quote, identity, wanted)
            return _level_status(identity, svn)
    found.fail("tdx-module-mismatch", "tee_tcb_svn", f"the TCB info has no TDX module identity {wanted}")
    return None


def _check_module(found: Findings, quote: TdxQuote, module: Mapping[str, Any], name: str) -> None:
    if _hex(module, "mrsigner") != quote.body.mrsignerseam:
        found.fail("tdx-module-mismatch", "mrsignerseam", f"MRSIGNERSEAM differs from the TCB info's {name}")
    mask = _hex(module, "attributesMask")
    if _masked(quote.body.seam_attributes, mask) != _masked(_hex(module, "attributes"), mask):
        found.fail(
            "tdx-module-mismatch", "seam_attributes", f"SEAMATTRIBUTES differ from the TCB info's {name}"
        )
