"""Command lines for real SEV-SNP (QEMU >= 9.1) and TDX (QEMU >= 10.1) guests as upstream documents them
(docs/system/i386/amd-memory-encryption.rst and tdx.rst, qapi/qom.json's SevSnpGuestProperties and
TdxGuestProperties): SNP on any memory backend (hugetlbfs included) with an ID block, its authentication and
the author key, reduced-phys-bits in QEMU's range; TDX with raw attributes, MRCONFIGID/MROWNER/MROWNERCONFIG
and the quote generation socket over vsock or a Unix socket. Golden files under tests/golden/qemu/."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from qemu_hosts import snp_host, tdx_host
from test_qemu_argv import CONSOLE, QMP, assert_golden, boot, plain

from harness.host.model import HostInfo, HugepagePool, HugetlbfsMount
from harness.qemu import build_argv
from harness.qemu.errors import OptionInvalid
from harness.qemu.objects import (
    TD_DEBUG,
    TD_PERFMON,
    TD_PKS,
    TD_SEPT_VE_DISABLE,
    MemoryBackend,
    MemoryBackendFile,
    MemoryBackendMemfd,
    MemoryBackendRam,
    SevSnpGuest,
    TdxGuest,
)
from harness.qemu.spec import VMSpec

__all__ = ["boot"]  # the fixture, shared with test_qemu_argv

ID_BLOCK = bytes(range(96))
ID_AUTH = bytes(i % 251 for i in range(4096))
MRCONFIGID = hashlib.sha384(b"config").digest()
MROWNER = hashlib.sha384(b"owner").digest()
MROWNERCONFIG = hashlib.sha384(b"owner config").digest()


def snp_spec(b: dict[str, Path], guest: SevSnpGuest, memory: MemoryBackend | None = None) -> VMSpec:
    memory = memory or MemoryBackendMemfd("ram1", 2048)
    return plain(
        b, memory_mib=2048, memory=memory, confidential=guest, firmware=b["OVMF.fd"], cpu_model="EPYC-v4"
    )


def with_mount(host: HostInfo, path: Path) -> HostInfo:
    """``host`` with a 2 MiB hugetlbfs mount at ``path`` and enough free pages for a 2 GiB guest."""
    return replace(
        host, hugepages=(HugepagePool(2048, 0, 1100, 1100),), hugetlbfs=(HugetlbfsMount(str(path), 2048),)
    )


def test_snp_on_hugetlbfs_with_an_id_block_matches_golden(boot: dict[str, Path], tmp_path: Path) -> None:
    guest = SevSnpGuest(
        host_data=hashlib.sha256(b"host").digest(),
        id_block=ID_BLOCK,
        id_auth=ID_AUTH,
        author_key_enabled=True,
    )
    memory = MemoryBackendFile("ram1", 2048, mem_path=tmp_path / "huge", host_nodes=(0,), policy="bind")
    spec = snp_spec(boot, guest, memory)
    argv = build_argv(spec, with_mount(snp_host(), tmp_path / "huge"), qmp=QMP, console=CONSOLE)
    assert_golden("sev_snp_9.1_hugetlbfs_id_block", argv, tmp_path)
    options = next(a for a in argv if a.startswith("sev-snp-guest,")).split(",")
    assert f"id-block={base64.b64encode(ID_BLOCK).decode()}" in options
    assert f"id-auth={base64.b64encode(ID_AUTH).decode()}" in options
    assert "author-key-enabled=on" in options
    assert any(a.startswith("memory-backend-file,id=ram1,") and "mem-path=" in a for a in argv)


@pytest.mark.parametrize(
    "memory", [MemoryBackendRam("ram1", 2048), MemoryBackendMemfd("ram1", 2048, share=False)], ids=str
)
def test_snp_takes_any_memory_backend_guest_memfd_holds_private_memory(
    boot: dict[str, Path], tmp_path: Path, memory: MemoryBackend
) -> None:
    argv = build_argv(snp_spec(boot, SevSnpGuest(), memory), snp_host(), qmp=QMP, console=CONSOLE)
    assert "confidential-guest-support=sev0" in argv[argv.index("-machine") + 1]


@pytest.mark.parametrize("bits", [1, 5, 63])
def test_snp_reduced_phys_bits_anywhere_in_qemus_range(
    boot: dict[str, Path], tmp_path: Path, bits: int
) -> None:
    argv = build_argv(
        snp_spec(boot, SevSnpGuest(reduced_phys_bits=bits)), snp_host(), qmp=QMP, console=CONSOLE
    )
    assert f"reduced-phys-bits={bits}" in next(a for a in argv if a.startswith("sev-snp-guest,"))


@pytest.mark.parametrize(
    ("guest", "wrong"),
    [
        (SevSnpGuest(reduced_phys_bits=0), "reduced_phys_bits=0 is outside 1..63"),
        (SevSnpGuest(reduced_phys_bits=64), "reduced_phys_bits=64 is outside 1..63"),
        (SevSnpGuest(cbitpos=47), "cbitpos=47 but this host's CPU reports 51"),
        (SevSnpGuest(id_block=bytes(95), id_auth=ID_AUTH), "id_block is 95 bytes, SEV-SNP takes exactly 96"),
        (SevSnpGuest(id_block=ID_BLOCK, id_auth=bytes(4095)), "id_auth is 4095 bytes"),
        (SevSnpGuest(id_block=ID_BLOCK), "an ID block needs its ID authentication structure"),
        (SevSnpGuest(author_key_enabled=True), "id_block is not set"),
        (SevSnpGuest(host_data=bytes(31)), "host_data is 31 bytes"),
    ],
)
def test_snp_options_qemu_would_refuse_are_refused_first(
    boot: dict[str, Path], tmp_path: Path, guest: SevSnpGuest, wrong: str
) -> None:
    with pytest.raises(OptionInvalid, match=wrong.replace("(", r"\(")):
        snp_spec(boot, guest).validate(snp_host())


def tdx_spec(b: dict[str, Path], guest: TdxGuest) -> VMSpec:
    return plain(
        b, memory_mib=2048, memory=MemoryBackendRam("mem0", 2048), confidential=guest, firmware=b["OVMF.fd"]
    )


ALL_ATTRIBUTES = TD_DEBUG | TD_SEPT_VE_DISABLE | TD_PKS | TD_PERFMON


def test_tdx_with_attributes_mr_values_and_a_unix_qgs_matches_golden(
    boot: dict[str, Path], tmp_path: Path
) -> None:
    guest = TdxGuest(
        quote_generation_socket=Path("/var/run/tdx-qgs/qgs.socket"),
        attributes=ALL_ATTRIBUTES,
        mrconfigid=MRCONFIGID,
        mrowner=MROWNER,
        mrownerconfig=MROWNERCONFIG,
    )
    argv = build_argv(tdx_spec(boot, guest), tdx_host(), qmp=QMP, console=CONSOLE)
    assert_golden("tdx_10.1_attributes_mrconfigid_unix_qgs", argv, tmp_path)
    obj = json.loads(argv[argv.index("-object", argv.index("-object") + 1) + 1])
    assert obj["attributes"] == 0x8000_0000_5000_0001 and "sept-ve-disable" not in obj
    assert obj["quote-generation-socket"] == {"type": "unix", "path": "/var/run/tdx-qgs/qgs.socket"}
    assert base64.b64decode(obj["mrconfigid"]) == MRCONFIGID
    assert base64.b64decode(obj["mrowner"]) == MROWNER
    assert base64.b64decode(obj["mrownerconfig"]) == MROWNERCONFIG


def test_tdx_without_a_qgs_in_key_value_form_matches_golden(boot: dict[str, Path], tmp_path: Path) -> None:
    guest = TdxGuest(attributes=TD_SEPT_VE_DISABLE | TD_PERFMON, mrconfigid=MRCONFIGID)
    argv = build_argv(tdx_spec(boot, guest), tdx_host(), qmp=QMP, console=CONSOLE)
    assert_golden("tdx_10.1_attributes_keyval", argv, tmp_path)
    assert (
        f"tdx-guest,id=tdx0,attributes=0x8000000010000000,mrconfigid={base64.b64encode(MRCONFIGID).decode()}"
        in argv
    )


def test_tdx_vsock_qgs_with_attributes(boot: dict[str, Path]) -> None:
    guest = TdxGuest(quote_generation_socket=(2, 4050), attributes=TD_SEPT_VE_DISABLE | TD_DEBUG)
    argv = build_argv(tdx_spec(boot, guest), tdx_host(), qmp=QMP, console=CONSOLE)
    obj = json.loads(next(a for a in argv if a.startswith('{"qom-type":"tdx-guest"')))
    assert obj == {
        "qom-type": "tdx-guest",
        "id": "tdx0",
        "quote-generation-socket": {"type": "vsock", "cid": "2", "port": "4050"},
        "attributes": 0x10000001,
    }
    assert guest.td_attributes == 0x10000001 and TdxGuest(sept_ve_disable=False).td_attributes == 0


@pytest.mark.parametrize(
    ("guest", "wrong"),
    [
        (TdxGuest(attributes=TD_DEBUG), "disagree on bit 28"),
        (TdxGuest(attributes=1 << 64), "do not fit in 64 bits"),
        (TdxGuest(mrowner=bytes(32)), "mrowner is 32 bytes, TDX takes a 48-byte SHA-384 value"),
        (TdxGuest(quote_generation_socket=Path("qgs.sock")), "neither (cid, port) nor an absolute path"),
        (TdxGuest(quote_generation_socket=(0, 4050)), "is not a vsock address"),
    ],
)
def test_tdx_options_that_cannot_work_are_refused(boot: dict[str, Path], guest: TdxGuest, wrong: str) -> None:
    with pytest.raises(OptionInvalid, match=wrong.replace("(", r"\(").replace(")", r"\)")):
        tdx_spec(boot, guest).validate(tdx_host())
