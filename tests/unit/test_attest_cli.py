"""`teelab attest verify|show|roots|lab|issue`: exit 0 only for evidence that holds; every reason printed."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from harness.cli import main

VECTORS = Path(__file__).parents[1] / "vectors"


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_issue_then_verify_lab_evidence_against_a_lab_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evidence = tmp_path / "report.bin"
    assert main(["attest", "issue", "snp", "--out", str(evidence), "--measurement", "aa" * 48]) == 0
    good = write_policy(tmp_path, f'roots = ["lab"]\nmeasurement = "{"aa" * 48}"\n')
    capsys.readouterr()
    assert main(["attest", "verify", str(evidence), "--policy", str(good)]) == 0
    assert "VERIFIED snp evidence, root: lab" in capsys.readouterr().out


def test_a_refused_verdict_exits_1_and_prints_every_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evidence = tmp_path / "quote.bin"
    assert main(["attest", "issue", "tdx", "--out", str(evidence), "--debug"]) == 0
    strict = write_policy(tmp_path, f'roots = ["intel-sgx"]\nmrtd = "{"bb" * 48}"\n')
    capsys.readouterr()
    assert main(["attest", "verify", str(evidence), "--policy", str(strict), "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert not verdict["ok"] and verdict["root"] == "lab"
    assert {r["code"] for r in verdict["reasons"]} == {"untrusted-root", "debug-not-allowed", "mrtd-mismatch"}
    assert main(["attest", "verify", str(evidence), "--policy", str(strict)]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "[td_attributes]" in out and "mrtd-mismatch [mrtd]" in out


def test_vendor_evidence_in_hex_or_base64_with_certificates_and_a_pinned_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    amd = write_policy(tmp_path, 'roots = ["amd-milan"]\n')
    hexed = tmp_path / "report.hex"
    hexed.write_text((VECTORS / "snp" / "report.bin").read_bytes().hex().upper())
    vcek = str(VECTORS / "snp" / "vcek.der")
    assert main(["attest", "verify", str(hexed), "--policy", str(amd), "--cert", vcek]) == 0
    nitro = tmp_path / "doc.b64"
    nitro.write_bytes(base64.b64encode((VECTORS / "nitro" / "attestation_doc.bin").read_bytes()))
    aws = write_policy(tmp_path, 'roots = ["aws-nitro"]\nmax_age = 600\n')
    assert main(["attest", "verify", str(nitro), "--policy", str(aws), "--at", "2025-12-25T13:20:00Z"]) == 0
    assert main(["attest", "verify", str(nitro), "--policy", str(aws)]) == 1
    tdx = write_policy(tmp_path, "")
    quote, collateral = VECTORS / "tdx" / "quote.bin", VECTORS / "tdx" / "collateral.json"
    capsys.readouterr()
    assert (
        main(
            [
                "attest",
                "verify",
                str(quote),
                "--policy",
                str(tdx),
                "--collateral",
                str(collateral),
                "--at",
                "2025-06-20T00:00:00Z",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["claims"]["tcb"]["status"] == "UpToDate"


def test_show_decodes_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attest", "show", str(VECTORS / "snp" / "report.bin"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "snp" and shown["fields"]["measurement"].startswith("7a1e5c26")
    assert main(["attest", "show", str(VECTORS / "tdx" / "quote.bin")]) == 0
    assert "mrtd: 91eb2b44" in capsys.readouterr().out


def test_roots_lists_the_vendor_roots_and_the_lab(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attest", "lab", "--json"]) == 0
    capsys.readouterr()
    assert main(["attest", "roots", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows if r["kind"] != "tpm"] == [  # the TPM root comes with the first vTPM
        "amd-milan",
        "amd-genoa",
        "intel-sgx",
        "aws-nitro",
        "lab",
        "lab",
        "lab",
    ]


def test_bad_input_exits_2_with_a_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = write_policy(tmp_path, "")
    assert main(["attest", "verify", str(tmp_path / "absent.bin"), "--policy", str(policy)]) == 2
    assert "E830" in capsys.readouterr().err
    bad = write_policy(tmp_path, 'measurement = "12"\n')
    assert main(["attest", "verify", str(VECTORS / "snp" / "report.bin"), "--policy", str(bad)]) == 2
    assert "E810" in capsys.readouterr().err
    assert (
        main(
            [
                "attest",
                "verify",
                str(VECTORS / "snp" / "report.bin"),
                "--policy",
                str(policy),
                "--at",
                "yesterday",
            ]
        )
        == 2
    )
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\xff" * 10)
    assert main(["attest", "show", str(garbage)]) == 2
    assert "E804" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{not json", "[" * 100_000])
def test_collateral_that_is_not_json_exits_2_with_a_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    policy = write_policy(tmp_path, "")
    collateral = tmp_path / "collateral.json"
    collateral.write_text(text)
    quote = str(VECTORS / "tdx" / "quote.bin")
    assert main(["attest", "verify", quote, "--policy", str(policy), "--collateral", str(collateral)]) == 2
    assert "E830" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["snp", "tdx", "nitro"])
def test_issue_to_an_unwritable_place_is_a_coded_error_leaving_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    for out in (tmp_path / "missing-dir" / "evidence.bin", tmp_path):
        assert main(["attest", "issue", kind, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "E830" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_issue_writes_the_report_and_its_certificates_or_neither(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "report.bin.certs").mkdir()  # the certificate table cannot be written
    assert main(["attest", "issue", "snp", "--out", str(tmp_path / "report.bin")]) == 2
    assert "E830" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["report.bin.certs"]
    assert list((tmp_path / "report.bin.certs").iterdir()) == []


def test_roots_lists_the_lab_tpm_root_once_there_is_one(capsys: pytest.CaptureFixture[str]) -> None:
    from harness.attest.tpm_ca import TpmAuthority, default_tpm_dir

    authority = TpmAuthority.load_or_create(default_tpm_dir())
    assert main(["attest", "roots", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "lab", "kind": "tpm", "sha256": authority.anchor().cert.fingerprint}.items() <= next(
        r for r in rows if r["kind"] == "tpm"
    ).items()
