"""A TDVF's (TDX OVMF's) metadata and the MRTD the TDX module computes from it at launch.

QEMU adds each metadata section to the TD in order (KVM_TDX_INIT_MEM_REGION): every 4 KiB page by
TDH.MEM.PAGE.ADD, and for sections with the MR.EXTEND attribute every 256-byte chunk of the page's data by
TDH.MR.EXTEND right after its page. The TDX module hashes one 128-byte block per PAGE.ADD ("MEM.PAGE.ADD",
GPA at byte 16) and three per MR.EXTEND ("MR.EXTEND", GPA at byte 16, then the 256 bytes); MRTD is the SHA-384
of them all. The metadata is found through OVMF's GUIDed footer table.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from harness.tee.errors import MeasureInputInvalid

FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le  # OVMF table footer
TDX_METADATA_OFFSET_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le
TDX_METADATA_GUID = uuid.UUID("e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae").bytes_le
FOOTER_END = 0x20  # the footer GUID ends 32 bytes before the end of the image
DESCRIPTOR = struct.Struct("<4sIII")  # "TDVF", length, version, number of sections
SECTION = struct.Struct("<IIQQII")  # data offset, raw size, GPA, memory size, type, attributes
ATTRIBUTE_MR_EXTEND = 1 << 0
ATTRIBUTE_PAGE_AUG = 1 << 1  # added later by TDH.MEM.PAGE.AUG: not measured
PAGE = 4096
CHUNK = 256


@dataclass(frozen=True)
class TdvfSection:
    """One TDVF metadata section: ``size`` bytes of guest memory at ``gpa``, filled from the image at
    ``data_offset`` (``raw_size`` bytes; the rest zero); ``kind`` is BFV 0, CFV 1, TD_HOB 2, TEMP_MEM 3..."""

    data_offset: int
    raw_size: int
    gpa: int
    size: int
    kind: int
    attributes: int


def tdvf_sections(image: bytes) -> list[TdvfSection]:
    """The metadata sections of a TDVF image; MeasureInputInvalid when it is not one."""
    base = len(image) - _metadata_offset(image)
    if image[base - 16 : base] != TDX_METADATA_GUID:
        raise _not_tdvf("the TDX metadata GUID is not where the table points")
    signature, length, version, count = DESCRIPTOR.unpack_from(image, base)
    if signature != b"TDVF" or version != 1 or length != DESCRIPTOR.size + count * SECTION.size:
        raise _not_tdvf(f"bad TDVF descriptor (signature {signature!r}, version {version}, {count} sections)")
    sections = [
        TdvfSection(*SECTION.unpack_from(image, base + DESCRIPTOR.size + i * SECTION.size))
        for i in range(count)
    ]
    for section in sections:
        if section.gpa % PAGE or section.size % PAGE or section.raw_size > section.size:
            raise _not_tdvf(f"section at {section.gpa:#x}: unaligned, or more data than memory")
        if section.data_offset + section.raw_size > len(image):
            raise _not_tdvf(f"section at {section.gpa:#x}: data past the end of the image")
    return sections


def _metadata_offset(image: bytes) -> int:
    """The TDX metadata's offset from the end of the image, from OVMF's GUIDed footer table (walked from its
    end: each entry is data, u16 length, GUID)."""
    footer = len(image) - FOOTER_END
    if footer < 18 or image[footer - 16 : footer] != FOOTER_GUID:
        raise _not_tdvf("no OVMF GUIDed footer table")
    (table_length,) = struct.unpack_from("<H", image, footer - 18)
    position, start = footer - 18, max(footer - table_length, 0)
    while position - 22 >= start:
        guid = image[position - 16 : position]
        (length,) = struct.unpack_from("<H", image, position - 18)
        if guid == TDX_METADATA_OFFSET_GUID:
            (offset,) = struct.unpack_from("<I", image, position - 22)
            if 16 + DESCRIPTOR.size <= offset <= len(image):
                return int(offset)
            break
        if length < 18:
            break
        position -= length
    raise _not_tdvf("no TDX metadata entry in the footer table")


def tdvf_mrtd(firmware: Path) -> bytes:
    """The MRTD of a TD launched from ``firmware`` (a TDVF) by QEMU: PAGE.ADD and MR.EXTEND, section by
    section, page by page."""
    try:
        image = Path(firmware).read_bytes()
    except OSError as exc:
        raise MeasureInputInvalid(f"cannot read {firmware}: {exc.strerror}", hint="give a TDVF file") from exc
    digest = hashlib.sha384()
    for section in tdvf_sections(image):
        if section.attributes & ATTRIBUTE_PAGE_AUG:
            continue
        data = image[section.data_offset : section.data_offset + section.raw_size].ljust(section.size, b"\0")
        for page in range(0, section.size, PAGE):
            gpa = section.gpa + page
            digest.update(_block(b"MEM.PAGE.ADD", gpa))
            if section.attributes & ATTRIBUTE_MR_EXTEND:
                for chunk in range(0, PAGE, CHUNK):
                    digest.update(_block(b"MR.EXTEND", gpa + chunk))
                    digest.update(data[page + chunk : page + chunk + CHUNK])
    return digest.digest()


def is_tdvf(firmware: Path) -> bool:
    try:
        tdvf_sections(Path(firmware).read_bytes())
    except (MeasureInputInvalid, OSError, struct.error):
        return False
    return True


def _block(operation: bytes, gpa: int) -> bytes:
    return operation.ljust(16, b"\0") + struct.pack("<Q", gpa) + bytes(104)


def _not_tdvf(why: str) -> MeasureInputInvalid:
    return MeasureInputInvalid(
        f"not a TDVF: {why}", hint="give the TDX firmware (OVMF built with TDX support)"
    )
