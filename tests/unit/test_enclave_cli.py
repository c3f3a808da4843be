"""``teelab enclave build`` and ``teelab enclave describe-eif``: output, exit codes, nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import harness.cli as cli


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "bzImage").write_bytes(b"kernel" * 500)
    (tmp_path / "init.cpio").write_bytes(b"init" * 300)
    (tmp_path / "app.cpio").write_bytes(b"app" * 300)
    (tmp_path / "custom.json").write_text(json.dumps({"purpose": "demo"}))
    return tmp_path


def build_small(run, files: Path) -> Path:
    """``teelab enclave build`` of the small image ``files/a.eif`` (kernel, cmdline, one ramdisk)."""
    eif = files / "a.eif"
    args = ["--kernel", str(files / "bzImage"), "--cmdline", "x", "--ramdisk", str(files / "init.cpio")]
    status, _, err = run("enclave", "build", *args, "--output", str(eif))
    assert status == 0, err
    return eif


@pytest.mark.parametrize(
    "argv",
    [
        ["build", "--kernel", "k", "--cmdline", "c", "--ramdisk", "r", "--output", "o"],
        ["describe-eif", "x.eif"],
        ["build-image", "hello"],
        ["boot", "x.eif"],
    ],
)
def test_the_enclave_commands_are_registered(argv: list[str]) -> None:
    assert callable(cli.build_parser().parse_args(["enclave", *argv]).func)


def test_build_prints_describe_json_and_describe_agrees(run, files: Path) -> None:
    status, out, _ = run(
        "enclave",
        "build",
        "--kernel",
        str(files / "bzImage"),
        "--cmdline",
        "console=ttyS0",
        "--ramdisk",
        str(files / "init.cpio"),
        "--ramdisk",
        str(files / "app.cpio"),
        "--name",
        "app",
        "--version",
        "3",
        "--metadata",
        str(files / "custom.json"),
        "--output",
        str(files / "app.eif"),
    )
    assert status == 0
    built = json.loads(out)
    assert (
        built["ImageName"] == "app"
        and built["ImageVersion"] == "3"
        and built["Metadata"]["purpose"] == "demo"
    )
    status, out, _ = run("enclave", "describe-eif", str(files / "app.eif"), "--json")
    assert status == 0 and json.loads(out) == built


def test_describe_prints_a_table_by_default(run, files: Path) -> None:
    build_small(run, files)
    status, out, _ = run("enclave", "describe-eif", str(files / "a.eif"))
    pcr0 = json.loads(run("enclave", "describe-eif", str(files / "a.eif"), "--json")[1])["Measurements"][
        "PCR0"
    ]
    assert status == 0
    assert "PCR0" in out and pcr0[:16] in out.replace("\n", "").replace("│", "").replace(" ", "")
    assert "ramdisk" in out and "signed" in out


def test_a_corrupted_image_exits_2_with_the_code_and_a_hint(run, files: Path) -> None:
    build_small(run, files)
    data = bytearray((files / "a.eif").read_bytes())
    data[-1] ^= 0xFF
    (files / "a.eif").write_bytes(data)
    status, out, err = run("enclave", "describe-eif", str(files / "a.eif"))
    assert status == 2 and out == ""
    assert err.startswith("[ E906 ]") and "hint:" in err
    status, out, _ = run("enclave", "describe-eif", str(files / "a.eif"), "--json")
    assert status == 2 and json.loads(out)["error"]["code"] == "E906"
    status, out, _ = run("enclave", "describe-eif", str(files / "a.eif"), "--json", "--ignore-crc")
    assert status == 0 and json.loads(out)["CheckCRC"] is False


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--ramdisk", "missing.cpio"], "E913"),
        (["--ramdisk", "init.cpio", "--private-key", "init.cpio"], "E914"),
        (["--ramdisk", "init.cpio", "--metadata", "init.cpio"], "E913"),
    ],
)
def test_bad_build_input_exits_2_and_writes_nothing(
    run, files: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], code: str
) -> None:
    monkeypatch.chdir(files)
    before = sorted(p.name for p in files.iterdir())
    status, out, err = run(
        "enclave", "build", "--kernel", "bzImage", "--cmdline", "x", *extra, "--output", "out.eif"
    )
    assert status == 2 and out == "" and err.startswith(f"[ {code} ]") and "hint:" in err
    assert sorted(p.name for p in files.iterdir()) == before


def test_a_missing_image_exits_2(run, files: Path) -> None:
    status, _, err = run("enclave", "describe-eif", str(files / "none.eif"))
    assert status == 2 and err.startswith("[ E913 ]")


def test_the_benchmarks_report_their_figures() -> None:
    from harness.bench.enclave import bench_eif, bench_nsm

    eif = bench_eif(ramdisk_mib=1, runs=2).to_dict()
    assert len(eif["samples"]) == 2 and eif["image_mib"] == 11.0 and eif["build_median_s"] > 0
    nsm = bench_nsm(requests=3).to_dict()
    assert len(nsm["samples"]) == 3 and nsm["extend_pcr_median_us"] > 0 and nsm["bars"][0]["limit"] == 20.0
