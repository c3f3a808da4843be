"""Ordinary mistakes on the command line get their own error code and exit 2, print no traceback and leave
nothing behind; an internal fault is still a failure (exit 1), not dressed up as bad input."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

NOT_UTF8 = b"\xff\xfe not text"
VECTORS = Path(__file__).resolve().parents[1] / "vectors"

# (argv with {d} for the folder of bad inputs, the code expected). Each is one mistake a person makes.
ROWS = [
    # usage: argparse's own refusals are coded too
    ("nosuch", "E102"),
    ("bench boot -n x", "E102"),
    ("bench boot -n 0", "E102"),
    ("bench boot -n -1", "E102"),
    ("bench boot -n 1000000000000000000000000000000", "E102"),
    ("bench boot -n ²", "E102"),
    ("bench boot --vcpus 0", "E102"),
    ("bench image -n 0", "E102"),
    ("bench tee -n 0", "E102"),
    ("bench tee -n -5", "E102"),
    ("bench eif --ramdisk-mib -1", "E102"),
    ("bench nsm -n 0", "E102"),
    ("bench enclave -n 0", "E102"),
    ("explain nosuch", "E102"),
    ("explain E99999999999999999999", "E102"),
    ("doctor --root {d}/missing", "E102"),
    ("doctor --root {d}/file", "E102"),
    ("measure --kind snp --vcpus 0 --kernel {d}/file", "E102"),
    ("measure --kind snp --kernel {d}/missing", "E951"),
    ("measure --kind snp --kernel {d}", "E951"),
    ("enclave boot {d}/file --timeout -1", "E102"),
    ("enclave boot {d}/file --timeout nan", "E102"),
    ("enclave boot {d}/file --timeout inf", "E102"),
    # names that are not recipes
    ("image build nosuch", "E501"),
    ("image build ../etc", "E501"),
    ("bench image --image nosuch --no-cold -n 1", "E501"),
    ("enclave build-image nosuch", "E930"),
    ("enclave build-image ../../etc", "E930"),
    # files: missing, directories, not what they must be
    ("enclave describe-eif {d}/missing", "E913"),
    ("enclave describe-eif {d}", "E913"),
    ("enclave describe-eif {d}/file", "E901"),
    ("enclave describe-eif {d}/not-utf8", "E901"),
    ("enclave boot {d}/missing", "E913"),
    ("enclave boot {d}/file --vcpus 3", "E933"),
    ("enclave build --kernel {d}/missing --cmdline x --ramdisk {d}/file --output {d}/out.eif", "E913"),
    ("enclave build --kernel {d} --cmdline x --ramdisk {d}/file --output {d}/out.eif", "E913"),
    ("enclave build --kernel {d}/file --cmdline x --ramdisk {d} --output {d}/out.eif", "E913"),
    ("enclave build --kernel {d}/file --cmdline x --ramdisk {d}/file --output {d}", "E915"),
    ("enclave build --kernel {d}/file --cmdline x --ramdisk {d}/file --output {d}/missing/out.eif", "E915"),
    (
        "enclave build --kernel {d}/file --cmdline x --ramdisk {d}/file --output {d}/out.eif "
        "--metadata {d}/not-utf8",
        "E913",
    ),
    (
        "enclave build --kernel {d}/file --cmdline x --ramdisk {d}/file --output {d}/out.eif "
        "--metadata {d}/number.json",
        "E913",
    ),
    (
        "enclave build --kernel {d}/file --cmdline x --ramdisk {d}/file --output {d}/out.eif "
        "--signing-certificate {d}/file --private-key {d}/not-utf8",
        "E914",
    ),
    # attestation: policies, times, files and directories
    ("attest verify {d}/report.bin --policy {d}/not-utf8", "E810"),
    ("attest verify {d}/report.bin --policy {d}/max-age-inf.toml", "E810"),
    ("attest verify {d}/report.bin --policy {d}/max-age-nan.toml", "E810"),
    ("attest verify {d}/report.bin --policy {d}/max-age-huge.toml", "E810"),
    ("attest verify {d}/report.bin --policy {d}/policy.toml --at 0001-01-01T00:00:00", "E102"),
    ("attest verify {d}/report.bin --policy {d}/policy.toml --at 9999-12-31T23:59:59", "E102"),
    ("attest verify {d}/report.bin --policy {d}/policy.toml --at yesterday", "E102"),
    ("attest verify {d}/report.bin --policy {d}/policy.toml --lab-dir {d}/file", "E104"),
    ("attest verify {d}/missing --policy {d}/policy.toml", "E830"),
    ("attest verify {d} --policy {d}/policy.toml", "E830"),
    ("attest show {d}/file", "E804"),
    ("attest lab --lab-dir {d}/file", "E104"),
    ("attest lab --export {d}/file", "E830"),
    ("attest roots --lab-dir {d}/file", "E104"),
    ("attest issue snp --out {d}", "E830"),
    ("attest issue snp --out {d}/missing/report.bin", "E830"),
    ("attest issue snp --out {d}/report-out.bin --lab-dir {d}/file/sub", "E104"),
]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "file").write_bytes(b"not an image of any kind")
    (folder / "not-utf8").write_bytes(NOT_UTF8)
    (folder / "number.json").write_text("5\n")
    (folder / "report.bin").write_bytes((VECTORS / "snp" / "report.bin").read_bytes())
    (folder / "policy.toml").write_text('roots = ["amd-milan"]\n')
    for name, value in (("inf", "inf"), ("nan", "nan"), ("huge", "1e300")):
        (folder / f"max-age-{name}.toml").write_text(f"max_age = {value}\n")
    return folder


@pytest.fixture
def watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], set[Path]]:
    """Everything under a private state dir, runtime dir and TMPDIR, listed."""
    roots = {name: tmp_path / name for name in ("state", "rt", "tmp")}
    for root in roots.values():
        root.mkdir()
    monkeypatch.setenv("TEELAB_STATE_DIR", str(roots["state"]))
    monkeypatch.setenv("TEELAB_RUNTIME_DIR", str(roots["rt"]))
    monkeypatch.setenv("TMPDIR", str(roots["tmp"]))
    monkeypatch.setattr("tempfile.tempdir", str(roots["tmp"]))
    return lambda: {p for root in roots.values() for p in root.rglob("*")}


@pytest.mark.parametrize(("argv", "code"), ROWS, ids=[row[0] for row in ROWS])
def test_a_mistake_gets_its_code_exit_2_and_leaves_nothing(
    run: Callable[..., tuple[int, str, str]],
    inputs: Path,
    watched: Callable[[], set[Path]],
    argv: str,
    code: str,
) -> None:
    before, inputs_before = watched(), set(inputs.rglob("*"))
    status, out, err = run(*argv.format(d=inputs).split())
    assert status == 2, (out, err)
    assert f"[ {code} ]" in err, err
    assert "Traceback" not in out + err
    assert watched() - before == set()
    assert set(inputs.rglob("*")) == inputs_before


def test_json_mode_reports_the_code_as_json(run: Callable[..., tuple[int, str, str]], inputs: Path) -> None:
    status, out, _ = run("enclave", "describe-eif", str(inputs / "missing"), "--json")
    assert status == 2
    assert '"code": "E913"' in out


INTERNAL_FAULT = """
import sys
import harness.cli.doctor as doctor
def probe(root):
    raise RuntimeError("injected internal fault")
doctor.probe = probe
from harness.cli import main
sys.exit(main(["doctor"]))
"""


def test_an_internal_fault_is_exit_1_with_its_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-c", INTERNAL_FAULT],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "RuntimeError: injected internal fault" in done.stderr
