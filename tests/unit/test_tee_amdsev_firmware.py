"""Debian's AmdSev OVMF (ovmf-amdsev 2026.08+ds-2, the firmware the Ansible role provisions on snp hosts)
hashes the kernel: the real SNP backend takes it, and the expected launch digest comes from sev-snp-measure
with kernel, initrd and command line, as SEV-SNP hardware computes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from qemu_hosts import snp_host
from sevsnpmeasure.guest import calc_launch_digest
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vmm_types import VMMType

from harness import paths
from harness.images.errors import KernelFetchFailed
from harness.images.kernel import fetch_deb, unpack_file
from harness.images.recipe import KernelPin
from harness.qemu import VMSpec
from harness.tee.measure import METHOD_SEV_SNP_MEASURE, snp_firmware_measures, snp_vcpu_signature
from harness.tee.platforms import SnpBackend

DEBIAN_AMDSEV = KernelPin(
    "ovmf-amdsev", "2026.08+ds-2", "92c9b6d15e4eeb371938c3f99080c1a8fc057dfd6bc0509d37f8b615e9edebfb", "sid"
)


@pytest.fixture(scope="module")
def amdsev_ovmf() -> Path:
    cache = paths.cache_dir() / "firmware"
    try:
        deb = fetch_deb(DEBIAN_AMDSEV, cache)
    except KernelFetchFailed as exc:
        pytest.skip(f"the pinned ovmf-amdsev package is not available here: {exc.message}")
    return unpack_file(deb, "usr/share/ovmf/OVMF.amdsev.fd", cache)


def test_debians_amdsev_ovmf_measures_kernel_initrd_and_command_line(
    amdsev_ovmf: Path, tmp_path: Path
) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.cpio"
    kernel.write_bytes(b"kernel" * 1000)
    initrd.write_bytes(b"initrd" * 1000)
    spec = VMSpec(name="snp", kernel=kernel, initrd=initrd, cmdline="console=ttyS0", vcpus=2, memory_mib=2048)
    assert snp_firmware_measures(amdsev_ovmf, kernel=True)
    attachment = SnpBackend(firmware=amdsev_ovmf).attach(spec, snp_host())
    measurement = attachment.measurement
    assert measurement is not None and measurement.method == METHOD_SEV_SNP_MEASURE
    signature = snp_vcpu_signature("EPYC-v4")
    expected = calc_launch_digest(
        SevMode.SEV_SNP, 2, signature, str(amdsev_ovmf), str(kernel), str(initrd), "console=ttyS0", 0x1, "",
        vmm_type=VMMType.QEMU,
    )  # fmt: skip
    assert measurement.measurement == expected
    other = SnpBackend(firmware=amdsev_ovmf).attach(
        dataclasses.replace(spec, cmdline="console=ttyS1"), snp_host()
    )
    assert other.measurement is not None and other.measurement.measurement != expected
