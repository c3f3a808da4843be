"""Genuine Intel TDX quotes (with and without DCAP collateral) and AWS Nitro attestation documents verify
against the vendor roots with the same code as lab evidence, and are refused by a lab-only policy."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.attest import Policy, parse_tdx_quote, verify

VECTORS = Path(__file__).parents[1] / "vectors"
NO_COLLATERAL = {"allow_missing_collateral": True}
TDX = [  # folder, needs, the TD's debug bit
    ("", NO_COLLATERAL, False),
    ("extra/trustee_v4_exact_length", {"allow_debug": True, **NO_COLLATERAL}, True),
    ("extra/go-tdx-guest_v4_SPR_E4_with_trailer", NO_COLLATERAL, False),
    ("extra/go-tdx-guest_v5", NO_COLLATERAL, False),
    ("extra/phala_v5_outdated", NO_COLLATERAL, False),
]
NITRO = [
    ("", {}),
    ("extra/dstack-attest_prod_userdata", {}),
    ("extra/dstack-attest_debug_mode", {"allow_debug": True}),
]
TDX_AT = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
COLLATERAL_AT = dt.datetime(2025, 6, 20, tzinfo=dt.UTC)  # inside the primary collateral's window


def tdx(folder: str, name: str = "quote.bin") -> bytes:
    return (VECTORS / "tdx" / folder / name).read_bytes()


def collateral(folder: str = "") -> dict:
    return json.loads((VECTORS / "tdx" / folder / "collateral.json").read_text())


@pytest.mark.parametrize(("folder", "needs", "debug"), TDX)
def test_genuine_tdx_quotes_verify_against_the_intel_root(folder: str, needs: dict, debug: bool) -> None:
    verdict = verify(tdx(folder), Policy(**needs), now=TDX_AT)
    assert verdict.ok, verdict.reasons
    assert (verdict.kind, verdict.root, verdict.claims["debug"]) == ("tdx", "intel-sgx", debug)
    assert verdict.claims["mrtd"] == parse_tdx_quote(tdx(folder)).body.mrtd.hex()
    assert any("collateral" in note for note in verdict.notes)


@pytest.mark.parametrize(("folder", "needs", "debug"), TDX)
def test_genuine_tdx_quotes_are_refused_by_a_lab_only_policy(folder: str, needs: dict, debug: bool) -> None:
    verdict = verify(tdx(folder), Policy(roots=("lab",), **needs), now=TDX_AT)
    assert verdict.codes == {"untrusted-root"} and verdict.root == "intel-sgx"


def test_the_genuine_sgx_quote_verifies_with_its_collateral_and_not_for_a_lab_only_policy() -> None:
    quote = (VECTORS / "sgx" / "quote.bin").read_bytes()
    sgx_collateral = json.loads((VECTORS / "sgx" / "collateral.json").read_text())
    statuses = {"tcb_statuses": ("ConfigurationAndSWHardeningNeeded",)}  # Intel's verdict on this platform
    verdict = verify(quote, Policy(**statuses), now=COLLATERAL_AT, collateral=sgx_collateral)  # type: ignore[arg-type]
    assert verdict.ok, verdict.reasons
    assert (verdict.kind, verdict.root, verdict.claims["debug"]) == ("sgx", "intel-sgx", False)
    lab_only = Policy(roots=("lab",), **statuses)  # type: ignore[arg-type]
    refused = verify(quote, lab_only, now=COLLATERAL_AT, collateral=sgx_collateral)
    assert refused.codes == {"untrusted-root"} and refused.root == "intel-sgx"


def test_the_debug_td_is_refused_by_default() -> None:
    verdict = verify(tdx("extra/trustee_v4_exact_length"), Policy(**NO_COLLATERAL), now=TDX_AT)
    assert verdict.codes == {"debug-not-allowed"} and verdict.fields() == {"td_attributes"}


def test_collateral_gives_the_tcb_status_of_platform_qe_and_module() -> None:
    verdict = verify(tdx(""), Policy(), now=COLLATERAL_AT, collateral=collateral())
    assert verdict.ok, verdict.reasons
    tcb = verdict.claims["tcb"]
    assert (tcb["status"], tcb["platform_status"], tcb["qe_status"], tcb["module_status"]) == (
        "UpToDate",
    ) * 4
    assert tcb["fmspc"] == "b0c06f000000" and tcb["tcb_date"] == "2024-03-13T00:00:00Z"


def test_collateral_out_of_its_window_is_expired() -> None:
    verdict = verify(tdx(""), Policy(), now=dt.datetime(2025, 8, 1, tzinfo=dt.UTC), collateral=collateral())
    assert verdict.codes == {"collateral-expired"}
    assert verdict.fields() == {"collateral.tcb_info", "collateral.qe_identity", "collateral.pck_crl"}


def test_a_platform_below_every_tcb_level_is_refused() -> None:
    folder = "extra/phala_v5_outdated"
    verdict = verify(tdx(folder), Policy(), now=TDX_AT, collateral=collateral(folder))
    assert verdict.codes == {"tcb-status"} and verdict.claims["tcb"]["platform_status"] is None


def test_tampered_collateral_is_refused() -> None:
    forged = collateral()
    forged["tcb_info"] = forged["tcb_info"].replace('"tcbStatus":"OutOfDate"', '"tcbStatus":"UpToDate"')
    assert forged["tcb_info"] != collateral()["tcb_info"]
    verdict = verify(tdx(""), Policy(), now=COLLATERAL_AT, collateral=forged)
    assert verdict.codes == {"collateral-signature-invalid"} and verdict.fields() == {"collateral.tcb_info"}
    broken = collateral() | {"qe_identity": "{not json"}
    assert verify(tdx(""), Policy(), now=COLLATERAL_AT, collateral=broken).codes == {"collateral-malformed"}


def _reshaped(key: str, change: Callable[[dict], object]) -> dict:
    body = json.loads(collateral()[key])
    change(body)
    return collateral() | {key: json.dumps(body)}


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("qe_identity", lambda b: b.update(tcbLevels=5)),
        ("qe_identity", lambda b: b["tcbLevels"][0].update(tcb=[1])),
        ("qe_identity", lambda b: b["tcbLevels"][0]["tcb"].update(isvsvn="8")),
        ("tcb_info", lambda b: b.update(tcbLevels=5)),
        ("tcb_info", lambda b: b.update(tdxModuleIdentities=5)),
        ("tcb_info", lambda b: [i.update(tcbLevels=[{"tcb": 3}]) for i in b["tdxModuleIdentities"]]),
        ("tcb_info", lambda b: [level.update(advisoryIDs=5) for level in b["tcbLevels"]]),
        ("tcb_info", lambda b: b.update(issueDate="2025-06-01T00:00:00")),
    ],
)
def test_collateral_of_the_wrong_shape_is_refused_not_raised(
    key: str, change: Callable[[dict], object]
) -> None:
    verdict = verify(tdx(""), Policy(), now=COLLATERAL_AT, collateral=_reshaped(key, change))
    assert not verdict.ok and "collateral-signature-invalid" in verdict.codes


def test_collateral_nested_too_deep_for_json_is_malformed() -> None:
    deep = collateral() | {"tcb_info": "[" * 100_000}
    assert verify(tdx(""), Policy(), now=COLLATERAL_AT, collateral=deep).codes == {"collateral-malformed"}


def test_collateral_for_another_platform_is_refused() -> None:
    other = collateral("extra/phala_v5_outdated")
    verdict = verify(tdx(""), Policy(), now=dt.datetime(2026, 3, 1, tzinfo=dt.UTC), collateral=other)
    assert "collateral-mismatch" in verdict.codes


@pytest.mark.parametrize(("folder", "needs"), NITRO)
def test_genuine_nitro_documents_verify_at_their_own_timestamp(folder: str, needs: dict) -> None:
    data = (VECTORS / "nitro" / folder / "attestation_doc.bin").read_bytes()
    verdict = verify(data, Policy(**needs))  # certificates expired long ago; the document's time is used
    assert verdict.ok, verdict.reasons
    assert (verdict.kind, verdict.root) == ("nitro", "aws-nitro")
    assert verdict.claims["debug"] is bool(needs)
    assert verify(data, Policy(roots=("lab",), **needs)).codes == {"untrusted-root"}


def test_a_nitro_document_older_than_max_age_is_stale() -> None:
    data = (VECTORS / "nitro" / "attestation_doc.bin").read_bytes()
    verdict = verify(data, Policy(max_age=300))
    assert verdict.codes == {"evidence-stale"} and verdict.fields() == {"timestamp"}
    taken = dt.datetime.fromtimestamp(verdict.claims["timestamp"] / 1000, dt.UTC)
    assert verify(data, Policy(max_age=300), now=taken + dt.timedelta(seconds=10)).ok


def test_the_debug_enclave_is_refused_by_default() -> None:
    data = (VECTORS / "nitro" / "extra/dstack-attest_debug_mode" / "attestation_doc.bin").read_bytes()
    assert verify(data, Policy()).codes == {"debug-not-allowed"}
