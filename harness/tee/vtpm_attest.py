"""The host's side of vTPM attestation: certify a guest's AK by credential activation against its EK, then
ask for a quote on a nonce. ``guest`` runs ``python3 -m teelab_guest.tpm_attest ARGS`` inside the VM (through
its agent) and returns the JSON it printed."""

from __future__ import annotations

import base64
import hmac
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from teelab_guest import tpm_wire

from harness.attest.certs import Anchor, Cert, build_chain, load_cert
from harness.attest.errors import EvidenceError
from harness.attest.tpm import TpmEvidence
from harness.attest.tpm_ca import MANUFACTURER, ROOT, TpmAuthority
from harness.attest.verify_tpm import ak_public_key
from harness.tee.errors import VtpmAttestationFailed

GuestCall = Callable[[Sequence[str]], dict[str, Any]]
GUEST_MODULE = ("python3", "-m", "teelab_guest.tpm_attest")


@dataclass(frozen=True)
class CertifiedAk:
    """An AK the lab AK CA certified: the EK certificate it was activated against, its public area, its
    certificate, and how long activation took."""

    ek_certificate: Cert
    ak_public: bytes
    ak_certificate: Cert
    seconds: float


def certify_ak(guest: GuestCall, authority: TpmAuthority) -> CertifiedAk:
    """The AK CA's protocol: the EK must chain to the lab TPM manufacturer CA and the AK be a restricted
    signing key; a random credential made for (EK, AK name) must come back from the guest's TPM."""
    started = time.monotonic()
    info = guest(["ak"])
    try:
        ek_cert = load_cert(base64.b64decode(info["ek_certificate"]), field="ek_certificate")
        ak = tpm_wire.parse_ecc_public(base64.b64decode(info["ak_public"]))
    except (KeyError, ValueError, EvidenceError, tpm_wire.TpmFormatError) as exc:
        raise VtpmAttestationFailed(f"the guest's EK certificate or AK is unreadable: {exc}") from None
    anchor = Anchor("lab", "tpm", authority.certs[ROOT])
    chain = build_chain(ek_cert, [authority.certs[MANUFACTURER]], [anchor], field="ek", leaf_field="ek.leaf")
    if chain.anchor is None or [p for p in chain.problems if p.field != "ek.leaf"]:
        raise VtpmAttestationFailed(
            f"the guest's EK certificate ({ek_cert.subject_text}) is not from the lab TPM manufacturer CA",
            hint="a vTPM's EK is certified when harness.tee.vtpm manufactures its state",
        )
    key = ak_public_key(ak)
    if key is None or ak.attributes & tpm_wire.AK_ATTRIBUTES != tpm_wire.AK_ATTRIBUTES:
        raise VtpmAttestationFailed("the guest's AK is not a restricted P-256 signing key of its TPM")
    credential = os.urandom(32)
    blob, secret = tpm_wire.make_credential(ek_cert.public_key, ak.name, credential)
    answer = guest(["activate", _b64(blob), _b64(secret)])
    back = base64.b64decode(str(answer.get("credential", "")))
    if not hmac.compare_digest(back, credential):
        raise VtpmAttestationFailed(
            "the guest's TPM did not recover the credential: the AK is not beside the EK"
        )
    ak_cert = authority.issue_ak_certificate(key, ek_cert, ak.name)
    return CertifiedAk(ek_cert, ak.raw, ak_cert, time.monotonic() - started)


def quote(guest: GuestCall, ak: CertifiedAk, nonce: bytes, *, tee: bool = False) -> TpmEvidence:
    """The guest's quote of PCRs 0-9 on ``nonce``, with its event log, as evidence for ``verify``; with
    ``tee``, the CVM's SNP report binding the nonce and the AK beside it."""
    return evidence_from_answer(guest(["quote", nonce.hex(), *(["tee"] if tee else [])]), ak)


def evidence_from_answer(answer: dict[str, Any], ak: CertifiedAk) -> TpmEvidence:
    """Evidence of the guest's answer to ``quote`` and the certificates that make its AK trustworthy."""
    try:
        return TpmEvidence(
            ek_certificate=ak.ek_certificate.der,
            ak_certificate=ak.ak_certificate.der,
            ak_public=ak.ak_public,
            quote=base64.b64decode(answer["quote"]),
            signature=base64.b64decode(answer["signature"]),
            pcrs={int(i): bytes.fromhex(v) for i, v in answer["pcrs"].items()},
            event_log=tuple(answer.get("event_log", ())),
            tee_evidence=base64.b64decode(answer.get("tee_evidence", "")),
            tee_certificates=base64.b64decode(answer.get("tee_certificates", "")),
        )
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise VtpmAttestationFailed(f"the guest's quote answer is unreadable: {exc!r}") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
