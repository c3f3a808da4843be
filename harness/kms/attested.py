"""The Recipient verifier: harness.attest's ``verify`` under the roots a key policy accepts, then the claims
as policy condition keys and the recipient key bound by the evidence."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from harness.kms.errors import EvidenceMalformed
from harness.kms.recipient import Attested, Recipient, base_conditions, refuse

VENDOR_ROOTS = ("aws-nitro", "amd", "intel")


def _hex(value: Any) -> str | None:
    if value is None:
        return None
    return value.hex() if isinstance(value, bytes) else str(value).lower()


def _bytes(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return bytes.fromhex(str(value))


class AttestVerifier:
    """Verifies Recipient evidence with harness.attest; ``lab_dir``: the lab CA that policies may name."""

    def __init__(self, lab_dir: Path | None = None) -> None:
        self.lab_dir = lab_dir

    def __call__(self, recipient: Recipient, roots: frozenset[str], now: float) -> Attested:
        return verify_recipient(recipient, roots, now, lab_dir=self.lab_dir)


def verify_recipient(
    recipient: Recipient, roots: frozenset[str], now: float, *, lab_dir: Path | None = None
) -> Attested:
    from harness import attest

    policy = attest.Policy(roots=tuple(sorted(set(VENDOR_ROOTS) | set(roots))), lab_dir=lab_dir)
    verdict = attest.verify(recipient.evidence, policy, now=now)
    if not verdict.ok:
        reasons = "; ".join(f"{r.code} {r.field}: {r.message}" for r in verdict.reasons)
        if verdict.kind is None:
            raise EvidenceMalformed(f"Recipient.AttestationDocument: {reasons}")
        raise refuse(f"{verdict.kind} evidence does not verify: {reasons}")
    claims = verdict.claims
    kind = verdict.kind
    conditions: dict[str, Any] = {}
    if kind == "nitro":
        public_key = _bytes(claims.get("public_key"))
        if public_key is None:
            raise EvidenceMalformed("the attestation document carries no public_key to release to")
        nonce = _bytes(claims.get("nonce"))
        pcrs = {int(k): _hex(v) for k, v in (claims.get("pcrs") or {}).items()}
        for index, value in pcrs.items():
            conditions[f"kms:recipientattestation:pcr{index}"] = value
            conditions[f"kms:recipientattestation/pcr{index}"] = value
        if 0 in pcrs:
            conditions["kms:recipientattestation:imagesha384"] = pcrs[0]
        conditions["teelab:recipientattestation:moduleid"] = claims.get("module_id")
        debug = bool(pcrs) and all(set(v or "") <= {"0"} for v in (pcrs.get(i) for i in (0, 1, 2)))
        timestamp = claims.get("timestamp")
    else:
        if recipient.public_key is None or recipient.nonce is None:
            raise EvidenceMalformed(
                f"{kind} evidence needs Recipient.PublicKey and Recipient.Nonce beside it"
            )
        from teelab_guest.binding import report_data

        expected = report_data(recipient.nonce, recipient.public_key)
        if not hmac.compare_digest(_bytes(claims.get("report_data")) or b"", expected):
            raise refuse(f"{kind} report_data does not bind Recipient.PublicKey and Recipient.Nonce")
        public_key, nonce, timestamp = recipient.public_key, recipient.nonce, None
        debug = bool(claims.get("debug"))
        conditions.update(_snp_or_tdx(kind, claims))
    attested = Attested(
        kind=kind,
        root=verdict.root,
        vendor_root=verdict.root in VENDOR_ROOTS,
        debug=debug,
        public_key=public_key,
        nonce=nonce,
        timestamp_ms=int(timestamp) if timestamp is not None else None,
    )
    conditions.update(base_conditions(attested))
    return Attested(**{**attested.__dict__, "conditions": conditions})


def _snp_or_tdx(kind: str, claims: dict[str, Any]) -> dict[str, Any]:
    prefix = "teelab:recipientattestation:"
    out: dict[str, Any] = {}
    if kind == "snp":
        out[prefix + "snpmeasurement"] = _hex(claims.get("measurement"))
        out[prefix + "snphostdata"] = _hex(claims.get("host_data"))
        for name, key in (("policy", "snppolicy"), ("guest_svn", "snpguestsvn"), ("vmpl", "snpvmpl")):
            if claims.get(name) is not None:
                out[prefix + key] = int(claims[name])
        tcb = claims.get("tcb") or {}
        for name, key in (
            ("bootloader", "snptcbbootloader"),
            ("tee", "snptcbtee"),
            ("snp", "snptcbsnp"),
            ("microcode", "snptcbmicrocode"),
        ):
            if tcb.get(name) is not None:
                out[prefix + key] = int(tcb[name])
    else:
        out[prefix + "tdxmrtd"] = _hex(claims.get("mrtd"))
        out[prefix + "tdxmrconfigid"] = _hex(claims.get("mrconfigid"))
        for index, value in enumerate(claims.get("rtmrs") or []):
            out[prefix + f"tdxrtmr{index}"] = _hex(value)
        if claims.get("attributes") is not None:
            out[prefix + "tdxattributes"] = int(claims["attributes"])
    return {k: v for k, v in out.items() if v is not None}
