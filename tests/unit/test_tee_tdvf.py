"""The MRTD of a TD launched from a TDVF: the TDX module's PAGE.ADD and MR.EXTEND blocks over the firmware's
metadata sections, checked on a built TDVF image byte by byte, and on Debian's real TDVF (ovmf-inteltdx
2026.08+ds-2) against the value an independent implementation (the td-shim tee-info-hash tool's algorithm)
gives for the same file."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from harness import paths
from harness.images.errors import KernelFetchFailed
from harness.images.kernel import fetch_deb, unpack_file
from harness.images.recipe import KernelPin
from harness.qemu import VMSpec
from harness.tee.errors import MeasureInputInvalid
from harness.tee.platforms import TdxBackend
from harness.tee.tdvf import (
    FOOTER_GUID,
    TDX_METADATA_GUID,
    TDX_METADATA_OFFSET_GUID,
    is_tdvf,
    tdvf_mrtd,
    tdvf_sections,
)

DEBIAN_TDVF = KernelPin(
    "ovmf-inteltdx", "2026.08+ds-2", "87123a9bf4dc1af7bbc48257a9b3db5933ff695167476d4fa48b705da1011fb1", "sid"
)
DEBIAN_TDVF_MRTD = (
    "a7a1f751abc454f9cbab198ca8d2edb2821935df525c74182b5e776cb0929e8c59aefecce725b0d08a5e9d3d3183bd08"
)
FIXTURES = Path(__file__).resolve().parents[1] / "vectors" / "snp-measure" / "fixtures"


def build_tdvf(sections: list[tuple[int, int, int, int, int, int]], data: bytes) -> bytes:
    """An image: ``data``, the TDX metadata (GUID, "TDVF" descriptor, sections), then OVMF's footer table
    with the metadata offset entry, ending 32 bytes before the end like OVMF's reset vector area."""
    metadata = TDX_METADATA_GUID + struct.pack("<4sIII", b"TDVF", 16 + 32 * len(sections), 1, len(sections))
    metadata += b"".join(struct.pack("<IIQQII", *section) for section in sections)
    head = data + metadata + bytes(64)
    descriptor_at = len(data) + 16
    footer = bytes(4) + struct.pack("<H", 22) + TDX_METADATA_OFFSET_GUID  # offset filled in below
    footer += struct.pack("<H", 18 + 22) + FOOTER_GUID + bytes(0x20)
    image = bytearray(head + footer)
    struct.pack_into("<I", image, len(head), len(image) - descriptor_at)
    return bytes(image)


def block(operation: bytes, gpa: int) -> bytes:
    """The TDX module's 128-byte measurement block: the operation's name, zero-padded to 16 bytes, the GPA
    as a little-endian u64, zeros."""
    return operation + bytes(16 - len(operation)) + gpa.to_bytes(8, "little") + bytes(104)


def test_mrtd_of_a_built_tdvf_is_the_tdx_modules_blocks(tmp_path: Path) -> None:
    data = os.urandom(2 * 4096)
    sections = [
        (0, 2 * 4096, 0xFFFFE000, 2 * 4096, 0, 1),  # BFV: added and extended
        (0, 0, 0x800000, 4096, 3, 0),  # TEMP_MEM: added, zero
        (0, 0, 0x900000, 2 * 4096, 3, 2),  # PAGE.AUG later: not measured
    ]
    firmware = tmp_path / "tdvf.fd"
    firmware.write_bytes(build_tdvf(sections, data))
    expected = hashlib.sha384()
    for page in range(2):
        gpa = 0xFFFFE000 + page * 4096
        expected.update(block(b"MEM.PAGE.ADD", gpa))
        for chunk in range(16):
            expected.update(block(b"MR.EXTEND", gpa + chunk * 256))
            expected.update(data[page * 4096 + chunk * 256 : page * 4096 + (chunk + 1) * 256])
    expected.update(block(b"MEM.PAGE.ADD", 0x800000))
    assert tdvf_mrtd(firmware) == expected.digest()
    assert [s.kind for s in tdvf_sections(firmware.read_bytes())] == [0, 3, 3]


def test_every_input_moves_the_mrtd(tmp_path: Path) -> None:
    data = bytes(range(256)) * 16
    base = [(0, 4096, 0xFFFFF000, 4096, 0, 1)]
    variants = {
        "base": (base, data),
        "data": (base, data[:-1] + b"\1"),
        "gpa": ([(0, 4096, 0xFFFFE000, 4096, 0, 1)], data),
        "not extended": ([(0, 4096, 0xFFFFF000, 4096, 0, 0)], data),
        "more memory": ([(0, 4096, 0xFFFFF000, 4096, 0, 1), (0, 0, 0x800000, 4096, 3, 0)], data),
    }
    digests = set()
    for name, (sections, payload) in variants.items():
        path = tmp_path / f"{name}.fd"
        path.write_bytes(build_tdvf(sections, payload))
        digests.add(tdvf_mrtd(path))
    assert len(digests) == len(variants)


@pytest.mark.parametrize("name", ["ovmf_OvmfX64_suffix.bin", "ovmf_AmdSev_suffix.bin", "empty", "README.md"])
def test_firmware_without_tdx_metadata_is_refused(name: str) -> None:
    assert not is_tdvf(FIXTURES / name)
    with pytest.raises(MeasureInputInvalid, match="not a TDVF"):
        tdvf_mrtd(FIXTURES / name)


def test_a_table_pointing_outside_the_image_is_refused(tmp_path: Path) -> None:
    image = bytearray(build_tdvf([(0, 4096, 0xFFFFF000, 4096, 0, 1)], bytes(4096)))
    struct.pack_into("<I", image, len(image) - 0x20 - 18 - 22, len(image) + 1)
    (tmp_path / "bad.fd").write_bytes(bytes(image))
    with pytest.raises(MeasureInputInvalid, match="no TDX metadata entry"):
        tdvf_mrtd(tmp_path / "bad.fd")


@pytest.fixture(scope="module")
def debian_tdvf() -> Path:
    """Debian's TDVF from its pinned package (through the builder's private apt configuration, or the
    artifact cache); skipped where neither has it."""
    cache = paths.cache_dir() / "firmware"
    try:
        deb = fetch_deb(DEBIAN_TDVF, cache)
    except KernelFetchFailed as exc:
        pytest.skip(f"the pinned ovmf-inteltdx package is not available here: {exc.message}")
    return unpack_file(deb, "usr/share/ovmf/OVMF.inteltdx.ms.fd", cache)


def test_debians_tdvf_gives_the_mrtd_an_independent_implementation_gives(debian_tdvf: Path) -> None:
    assert tdvf_mrtd(debian_tdvf).hex() == DEBIAN_TDVF_MRTD


def test_the_real_tdx_backend_expects_the_mrtd_of_its_tdvf(debian_tdvf: Path, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    spec = VMSpec(name="td", kernel=kernel, cmdline="console=ttyS0", memory_mib=2048)
    assert TdxBackend(firmware=debian_tdvf).expected_mrtd(spec).hex() == DEBIAN_TDVF_MRTD
    with pytest.raises(MeasureInputInvalid, match="no TDVF"):
        TdxBackend().expected_mrtd(spec)
