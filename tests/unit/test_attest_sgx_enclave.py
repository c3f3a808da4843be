"""Emulated SGX evidence: MRENCLAVE from an enclave description (the SDM's ECREATE/EADD/EEXTEND blocks),
`teelab measure --kind sgx`, and a guest process getting an SGX quote over its report_data from the emulated
security processor, which verifies with the lab root (and is refused without it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from teelab_guest import evidence, tee_wire
from teelab_guest.tee_wire import Request
from test_tee_processor import port_tree, served

from harness.attest import LAB, LabAuthority, Policy, verify
from harness.cli import main
from harness.tee.errors import EnclaveDescriptionInvalid
from harness.tee.platforms import lab_authority
from harness.tee.processor import SecurityProcessor
from harness.tee.sgx import (
    EnclaveLayout,
    EnclaveRegion,
    SgxIdentity,
    lab_sgx_issuer,
    load_enclave_description,
)

PAGE = 4096
IDENTITY = SgxIdentity(mrenclave=b"\x5a" * 32, mrsigner=b"\x6b" * 32, isv_prod_id=3, isv_svn=2)


def test_mrenclave_is_the_sdm_block_sequence() -> None:
    """One measured RX page and one unmeasured RW page, hashed here block by block from the SDM's layout."""
    code = bytes(range(256)) * 16
    layout = EnclaveLayout(
        size=0x4000,
        ssa_frame_size=1,
        regions=(EnclaveRegion(0x1000, code, "rx"), EnclaveRegion(0x3000, bytes(PAGE), "rw", measured=False)),
    )
    blocks = [b"ECREATE\0" + (1).to_bytes(4, "little") + (0x4000).to_bytes(8, "little") + bytes(44)]
    blocks.append(
        b"EADD\0\0\0\0" + (0x1000).to_bytes(8, "little") + (0x205).to_bytes(8, "little") + bytes(40)
    )
    for chunk in range(16):
        blocks.append(b"EEXTEND\0" + (0x1000 + 256 * chunk).to_bytes(8, "little") + bytes(48))
        blocks.append(code[256 * chunk : 256 * (chunk + 1)])
    blocks.append(
        b"EADD\0\0\0\0" + (0x3000).to_bytes(8, "little") + (0x203).to_bytes(8, "little") + bytes(40)
    )
    assert all(len(block) % 64 == 0 for block in blocks)
    assert layout.mrenclave() == hashlib.sha256(b"".join(blocks)).digest()


