"""Genuine vendor evidence with any single field changed is refused, and the refusal names that field.

The policy pins every claim of the untouched evidence (as a relying party pinning reference values would),
so a change that only the signature notices is still attributed to its field; reserved bytes are attributed to
the signature that covers them. Each table covers EVERY field of its format.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from harness.attest import Policy, Verdict, parse_attestation_document, parse_tdx_quote, verify
from harness.attest.nitro import encode_cose_sign1
from harness.attest.snp import FIELD_SPANS
from harness.attest.tdx import quote_field_spans

VECTORS = Path(__file__).parents[1] / "vectors"
SNP = [  # (folder, endorsement certificate, root, policy needs)
    ("", "vcek.der", "amd-milan", {}),
    ("extra/go-sev-guest_milan", "vcek.der", "amd-milan", {"allow_debug": True}),
    ("extra/trustee_milan_vcek", "vcek.der", "amd-milan", {}),
    ("extra/trustee_milan_vlek", "vlek.der", "amd-milan", {"max_vmpl": 1}),
    ("extra/trustee_azure_genoa", "vcek.pem", "amd-genoa", {}),
]
NO_COLLATERAL = {"allow_missing_collateral": True}  # the collateral's own checks: test_attest_vendor.py
TDX = [  # (folder, policy needs)
    ("", NO_COLLATERAL),
    ("extra/trustee_v4_exact_length", {"allow_debug": True, **NO_COLLATERAL}),
    ("extra/go-tdx-guest_v4_SPR_E4_with_trailer", NO_COLLATERAL),
    ("extra/go-tdx-guest_v5", NO_COLLATERAL),
    ("extra/phala_v5_outdated", NO_COLLATERAL),
]
NITRO = [
    ("", {}),
    ("extra/dstack-attest_prod_userdata", {}),
    ("extra/dstack-attest_debug_mode", {"allow_debug": True}),
]
SNP_AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)  # the VLEK expired 2025-12-10
TDX_AT = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)  # the v5 PCK certificates start 2026-01


def named(field: str, verdict: Verdict) -> bool:
    """A reason names ``field``, a part of it ("reported_tcb.raw") or what holds it ("cabundle")."""
    return any(
        r.field == field or r.field.startswith(field + ".") or field.startswith(r.field + ".")
        for r in verdict.reasons
    )


def pinned(verdict: Verdict, **needs: Any) -> Policy:
    assert verdict.ok, verdict.reasons
    return Policy(roots=(verdict.root,), claims=verdict.claims, **needs)


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


# --- SEV-SNP --------------------------------------------------------------------------------------------
def snp_cases() -> Iterator[Any]:
    for folder, cert, _root, needs in SNP:
        report = (VECTORS / "snp" / folder / "report.bin").read_bytes()
        version = int.from_bytes(report[:4], "little")
        for name in FIELD_SPANS:
            reserved = (
                name.startswith("reserved")
                or (name.startswith("cpuid_") and version < 3)
                or (name.endswith("_mit_vector") and version < 5)
            )
            expect = "signature" if reserved or name.startswith("signature_") else name
            yield pytest.param(folder, cert, needs, name, expect, id=f"{folder or 'milan'}:{name}")


@pytest.mark.parametrize(("folder", "cert", "needs", "field", "expect"), list(snp_cases()))
def test_every_snp_field_changed_is_refused_naming_it(
    folder: str, cert: str, needs: dict, field: str, expect: str
) -> None:
    report = (VECTORS / "snp" / folder / "report.bin").read_bytes()
    certificates = [(VECTORS / "snp" / folder / cert).read_bytes()]
    policy = pinned(verify(report, Policy(**needs), certificates=certificates, now=SNP_AT), **needs)
    assert verify(report, policy, certificates=certificates, now=SNP_AT).ok
    offset, _ = FIELD_SPANS[field]
    verdict = verify(flip(report, offset), policy, certificates=certificates, now=SNP_AT)
    assert not verdict.ok
    assert named(expect, verdict), (field, verdict.reasons)


# --- TDX ------------------------------------------------------------------------------------------------
_SIZE_FIELDS = {
    "signature_data_size",
    "certification_data.size",
    "qe_auth_data.size",
    "pck_chain.size",
    "body_size",
}


def tdx_mutation(quote: bytes, field: str, offset: int, size: int) -> bytes:
    if field in _SIZE_FIELDS:  # a length that runs past the end: flip its top bit
        return flip(quote, offset + size - 1, 0x80)
    if field == "version":
        return flip(
            quote, offset, 0x02
        )  # 4 -> 6, 5 -> 7 (4 <-> 5 would re-read the body as the other layout)
    if field == "body_type":
        return flip(quote, offset, 0x04)
    if field == "pck_chain":  # a base64 character inside the leaf certificate
        position = next(i for i in range(offset + size // 4, offset + size) if chr(quote[i]).isalnum())
        return flip(quote, position)
    return flip(quote, offset)


def tdx_cases() -> Iterator[Any]:
    for folder, needs in TDX:
        quote = parse_tdx_quote((VECTORS / "tdx" / folder / "quote.bin").read_bytes())
        for name in quote_field_spans(quote):
            expect = "qe_report_signature" if name.startswith("qe_report.reserved") else name
            yield pytest.param(folder, needs, name, expect, id=f"{folder or 'phala_v4'}:{name}")


@pytest.mark.parametrize(("folder", "needs", "field", "expect"), list(tdx_cases()))
def test_every_tdx_field_changed_is_refused_naming_it(
    folder: str, needs: dict, field: str, expect: str
) -> None:
    data = (VECTORS / "tdx" / folder / "quote.bin").read_bytes()
    policy = pinned(verify(data, Policy(**needs), now=TDX_AT), **needs)
    assert verify(data, policy, now=TDX_AT).ok
    offset, size = quote_field_spans(parse_tdx_quote(data))[field]
    verdict = verify(tdx_mutation(data, field, offset, size), policy, now=TDX_AT)
    assert not verdict.ok
    assert named(expect, verdict), (field, verdict.reasons)


def test_tdx_trailer_is_outside_every_signature_and_reported_not_trusted() -> None:
    data = (VECTORS / "tdx" / "quote.bin").read_bytes()
    verdict = verify(data[:-1] + b"\x01", Policy(**NO_COLLATERAL), now=TDX_AT)
    assert verdict.ok and verdict.claims["trailing_bytes"] == 70


# --- Nitro ----------------------------------------------------------------------------------------------
def nitro_mutation(data: bytes, field: str) -> bytes:
    doc = parse_attestation_document(data)
    protected = doc.protected
    signature = doc.signature
    payload = cbor2.loads(doc.payload)
    if field == "protected":
        protected = cbor2.dumps({1: -7})
    elif field == "signature":
        signature = flip(signature, 0)
    elif field == "module_id":
        payload["module_id"] += "x"
    elif field == "digest":
        payload["digest"] = "SHA512"
    elif field == "timestamp":
        payload["timestamp"] += 1
    elif field.startswith("pcrs."):
        index = int(field.split(".")[1])
        payload["pcrs"][index] = flip(payload["pcrs"][index], 0)
    elif field == "certificate":
        payload["certificate"] = flip(payload["certificate"], len(payload["certificate"]) // 2)
    elif field.startswith("cabundle."):
        index = int(field.split(".")[1])
        payload["cabundle"][index] = flip(payload["cabundle"][index], len(payload["cabundle"][index]) // 2)
    else:  # public_key, user_data, nonce: null becomes a byte, bytes change
        value = payload[field]
        payload[field] = b"\x01" if value is None else flip(value, 0)
    return encode_cose_sign1(protected, cbor2.dumps(payload), signature, tagged=doc.tagged)


def nitro_cases() -> Iterator[Any]:
    for folder, needs in NITRO:
        doc = parse_attestation_document((VECTORS / "nitro" / folder / "attestation_doc.bin").read_bytes())
        fields = [
            "protected",
            "signature",
            "module_id",
            "digest",
            "timestamp",
            "certificate",
            "public_key",
            "user_data",
            "nonce",
        ]
        fields += [f"pcrs.{i}" for i in sorted(doc.pcrs)] + [
            f"cabundle.{i}" for i in range(len(doc.cabundle))
        ]
        for name in fields:
            yield pytest.param(folder, needs, name, id=f"{folder or 'dstack'}:{name}")


@pytest.mark.parametrize(("folder", "needs", "field"), list(nitro_cases()))
def test_every_nitro_field_changed_is_refused_naming_it(folder: str, needs: dict, field: str) -> None:
    data = (VECTORS / "nitro" / folder / "attestation_doc.bin").read_bytes()
    policy = pinned(verify(data, Policy(**needs)), **needs)
    assert verify(data, policy).ok
    verdict = verify(nitro_mutation(data, field), policy)
    assert not verdict.ok
    assert named(field, verdict), (field, verdict.reasons)
