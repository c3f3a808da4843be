"""The real SEV-SNP and TDX backends with what real hosts are given: SNP on hugetlbfs with an ID block, TDX
with raw attributes, owner values and a Unix QGS socket; one spec carries them to the real backend and to the
emulated one alike (whose quote carries the owner values too)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from qemu_hosts import snp_host, tcg_host, tdx_host

from harness.attest.tdx import parse_tdx_quote
from harness.host.model import HugepagePool, HugetlbfsMount
from harness.qemu import MemoryBackendFile, SevSnpGuest, TdxGuest, VMSpec
from harness.qemu.objects import TD_DEBUG, TD_PERFMON, TD_SEPT_VE_DISABLE
from harness.tee.platforms import EmulatedTdxBackend, SnpBackend, TdxBackend, backend_for_spec

FIXTURES = Path(__file__).resolve().parents[1] / "vectors" / "snp-measure" / "fixtures"
MRCONFIGID = hashlib.sha384(b"config").digest()
MROWNER = hashlib.sha384(b"owner").digest()


@pytest.fixture
def guest(tmp_path: Path) -> VMSpec:
    for name in ("vmlinuz", "initrd"):
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "OVMF.fd").write_bytes(b"tdvf")
    return VMSpec(name="cvm", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd",
                  cmdline="console=ttyS0", vcpus=2, memory_mib=2048)  # fmt: skip


def test_real_snp_keeps_a_hugetlbfs_backend_and_passes_the_id_block(guest: VMSpec, tmp_path: Path) -> None:
    host = replace(snp_host(), hugepages=(HugepagePool(2048, 0, 1100, 1100),),
                   hugetlbfs=(HugetlbfsMount(str(tmp_path), 2048),))  # fmt: skip
    memory = MemoryBackendFile("ram1", 2048, mem_path=tmp_path)
    firmware = FIXTURES / "ovmf_AmdSev_suffix.bin"
    backend = SnpBackend(firmware=firmware, id_block=bytes(96), id_auth=bytes(4096), author_key_enabled=True)
    configured = backend.attach(replace(guest, memory=memory), host).spec
    assert configured.memory == memory
    assert isinstance(configured.confidential, SevSnpGuest)
    assert configured.confidential.id_block == bytes(96) and configured.confidential.author_key_enabled


def test_real_tdx_takes_raw_attributes_owner_values_and_a_unix_qgs(guest: VMSpec, tmp_path: Path) -> None:
    attributes = TD_DEBUG | TD_SEPT_VE_DISABLE | TD_PERFMON
    backend = TdxBackend(firmware=tmp_path / "OVMF.fd", attributes=attributes, mrconfigid=MRCONFIGID,
                         mrowner=MROWNER, quote_generation_socket=Path("/run/qgs.sock"))  # fmt: skip
    spec = backend.attach(guest, tdx_host()).spec
    assert isinstance(spec.confidential, TdxGuest) and spec.confidential.td_attributes == attributes
    tdx_object = json.loads(spec.confidential.args()[1])
    assert tdx_object["attributes"] == attributes
    assert tdx_object["quote-generation-socket"] == {"type": "unix", "path": "/run/qgs.sock"}


def test_one_tdx_spec_runs_real_there_and_emulated_here_with_the_same_owner_values(guest: VMSpec) -> None:
    tdx = TdxGuest(attributes=TD_SEPT_VE_DISABLE | TD_PERFMON, mrconfigid=MRCONFIGID, mrowner=MROWNER,
                   quote_generation_socket=Path("/run/qgs.sock"))  # fmt: skip
    spec = replace(guest, confidential=tdx)
    real = backend_for_spec(spec, tdx_host(), firmware=guest.kernel)
    assert isinstance(real, TdxBackend)
    assert (real.attributes, real.mrconfigid, real.quote_generation_socket) == (
        TD_SEPT_VE_DISABLE | TD_PERFMON,
        MRCONFIGID,
        Path("/run/qgs.sock"),
    )
    emulated = backend_for_spec(spec, tcg_host())
    assert isinstance(emulated, EmulatedTdxBackend) and emulated.mrowner == MROWNER
    processor = emulated.processor(spec, emulated.expected(spec))
    answer = processor.answer({"v": 1, "id": 7, "op": "tdx-quote", "report_data": bytes(64)})
    body = parse_tdx_quote(answer["quote"]).body
    assert (body.mrconfigid, body.mrowner, body.mrownerconfig) == (MRCONFIGID, MROWNER, bytes(48))
    assert body.td_attributes_value == TD_SEPT_VE_DISABLE | TD_PERFMON
