"""SGX DCAP quotes: the genuine v3 quote with its collateral verifies to the Intel root (time pinned inside
the collateral window), and is refused for stale collateral, a debug enclave, another MRSIGNER and the other
reference values with distinct reasons; lab quotes (v3 and v4) verify with the lab root and lab collateral."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from teelab_guest.binding import report_data
from test_attest_mutations import named, pinned, tdx_mutation

from harness.attest import EvidenceError, LabAuthority, Policy, detect_kind, parse, verify
from harness.attest.errors import IssueError
from harness.attest.sgx import SgxQuote, parse_sgx_quote, sgx_field_spans
from harness.cli import main

VECTORS = Path(__file__).parents[1] / "vectors"
QUOTE = (VECTORS / "sgx" / "quote.bin").read_bytes()
AT = dt.datetime(2025, 6, 20, tzinfo=dt.UTC)  # inside the collateral's window (2025-06-19 .. 2025-07-19)
STATUS = "ConfigurationAndSWHardeningNeeded"  # what Intel's collateral says of this platform
GENUINE = Policy(tcb_statuses=("UpToDate", STATUS))
MRENCLAVE = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
MRSIGNER = bytes.fromhex("815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6")


def collateral(**changes: object) -> dict:
    return json.loads((VECTORS / "sgx" / "collateral.json").read_text()) | changes


def test_the_genuine_quote_parses_and_writes_back_byte_exact() -> None:
    quote = parse_sgx_quote(QUOTE)
    assert quote.to_bytes() == QUOTE and detect_kind(QUOTE) == "sgx"
    assert (quote.version, quote.header.tee_type, quote.trailer) == (3, 0, b"")
    assert (quote.body.mrenclave, quote.body.mrsigner) == (MRENCLAVE, MRSIGNER)
    spans = sgx_field_spans(quote)
    assert sum(size for _, size in spans.values()) == len(QUOTE)
    start, size = spans["mrenclave"]
    assert QUOTE[start : start + size] == MRENCLAVE


def test_the_genuine_quote_verifies_against_the_intel_root_with_its_collateral() -> None:
    verdict = verify(QUOTE, GENUINE, now=AT, collateral=collateral())
    assert verdict.ok, verdict.reasons
    assert (verdict.kind, verdict.root, verdict.claims["debug"]) == ("sgx", "intel-sgx", False)
    claims = verdict.claims
    assert (claims["mrenclave"], claims["mrsigner"]) == (MRENCLAVE.hex(), MRSIGNER.hex())
    assert (claims["isv_prod_id"], claims["isv_svn"], claims["flags"]) == (0, 0, 0x05)
    assert claims["report_data"].startswith(b"Hello, world!".hex())
    assert claims["tcb"]["status"] == STATUS and claims["tcb"]["qe_status"] == "UpToDate"
    assert claims["tcb"]["fmspc"] == "00a067110000" and claims["qe_report"]["isv_prod_id"] == 1


def test_the_genuine_quote_under_the_default_policy_is_refused_for_its_tcb_status() -> None:
    verdict = verify(QUOTE, Policy(), now=AT, collateral=collateral())
    assert verdict.codes == {"tcb-status"} and "INTEL-SA-00615" in str(verdict.reasons)


def test_reference_values_stale_collateral_and_roots_are_refused_with_distinct_reasons() -> None:
    cases = {
        "mrsigner-mismatch": (dataclasses.replace(GENUINE, mrsigner=bytes(32)), AT),
        "mrenclave-mismatch": (dataclasses.replace(GENUINE, mrenclave=bytes(32)), AT),
        "isv-prod-id-mismatch": (dataclasses.replace(GENUINE, isv_prod_id=1), AT),
        "isv-svn-too-low": (dataclasses.replace(GENUINE, min_isv_svn=1), AT),
        "collateral-expired": (GENUINE, dt.datetime(2025, 8, 1, tzinfo=dt.UTC)),
        "untrusted-root": (dataclasses.replace(GENUINE, roots=("lab",)), AT),
    }
    for code, (policy, at) in cases.items():
        verdict = verify(QUOTE, policy, now=at, collateral=collateral())
        assert code in verdict.codes and not verdict.ok, (code, verdict.reasons)
    pinned = dataclasses.replace(
        GENUINE, mrenclave=MRENCLAVE, mrsigner=MRSIGNER, isv_prod_id=0, min_isv_svn=0
    )
    assert verify(QUOTE, pinned, now=AT, collateral=collateral()).ok


def test_a_quote_without_collateral_is_refused_unless_the_policy_allows_it() -> None:
    assert verify(QUOTE, GENUINE, now=AT).codes == {"collateral-missing"}
    allowed = verify(QUOTE, dataclasses.replace(GENUINE, allow_missing_collateral=True), now=AT)
    assert allowed.ok and any("SGX collateral" in note for note in allowed.notes)


def test_tdx_collateral_is_not_sgx_collateral() -> None:
    tdx = json.loads((VECTORS / "tdx" / "collateral.json").read_text())
    verdict = verify(QUOTE, GENUINE, now=AT, collateral=tdx)
    assert "collateral-mismatch" in verdict.codes and "SGX quotes need SGX v3" in str(verdict.reasons)
    qe_as_td_qe = dict(json.loads(collateral()["qe_identity"]), id="TD_QE")
    forged = verify(QUOTE, GENUINE, now=AT, collateral=collateral(qe_identity=json.dumps(qe_as_td_qe)))
    assert {"collateral-signature-invalid", "qe-identity-mismatch"} <= forged.codes


def test_sgx_collateral_is_not_tdx_collateral(lab: LabAuthority) -> None:
    quote = lab.tdx_quote(bytes(64), mrtd=bytes(48))
    verdict = verify(
        quote, Policy(roots=("lab",), lab_dir=lab.directory), collateral=lab.public.sgx_collateral()
    )
    assert "collateral-mismatch" in verdict.codes and "qe-identity-mismatch" in verdict.codes


def test_an_sgx_pin_refuses_evidence_of_other_kinds(lab: LabAuthority) -> None:
    quote = lab.tdx_quote(bytes(64), mrtd=bytes(48))
    policy = Policy(roots=("lab",), lab_dir=lab.directory, isv_prod_id=0)  # 0 is a pin too
    verdict = verify(quote, policy)
    assert verdict.codes == {"policy-kind-mismatch"} and verdict.fields() == {"isv_prod_id"}
    sgx = lab.sgx_quote(bytes(64), mrenclave=bytes(32))
    assert verify(sgx, Policy(roots=("lab",), lab_dir=lab.directory, mrtd=bytes(48))).fields() == {"mrtd"}


@pytest.mark.parametrize("version", [3, 4])
def test_lab_quotes_verify_with_the_lab_root_and_lab_collateral_only(lab: LabAuthority, version: int) -> None:
    quote = lab.sgx_quote(
        b"\x07" * 64, mrenclave=b"\x01" * 32, mrsigner=b"\x02" * 32, isv_prod_id=9, isv_svn=3, version=version
    )
    parsed = parse(quote, "sgx")
    assert isinstance(parsed, SgxQuote) and parsed.to_bytes() == quote and detect_kind(quote) == "sgx"
    assert sum(size for _, size in sgx_field_spans(parsed).values()) == len(quote)
    policy = Policy(
        roots=("lab",), lab_dir=lab.directory, mrenclave=b"\x01" * 32, mrsigner=b"\x02" * 32, isv_prod_id=9
    )
    verdict = verify(quote, policy)
    assert verdict.ok, verdict.reasons
    assert (verdict.root, verdict.claims["version"], verdict.claims["tcb"]["status"]) == (
        "lab",
        version,
        "UpToDate",
    )
    assert verify(quote, Policy(lab_dir=lab.directory)).codes == {"untrusted-root"}


def test_a_debug_lab_enclave_is_refused_unless_allowed(lab: LabAuthority) -> None:
    quote = lab.sgx_quote(bytes(64), mrenclave=bytes(32), debug=True)
    policy = Policy(roots=("lab",), lab_dir=lab.directory)
    verdict = verify(quote, policy)
    assert verdict.codes == {"debug-not-allowed"} and verdict.fields() == {"attributes"}
    allowed = verify(quote, dataclasses.replace(policy, allow_debug=True))
    assert allowed.ok and allowed.claims["debug"] is True


def test_the_lab_binds_a_nonce_and_key_into_report_data(lab: LabAuthority) -> None:
    quote = lab.sgx_quote(report_data(b"nonce", b"key"), mrenclave=bytes(32))
    policy = Policy(roots=("lab",), lab_dir=lab.directory, nonce=b"nonce", public_key=b"key")
    assert verify(quote, policy).ok
    assert verify(quote, dataclasses.replace(policy, nonce=b"other")).codes == {"binding-mismatch"}


def test_bad_headers_name_their_field() -> None:
    for offset, value, field in ((0, 5, "version"), (2, 3, "att_key_type"), (4, 0x7F, "tee_type")):
        changed = bytearray(QUOTE)
        changed[offset] = value
        with pytest.raises(EvidenceError) as caught:
            parse_sgx_quote(bytes(changed))
        assert caught.value.field == field and caught.value.code == "E803"
    with pytest.raises(EvidenceError) as caught:
        parse_sgx_quote(QUOTE[:500])
    assert caught.value.code == "E802"


def test_bad_issue_arguments_are_e821(lab: LabAuthority) -> None:
    for kwargs, field in (
        ({"mrenclave": bytes(31)}, "mrenclave"),
        ({"mrenclave": bytes(32), "isv_svn": 70000}, "isv_svn"),
        ({"mrenclave": bytes(32), "version": 5}, "version"),
    ):
        with pytest.raises(IssueError) as caught:
            lab.sgx_quote(bytes(64), **kwargs)  # type: ignore[arg-type]
        assert caught.value.code == "E821" and caught.value.evidence["field"] == field


def test_the_cli_issues_an_sgx_quote_and_verifies_it_and_the_genuine_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quote = tmp_path / "sgx.bin"
    assert main(["attest", "issue", "sgx", "--out", str(quote), "--measurement", "ab" * 32]) == 0
    policy = tmp_path / "policy.toml"
    policy.write_text(f'roots = ["lab"]\nmrenclave = "{"ab" * 32}"\nisv_prod_id = 0\n')
    capsys.readouterr()
    assert main(["attest", "verify", str(quote), "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "VERIFIED sgx evidence, root: lab" in out and f"mrenclave: {'ab' * 32}" in out
    policy.write_text(f'roots = ["lab"]\nmrenclave = "{"cd" * 32}"\n')
    assert main(["attest", "verify", str(quote), "--policy", str(policy)]) == 1
    assert "mrenclave-mismatch" in capsys.readouterr().out
    intel = tmp_path / "intel.toml"
    intel.write_text(f'tcb_statuses = ["{STATUS}"]\nmrsigner = "{MRSIGNER.hex()}"\n')
    genuine = ["attest", "verify", str(VECTORS / "sgx" / "quote.bin"), "--policy", str(intel)]
    collateral = ["--collateral", str(VECTORS / "sgx" / "collateral.json")]
    assert main([*genuine, *collateral, "--at", "2025-06-20T00:00:00Z"]) == 0
    assert main([*genuine, *collateral, "--at", "2025-08-01T00:00:00Z"]) == 1
    assert "collateral-expired" in capsys.readouterr().out


def sgx_field_cases() -> list[Any]:
    cases = []
    for name in sgx_field_spans(parse_sgx_quote(QUOTE)):
        expect = {"reserved": "signature", "qe_report.reserved": "qe_report_signature"}.get(
            name.rstrip("1234"), name
        )
        cases.append(pytest.param(name, expect, id=name))
    return cases


@pytest.mark.parametrize(("field", "expect"), sgx_field_cases())
def test_every_field_of_the_genuine_quote_changed_is_refused_naming_it(field: str, expect: str) -> None:
    """The policy pins every claim of the untouched quote; each field changed alone is refused, and a reason
    names the field (reserved bytes: the signature that covers them)."""
    original = verify(QUOTE, GENUINE, now=AT, collateral=collateral())
    policy = pinned(original, tcb_statuses=GENUINE.tcb_statuses)
    assert verify(QUOTE, policy, now=AT, collateral=collateral()).ok
    offset, size = sgx_field_spans(parse_sgx_quote(QUOTE))[field]
    verdict = verify(tdx_mutation(QUOTE, field, offset, size), policy, now=AT, collateral=collateral())
    assert not verdict.ok and named(expect, verdict), (field, verdict.reasons)
