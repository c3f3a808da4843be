"""Every byte of every vendor vector and of lab evidence, changed: ``verify`` never raises, and the verdict is
refused, except where the format leaves the byte unread; then it is ``ok`` with the original's claims.

The bytes left unread (``UNREAD``): a TDX quote's trailer (after the signature data, covered by nothing) and
whitespace (or the NUL padding) of a PEM chain that stays whitespace. Every other change is refused.

Cases: each byte position of each target flipped by one bit (bit ``offset % 8``, so every bit position is
hit across a target), every truncation, and three extensions. With TEELAB_EXHAUSTIVE_FLIPS=1 the ``slow``
test flips all 8 bits of every byte as well (8x the cases). The certificates supplied beside SNP reports are
fuzzed too (the vendor VCEK/VLEK files); the lab's GHCB certificate table is not: certificates given there are
hints picked by content, and the verifier knows the lab VCEK without them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509

from harness.attest import EvidenceError, LabAuthority, Policy, Verdict, parse, parse_tdx_quote, verify
from harness.attest.sgx import parse_sgx_quote, sgx_field_spans
from harness.attest.tdx import quote_field_spans

VECTORS = Path(__file__).parents[1] / "vectors"
SNP_AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)  # the VLEK expired 2025-12-10
TDX_AT = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)  # the v5 PCK certificates start 2026-01
COLLATERAL_AT = dt.datetime(2025, 6, 20, tzinfo=dt.UTC)  # inside the primary collateral's window
SGX_AT = dt.datetime(2025, 6, 20, tzinfo=dt.UTC)  # inside the SGX collateral's window
WHITESPACE = frozenset(b" \t\n\r\x0b\x0c\x00")  # NUL: the padding after a PEM chain
EXHAUSTIVE = os.environ.get("TEELAB_EXHAUSTIVE_FLIPS") == "1"


@dataclass(frozen=True)
class Target:
    """Bytes to change, the verification they feed, and which offsets the format leaves unread."""

    name: str
    data: bytes
    check: Callable[[bytes], Verdict]
    kind: str | None  # the evidence kind to parse() the changed bytes as; None for a certificate
    unread: Callable[[int, int], bool]  # (offset, new byte) -> the format leaves this change unread


def _nothing_unread(offset: int, new: int) -> bool:
    return False


def _pem_whitespace(data: bytes, start: int, end: int) -> Callable[[int, int], bool]:
    def unread(offset: int, new: int) -> bool:
        return start <= offset < end and data[offset] in WHITESPACE and new in WHITESPACE

    return unread


def _tdx_unread(quote: bytes, kind: str = "tdx") -> Callable[[int, int], bool]:
    spans = (
        sgx_field_spans(parse_sgx_quote(quote))
        if kind == "sgx"
        else quote_field_spans(parse_tdx_quote(quote))
    )
    start, size = spans["pck_chain"]
    pem = _pem_whitespace(quote, start, start + size)
    trailer = start + size  # the trailer follows the PCK chain, the last field of the signature data
    return lambda offset, new: offset >= trailer or pem(offset, new)


def vendor_targets() -> Iterator[Target]:
    for folder, cert, needs in (
        ("", "vcek.der", {}),
        ("extra/go-sev-guest_milan", "vcek.der", {"allow_debug": True}),
        ("extra/trustee_milan_vcek", "vcek.der", {}),
        ("extra/trustee_milan_vlek", "vlek.der", {"max_vmpl": 1}),
        ("extra/trustee_azure_genoa", "vcek.pem", {}),
    ):
        report = (VECTORS / "snp" / folder / "report.bin").read_bytes()
        endorsement = (VECTORS / "snp" / folder / cert).read_bytes()
        policy = Policy(roots=("amd-milan", "amd-genoa"), **needs)  # type: ignore[arg-type]

        def with_report(data: bytes, policy: Policy = policy, cert: bytes = endorsement) -> Verdict:
            return verify(data, policy, certificates=[cert], now=SNP_AT)

        def with_cert(data: bytes, policy: Policy = policy, report: bytes = report) -> Verdict:
            return verify(report, policy, certificates=[data], now=SNP_AT)

        name = folder.removeprefix("extra/") or "snp"
        yield Target(f"snp:{name}:report", report, with_report, "snp", _nothing_unread)
        pem = _pem_whitespace(endorsement, 0, len(endorsement)) if cert.endswith(".pem") else _nothing_unread
        yield Target(f"snp:{name}:{cert}", endorsement, with_cert, None, pem)
    primary = VECTORS / "tdx"
    collateral = json.loads((primary / "collateral.json").read_text())
    quote = (primary / "quote.bin").read_bytes()
    yield Target(
        "tdx:phala_v4+collateral",
        quote,
        lambda data: verify(data, Policy(), now=COLLATERAL_AT, collateral=collateral),
        "tdx",
        _tdx_unread(quote),
    )
    for folder, needs in (
        ("extra/trustee_v4_exact_length", {"allow_debug": True}),
        ("extra/go-tdx-guest_v4_SPR_E4_with_trailer", {}),
        ("extra/go-tdx-guest_v5", {}),
        ("extra/phala_v5_outdated", {}),
    ):
        quote = (primary / folder / "quote.bin").read_bytes()
        policy = Policy(allow_missing_collateral=True, **needs)  # type: ignore[arg-type]

        def tdx(data: bytes, policy: Policy = policy) -> Verdict:
            return verify(data, policy, now=TDX_AT)

        yield Target(f"tdx:{folder.removeprefix('extra/')}", quote, tdx, "tdx", _tdx_unread(quote))
    sgx_quote = (VECTORS / "sgx" / "quote.bin").read_bytes()
    sgx_collateral = json.loads((VECTORS / "sgx" / "collateral.json").read_text())
    sgx_policy = Policy(tcb_statuses=("UpToDate", "ConfigurationAndSWHardeningNeeded"))
    yield Target(
        "sgx:phala_v3+collateral",
        sgx_quote,
        lambda data: verify(data, sgx_policy, now=SGX_AT, collateral=sgx_collateral),
        "sgx",
        _tdx_unread(sgx_quote, "sgx"),
    )
    for folder, needs in (
        ("", {}),
        ("extra/dstack-attest_prod_userdata", {}),
        ("extra/dstack-attest_debug_mode", {"allow_debug": True}),
    ):
        document = (VECTORS / "nitro" / folder / "attestation_doc.bin").read_bytes()
        policy = Policy(**needs)  # type: ignore[arg-type]

        def nitro(data: bytes, policy: Policy = policy) -> Verdict:
            return verify(data, policy)  # at the document's own timestamp

        name = folder.removeprefix("extra/") or "aws"
        yield Target(f"nitro:{name}", document, nitro, "nitro", _nothing_unread)


def lab_targets(lab: LabAuthority) -> Iterator[Target]:
    policy = Policy(roots=("lab",), lab_dir=lab.directory)

    def lab_verify(data: bytes) -> Verdict:
        return verify(data, policy)

    yield Target(
        "lab:snp", lab.snp_report(bytes(64), measurement=b"\x01" * 48), lab_verify, "snp", _nothing_unread
    )
    quote = lab.tdx_quote(bytes(64), mrtd=b"\x02" * 48, rtmrs=[b"\x03" * 48])
    yield Target("lab:tdx+lab collateral", quote, lab_verify, "tdx", _tdx_unread(quote))
    for version in (3, 4):
        quote = lab.sgx_quote(bytes(64), mrenclave=b"\x06" * 32, version=version)
        yield Target(
            f"lab:sgx v{version}+lab collateral", quote, lab_verify, "sgx", _tdx_unread(quote, "sgx")
        )
    document = lab.attestation_document(
        pcrs={0: b"\x04" * 48, 1: b"\x05" * 48},
        public_key=b"a recipient key",
        user_data=b"user data",
        nonce=b"a nonce",
        module_id="lab-enclave",
        timestamp_ms=int(time.time() * 1000),
    )
    yield Target("lab:nitro", document, lab_verify, "nitro", _nothing_unread)


VENDOR = {t.name: t for t in vendor_targets()}
LAB_NAMES = (
    "lab:snp",
    "lab:tdx+lab collateral",
    "lab:sgx v3+lab collateral",
    "lab:sgx v4+lab collateral",
    "lab:nitro",
)


@pytest.fixture(scope="module")
def lab_by_name(lab: LabAuthority) -> dict[str, Target]:
    return {t.name: t for t in lab_targets(lab)}


def target(name: str, lab_by_name: dict[str, Target]) -> Target:
    return VENDOR[name] if name in VENDOR else lab_by_name[name]


def expect_refused_or_unread(target: Target, original: Verdict, changed: bytes, unread: bool) -> None:
    """The changed bytes are refused (parse raises only coded errors), or left unread with equal claims."""
    if target.kind is not None:
        try:
            parse(changed, target.kind)
        except EvidenceError as err:
            assert err.code.startswith("E80") and err.field
    verdict = target.check(changed)
    assert verdict.ok == (not verdict.reasons)
    if verdict.ok:
        assert unread, f"{target.name}: accepted a change the format reads"
        assert verdict.claims == original.claims


def sweep(target: Target, bits: Callable[[int], range | tuple[int, ...]]) -> int:
    original = target.check(target.data)
    assert original.ok, original.reasons
    cases = 0
    for offset, value in enumerate(target.data):
        for bit in bits(offset):
            changed = bytearray(target.data)
            changed[offset] = new = value ^ (1 << bit)
            expect_refused_or_unread(target, original, bytes(changed), target.unread(offset, new))
            cases += 1
    return cases


ALL_NAMES = [*VENDOR, *LAB_NAMES]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_one_bit_of_every_byte_flipped_is_refused_unless_unread(
    name: str, lab_by_name: dict[str, Target]
) -> None:
    chosen = target(name, lab_by_name)
    assert sweep(chosen, lambda offset: (offset % 8,)) == len(chosen.data)


@pytest.mark.slow
@pytest.mark.skipif(not EXHAUSTIVE, reason="all 8 bits of every byte: set TEELAB_EXHAUSTIVE_FLIPS=1")
@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_bit_of_every_byte_flipped_is_refused_unless_unread(
    name: str, lab_by_name: dict[str, Target]
) -> None:
    chosen = target(name, lab_by_name)
    assert sweep(chosen, lambda offset: range(8)) == 8 * len(chosen.data)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_truncation_and_extension_is_refused_unless_unread(
    name: str, lab_by_name: dict[str, Target]
) -> None:
    chosen = target(name, lab_by_name)
    original = chosen.check(chosen.data)
    quotes = {"tdx": parse_tdx_quote, "sgx": parse_sgx_quote}
    trailer = len(quotes[chosen.kind](chosen.data).trailer) if chosen.kind in quotes else 0
    pem = chosen.data.startswith(b"-----BEGIN")  # a PEM file may lose or gain whitespace at its end
    end = len(chosen.data)
    cuts = [
        (chosen.data[:length], length >= end - trailer or (pem and set(chosen.data[length:]) <= WHITESPACE))
        for length in range(end)
    ]
    grown = [
        (chosen.data + extra, chosen.kind in quotes or (pem and set(extra) <= WHITESPACE))
        for extra in (b"\0", b"\xff" * 7, bytes(range(256)) * 16)
    ]
    for changed, unread in cuts + grown:
        if chosen.kind is not None:
            try:
                parse(changed, chosen.kind)
            except EvidenceError as err:
                assert err.code.startswith("E80") and err.field
        verdict = chosen.check(changed)
        assert verdict.ok == (not verdict.reasons)
        if verdict.ok:  # a TDX trailer that shrinks or grows changes only its own count
            assert unread, f"{name}: accepted {len(changed)} of {end} bytes"
            count = {"trailing_bytes": original.claims["trailing_bytes"]} if chosen.kind in quotes else {}
            assert {**verdict.claims, **count} == original.claims


def with_pck_chain(quote: bytes, chain: bytes) -> bytes:
    return dataclasses.replace(parse_tdx_quote(quote), pck_chain=chain).to_bytes()


def test_a_pck_chain_with_text_besides_its_certificates_is_malformed(lab: LabAuthority) -> None:
    quote = lab.tdx_quote(bytes(64), mrtd=bytes(48))
    chain = parse_tdx_quote(quote).pck_chain_pem
    policy = Policy(roots=("lab",), lab_dir=lab.directory)
    assert verify(with_pck_chain(quote, chain + b"\n\t\0"), policy).ok
    for changed in (
        chain + b"trailing words",
        b"a header\n" + chain,
        chain.replace(b"-----\n", b"----- x\n", 1),
    ):
        verdict = verify(with_pck_chain(quote, changed), policy)
        assert not verdict.ok and "malformed" in verdict.codes and "pck_chain" in verdict.fields()


def test_a_pck_chain_carrying_a_certificate_off_its_chain_is_refused(lab: LabAuthority) -> None:
    quote = lab.tdx_quote(bytes(64), mrtd=bytes(48))
    chain = parse_tdx_quote(quote).pck_chain_pem
    policy = Policy(roots=("lab",), lab_dir=lab.directory)
    stranger = lab.enclave_chain()[1].pem().encode()  # any certificate the PCK chain does not need
    verdict = verify(with_pck_chain(quote, chain + stranger), policy)
    assert verdict.codes == {"chain-invalid"} and "not on the PCK certificate's chain" in str(verdict.reasons)


def test_a_certificate_whose_signature_declares_unused_bits_is_malformed() -> None:
    """cryptography ignores the count: the same certificate in another encoding would verify."""
    vcek = VENDOR["snp:snp:vcek.der"]
    signature = asn1_x509.Certificate.load(vcek.data)["signature_value"].contents  # unused-bit count first
    changed = bytearray(vcek.data)
    changed[len(vcek.data) - len(signature)] = 1
    verdict = vcek.check(bytes(changed))
    assert not verdict.ok and "malformed" in verdict.codes and "unused bits" in str(verdict.reasons)