def test_mrenclave_of_a_published_layout_is_its_published_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Known answer from the enarx ``sgx`` crate (GitHub enarx/sgx, Apache-2.0, commit 05c571cf,
    src/crypto.rs, test ``long``): a TCS page then two R pages, every byte 0x7B, loaded from offset 0 into a
    16 KiB enclave (SECS.SIZE, the next power of two of three pages) with one SSA page, all measured,
    has MRENCLAVE e90b1123...2e54. That crate's hasher reproduces the ENCLAVEHASH of the Linux SGX selftest
    enclave's SIGSTRUCT (the value EINIT checks the CPU's own measurement against); this value is its
    regression answer for a layout expressible as data, computed here through ``teelab measure``."""
    page = (b"\x7b" * PAGE).hex()
    description = tmp_path / "enarx-long.toml"
    description.write_text(
        "size = 0x4000\nssa_frame_size = 1\n"
        f"[[region]]\noffset = 0\ntype = 'tcs'\npermissions = ''\nhex = '{page}'\n"
        f"[[region]]\noffset = 0x1000\npermissions = 'r'\nhex = '{page * 2}'\n"
    )
    assert main(["measure", "--kind", "sgx", "--enclave", str(description), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mrenclave"] == "e90b112375a3c46a8e89a9826c6c33051df198be09f51b1055ad115a2b7c2e54"
    assert (printed["size"], printed["pages"]) == (0x4000, 3)


def test_mrenclave_changes_with_what_the_cpu_measures_and_only_that() -> None:
    base = EnclaveLayout(
        0x4000, 1, (EnclaveRegion(0, b"a" * PAGE, "rx"), EnclaveRegion(PAGE, bytes(PAGE), "rw"))
    )
    first, heap = base.regions
    variants = [
        EnclaveLayout(0x8000, 1, base.regions),
        EnclaveLayout(0x4000, 2, base.regions),
        EnclaveLayout(0x4000, 1, (EnclaveRegion(0, b"b" * PAGE, "rx"), heap)),
        EnclaveLayout(0x4000, 1, (EnclaveRegion(0, b"a" * PAGE, "rwx"), heap)),
        EnclaveLayout(0x4000, 1, (first, EnclaveRegion(2 * PAGE, bytes(PAGE), "rw"))),
        EnclaveLayout(0x4000, 1, (heap, first)),  # order of EADD matters
    ]
    digests = {layout.mrenclave() for layout in [base, *variants]}
    assert len(digests) == len(variants) + 1
    unmeasured = EnclaveLayout(0x4000, 1, (first, EnclaveRegion(PAGE, bytes(PAGE), "rw", measured=False)))
    other = EnclaveLayout(0x4000, 1, (first, EnclaveRegion(PAGE, b"z" * PAGE, "rw", measured=False)))
    assert unmeasured.mrenclave() == other.mrenclave() != base.mrenclave()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("size = 0x3000\n[[region]]\noffset = 0\nhex = '00'\n", "size"),
        ("size = 0x4000\n[[region]]\noffset = 0x10\nhex = '00'\n", "region[0]"),
        ("size = 0x2000\n[[region]]\noffset = 0x1000\nhex = '00'\npages = 2\n", "region[0]"),
        ("size = 0x4000\n[[region]]\noffset = 0\nhex = '00'\npages = 2\n"
         "[[region]]\noffset = 0x1000\nhex = '00'\n", "region[1]"),
        ("size = 0x4000\n[[region]]\noffset = 0\nhex = '00'\npermissions = 'rq'\n", "region[0]"),
        ("size = 0x4000\n[[region]]\noffset = 0\nhex = '00'\ntype = 'tcs'\npermissions = 'rw'\n",
         "region[0]"),
        ("size = 0x4000\n[[region]]\noffset = 0\nfile = 'missing.bin'\n", "region[0]"),
        ("size = 0x4000\nsigner = 'me'\n[[region]]\noffset = 0\nhex = '00'\n", "signer"),
        ("size = 0x4000\n", "region"),
    ],
)  # fmt: skip
def test_a_bad_enclave_description_is_e958_naming_the_field(tmp_path: Path, text: str, field: str) -> None:
    description = tmp_path / "enclave.toml"
    description.write_text(text)
    with pytest.raises(EnclaveDescriptionInvalid) as caught:
        load_enclave_description(description)
    assert caught.value.code == "E958" and caught.value.evidence["field"] == field


def test_teelab_measure_kind_sgx_hashes_a_description_or_takes_the_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "text.bin").write_bytes(b"\x90" * 5000)  # two pages, zero-padded
    description = tmp_path / "enclave.toml"
    description.write_text(
        "size = 0x10000\nssa_frame_size = 1\n"
        "[[region]]\noffset = 0\ntype = 'tcs'\npermissions = ''\nhex = '00'\n"
        "[[region]]\noffset = 0x1000\nfile = 'text.bin'\npermissions = 'rx'\n"
        "[[region]]\noffset = 0x3000\nhex = ''\npages = 4\npermissions = 'rw'\nmeasure = false\n"
    )
    assert main(["measure", "--kind", "sgx", "--enclave", str(description), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    layout = load_enclave_description(description)
    assert printed == {"kind": "sgx", "mrenclave": layout.mrenclave().hex(), "size": 0x10000, "pages": 7}
    assert main(["measure", "--kind", "sgx", "--mrenclave", "ab" * 32]) == 0
    assert capsys.readouterr().out.split() == ["mrenclave", "ab" * 32]
    for argv in (
        ["--kind", "sgx"],
        ["--kind", "sgx", "--mrenclave", "ab"],
        ["--kind", "snp", "--mrenclave", "ab"],
    ):
        assert main(["measure", *argv]) == 2
        assert "[ E102 ]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def authority() -> LabAuthority:
    return lab_authority()


def _policy(authority: LabAuthority, **pins: object) -> Policy:
    return Policy(roots=(LAB,), lab_dir=authority.directory, **pins)  # type: ignore[arg-type]


def test_an_sgx_quote_request_over_the_port_verifies_with_the_lab_root(authority: LabAuthority) -> None:
    processor = SecurityProcessor("sgx", sgx=lab_sgx_issuer(authority, IDENTITY))
    with served(processor) as (client, _service):
        assert client.call(Request(1, "describe"))["kind"] == "sgx"
        answer = client.call(Request(2, "sgx-quote", report_data=b"\x17" * 64))
        refused = client.call(Request(3, "tdx-quote", report_data=bytes(64)))
    assert refused["ok"] is False and refused["error"] == "unsupported"
    pins = {
        "mrenclave": IDENTITY.mrenclave,
        "mrsigner": IDENTITY.mrsigner,
        "isv_prod_id": 3,
        "min_isv_svn": 2,
    }
    verdict = verify(answer["quote"], _policy(authority, report_data=b"\x17" * 64, **pins))
    assert verdict.ok, verdict.reasons
    assert (verdict.kind, verdict.claims["isv_svn"], verdict.claims["debug"]) == ("sgx", 2, False)
    assert verify(answer["quote"], Policy(lab_dir=authority.directory)).codes == {"untrusted-root"}
    assert verify(answer["quote"], _policy(authority, mrenclave=bytes(32))).codes == {"mrenclave-mismatch"}


def test_a_guest_process_gets_an_sgx_quote_through_get_evidence(
    authority: LabAuthority, tmp_path: Path
) -> None:
    processor = SecurityProcessor("sgx", sgx=lab_sgx_issuer(authority, IDENTITY))
    with served(processor) as (client, _service), port_tree(tmp_path, client.sock):
        result = evidence.get_evidence(b"chosen data", platform=evidence.Platform(str(tmp_path)))
    assert (result.kind, result.source, result.verifiable_remotely) == ("sgx", "emulated", True)
    verdict = verify(result.blob, _policy(authority, report_data=b"chosen data" + bytes(53)))
    assert verdict.ok, verdict.reasons


def test_the_wire_refuses_a_malformed_sgx_request() -> None:
    for message in (
        {"v": 1, "id": 1, "op": "sgx-quote", "report_data": bytes(63)},
        {"v": 1, "id": 1, "op": "sgx-quote", "report_data": bytes(64), "vmpl": 0},
        {"v": 1, "id": 1, "op": "sgx-quote"},
    ):
        with pytest.raises(tee_wire.WireError) as caught:
            tee_wire.parse_request(message)
        assert caught.value.code == "bad-request"
    assert (
        tee_wire.parse_request({"v": 1, "id": 9, "op": "sgx-quote", "report_data": bytes(64)}).op
        == "sgx-quote"
    )
