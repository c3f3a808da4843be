"""Enclave image files (EIF v4, as nitro-cli writes them): the format, reading and checking, and extracting
the kernel and initrd (building is in eif_build.py).

Layout: a 548-byte big-endian header (magic, version, flags, default memory and vCPUs, num_sections, 32
section offsets and sizes, CRC-32/ISO-HDLC of the whole file except the CRC field), then sections back to
back, each a 12-byte header (type, flags, size) and its data. Large sections are streamed,
never held in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import IO, Any, BinaryIO

from harness.enclave import errors
from harness.enclave.pcrs import ImageMeasurements, PcrHasher, pcr8_of_certificate
from harness.enclave.signing import (
    SIGNATURE_SECTION_MAX_BYTES,
    SignatureEntry,
    check_signature,
    parse_signature_section,
    require_valid_signature,
)

EIF_MAGIC = b".eif"
EIF_VERSION = 4
READABLE_VERSIONS = range(2, EIF_VERSION + 1)
MAX_SECTIONS = 32
MIN_SECTIONS = 2
FLAG_AARCH64 = 0x1
DEFAULT_MEM_BYTES = 1 << 30  # what nitro-cli writes; unused by the loaders
DEFAULT_CPUS = 2
CMDLINE_MAX_BYTES = 64 * 1024
METADATA_MAX_BYTES = 1 << 20
CHUNK_BYTES = 1 << 20

_HEADER = struct.Struct(f">4sHHQQHH{MAX_SECTIONS}Q{MAX_SECTIONS}QII")
SECTION_HEADER_STRUCT = struct.Struct(">HHQ")
HEADER_BYTES = _HEADER.size  # 548
SECTION_HEADER_BYTES = SECTION_HEADER_STRUCT.size  # 12
CRC_OFFSET = HEADER_BYTES - 4


class SectionType(IntEnum):
    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5


class ImageHasher:
    """PCR0-2 of an image from its sections in file order: the kernel and the command line feed PCR0 and PCR1,
    the first ramdisk PCR0 and PCR1, every later ramdisk PCR0 and PCR2, the other sections none."""

    def __init__(self) -> None:
        self.pcr0, self.pcr1, self.pcr2 = PcrHasher(), PcrHasher(), PcrHasher()
        self._ramdisks = 0

    def feeds(self, section_type: SectionType) -> tuple[PcrHasher, ...]:
        """The PCRs the next section, of ``section_type``, feeds."""
        if section_type in (SectionType.KERNEL, SectionType.CMDLINE):
            return (self.pcr0, self.pcr1)
        if section_type is SectionType.RAMDISK:
            self._ramdisks += 1
            return (self.pcr0, self.pcr1 if self._ramdisks == 1 else self.pcr2)
        return ()

    def measurements(self, pcr8: bytes | None = None) -> ImageMeasurements:
        return ImageMeasurements(self.pcr0.value, self.pcr1.value, self.pcr2.value, pcr8)


_SIZE_LIMITS = {
    SectionType.CMDLINE: CMDLINE_MAX_BYTES,
    SectionType.METADATA: METADATA_MAX_BYTES,
    SectionType.SIGNATURE: SIGNATURE_SECTION_MAX_BYTES,
}


@dataclass(frozen=True)
class EifHeader:
    magic: bytes
    version: int
    flags: int
    default_mem: int
    default_cpus: int
    reserved: int
    num_sections: int
    section_offsets: tuple[int, ...]
    section_sizes: tuple[int, ...]
    unused: int
    crc32: int

    @classmethod
    def unpack(cls, data: bytes) -> EifHeader:
        fields = _HEADER.unpack(data)
        n = MAX_SECTIONS
        return cls(
            *fields[:7], tuple(fields[7 : 7 + n]), tuple(fields[7 + n : 7 + 2 * n]), *fields[7 + 2 * n :]
        )

    def pack(self) -> bytes:
        return _HEADER.pack(
            self.magic,
            self.version,
            self.flags,
            self.default_mem,
            self.default_cpus,
            self.reserved,
            self.num_sections,
            *self.section_offsets,
            *self.section_sizes,
            self.unused,
            self.crc32,
        )


@dataclass(frozen=True)
class Section:
    """One section: where its 12-byte header starts, its type and flags, and its data size."""

    index: int
    type: SectionType
    flags: int
    offset: int
    size: int

    @property
    def data_offset(self) -> int:
        return self.offset + SECTION_HEADER_BYTES


@dataclass(frozen=True)
class EifImage:
    """A checked EIF: header, sections, the small sections decoded, measurements and check results."""

    path: Path | None
    header: EifHeader
    sections: tuple[Section, ...]
    cmdline: bytes
    metadata: dict[str, Any] | None
    signature: SignatureEntry | None
    measurements: ImageMeasurements
    computed_crc: int
    signature_problem: str | None

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def crc_ok(self) -> bool:
        return self.computed_crc == self.header.crc32

    @property
    def is_signed(self) -> bool:
        return self.signature is not None

    @property
    def arch(self) -> str:
        return "aarch64" if self.header.flags & FLAG_AARCH64 else "x86_64"

    @property
    def kernel(self) -> Section:
        return next(s for s in self.sections if s.type is SectionType.KERNEL)

    @property
    def ramdisks(self) -> tuple[Section, ...]:
        return tuple(s for s in self.sections if s.type is SectionType.RAMDISK)

    @property
    def size(self) -> int:
        last = self.sections[-1]
        return last.data_offset + last.size

    def require_valid_signature(self, *, now: datetime | None = None) -> None:
        """Raise E912 unless the image is signed, signs its own PCR0, and the certificate is current."""
        if self.signature is None:
            raise errors.EifSignatureMismatch("the image is not signed", hint="build it with a signing key")
        require_valid_signature(self.signature, self.measurements.pcr0, now=now)

    def section_chunks(self, section: Section) -> Iterator[bytes]:
        """A section's data in chunks, read from the image file."""
        if self.path is None:
            raise ValueError("an image read from a stream has no file to read sections from")
        with open(self.path, "rb") as eif:
            eif.seek(section.data_offset)
            left = section.size
            while left:
                chunk = eif.read(min(CHUNK_BYTES, left))
                if not chunk:
                    raise errors.EifTruncated(
                        f"{self.path} shrank while reading section {section.index}",
                        hint="do not change an image while it is in use",
                    )
                left -= len(chunk)
                yield chunk

    def write_kernel(self, dest: Path) -> Path:
        """Write the kernel (bzImage) to ``dest``, for QEMU's -kernel."""
        return self._write_sections(dest, [self.kernel])

    def write_initrd(self, dest: Path) -> Path:
        """Write all ramdisks concatenated in file order to ``dest``, for QEMU's -initrd."""
        return self._write_sections(dest, self.ramdisks)

    def _write_sections(self, dest: Path, sections: Sequence[Section]) -> Path:
        with atomic_output(Path(dest)) as out:
            for section in sections:
                for chunk in self.section_chunks(section):
                    out.write(chunk)
        return Path(dest)


# ------------------------------------------------------------------------------------------------ reading


def read_eif(source: str | os.PathLike[str] | BinaryIO, *, verify_crc: bool = True) -> EifImage:
    """Read and check an EIF from a path or a binary stream.

    Raises an ``EnclaveError`` (E901-E911) naming what is wrong; nothing else escapes for any file content.
    With ``verify_crc=False`` a checksum mismatch is recorded (``crc_ok`` False) instead of raised.
    """
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    try:
        with contextlib.ExitStack() as stack:
            stream = stack.enter_context(open(path, "rb")) if path else source
            return _read(stream, path, verify_crc)
    except OSError as err:
        raise errors.EifInputInvalid(
            f"cannot read the enclave image {path or 'stream'}: {err.strerror or err}",
            hint="give a readable, seekable image file",
            path=str(path),
        ) from None


def _read(stream: IO[bytes], path: Path | None, verify_crc: bool) -> EifImage:
    name = str(path) if path else "the image"
    header, raw_header = _read_header(stream, name)
    crc = zlib.crc32(raw_header[:CRC_OFFSET])
    hasher = ImageHasher()
    sections: list[Section] = []
    kept: dict[SectionType, bytes] = {}
    buffer = bytearray(CHUNK_BYTES)
    for index in range(header.num_sections):
        section, content, crc = _read_section(stream, header, index, name, crc, hasher, buffer)
        sections.append(section)
        if content is not None:
            kept[section.type] = content
    if verify_crc and crc != header.crc32:
        raise errors.EifCrcMismatch(
            f"{name}: the header's CRC-32 is {header.crc32:#010x} but the content gives {crc:#010x}",
            hint="the image was changed or damaged after it was built; rebuild or copy it again",
            expected=f"{header.crc32:#010x}",
            computed=f"{crc:#010x}",
        )
    _check_sections(header, sections, name)
    metadata = _parse_metadata(kept[SectionType.METADATA], name) if SectionType.METADATA in kept else None
    signature = pcr8 = problem = None
    if SectionType.SIGNATURE in kept:
        signature = parse_signature_section(kept[SectionType.SIGNATURE])
        pcr8 = pcr8_of_certificate(signature.certificate_der)
        problem = check_signature(signature, hasher.pcr0.value)
    measurements = hasher.measurements(pcr8)
    return EifImage(
        path,
        header,
        tuple(sections),
        kept[SectionType.CMDLINE],
        metadata,
        signature,
        measurements,
        crc,
        problem,
    )


def _read_header(stream: IO[bytes], name: str) -> tuple[EifHeader, bytes]:
    """The image's header, checked against the file's size, and its raw bytes (the CRC starts there)."""
    file_size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    raw_header = stream.read(HEADER_BYTES)
    if len(raw_header) < HEADER_BYTES:
        raise errors.EifTruncated(
            f"{name} is {file_size} bytes, shorter than the {HEADER_BYTES}-byte EIF header",
            hint="copy the image again",
            file_size=file_size,
        )
    header = EifHeader.unpack(raw_header)
    _check_header(header, file_size, name)
    return header, raw_header


def _read_section(
    stream: IO[bytes],
    header: EifHeader,
    index: int,
    name: str,
    crc: int,
    hasher: ImageHasher,
    buffer: bytearray,
) -> tuple[Section, bytes | None, int]:
    """Section ``index``: its header checked, its content streamed into the CRC and the PCRs that measure it;
    the content itself only for the small sections the image's reader keeps (those with a size limit)."""
    offset, size = header.section_offsets[index], header.section_sizes[index]
    stream.seek(offset)
    raw = stream.read(SECTION_HEADER_BYTES)
    if len(raw) < SECTION_HEADER_BYTES:
        raise errors.EifTruncated(f"{name} ends inside the header of section {index}", hint="copy it again")
    crc = zlib.crc32(raw, crc)
    type_number, flags, header_size = SECTION_HEADER_STRUCT.unpack(raw)
    section_type = _section_type(type_number, index, offset, name)
    if header_size != size:
        raise errors.EifSectionTable(
            f"section {index} ({section_type.name.lower()}) says it is {header_size} bytes, the header's "
            f"table says {size}",
            hint="the image is damaged; rebuild it",
            section=index,
        )
    limit = _SIZE_LIMITS.get(section_type)
    if limit is not None and size > limit:
        raise errors.EifSectionTable(
            f"the {section_type.name.lower()} section is {size} bytes, more than its limit of {limit}",
            hint="the image is damaged; rebuild it",
            section=index,
        )
    feeds = hasher.feeds(section_type)
    keep = bytearray() if limit is not None else None
    left = size
    while left:
        view = memoryview(buffer)[: min(CHUNK_BYTES, left)]
        got = stream.readinto(view)
        if not got:
            raise errors.EifTruncated(f"{name} ends inside section {index}", hint="copy the image again")
        chunk = view[:got]
        crc = zlib.crc32(chunk, crc)
        for pcr in feeds:
            pcr.update(chunk)
        if keep is not None:
            keep += chunk
        left -= got
    section = Section(index, section_type, flags, offset, size)
    return section, None if keep is None else bytes(keep), crc


def _check_sections(header: EifHeader, sections: list[Section], name: str) -> None:
    """The sections every image needs are there, in an order the format allows."""
    present = {s.type for s in sections}
    for required in (SectionType.KERNEL, SectionType.CMDLINE, SectionType.RAMDISK):
        if required not in present:
            raise errors.EifMissingSection(
                f"{name} has no {required.name.lower()} section",
                hint="rebuild the image with a kernel, a cmdline and a ramdisk",
            )
    if header.version >= 4 and SectionType.METADATA not in present:
        raise errors.EifMissingSection(
            f"{name} is EIF version {header.version} but has no metadata section", hint="rebuild the image"
        )
    for position, section in enumerate(sections):
        _check_section_order(section.type, sections[:position], section.index, name)


def _check_header(header: EifHeader, file_size: int, name: str) -> None:
    if header.magic != EIF_MAGIC:
        raise errors.EifBadMagic(
            f"{name} starts with {header.magic!r}, not the EIF magic b'.eif'",
            hint="give an enclave image file (built by `teelab enclave build`)",
            magic=header.magic.hex(),
        )
    if header.version not in READABLE_VERSIONS:
        raise errors.EifUnsupportedVersion(
            f"{name} is EIF version {header.version}; teelab reads versions 2 to {EIF_VERSION}",
            hint="rebuild the image with `teelab enclave build`",
            version=header.version,
        )
    if not MIN_SECTIONS <= header.num_sections <= MAX_SECTIONS:
        raise errors.EifSectionCount(
            f"{name} says it has {header.num_sections} sections; an EIF has {MIN_SECTIONS} to {MAX_SECTIONS}",
            hint="the image is damaged; rebuild it",
            num_sections=header.num_sections,
        )
    expected = HEADER_BYTES
    for index in range(header.num_sections):
        offset, size = header.section_offsets[index], header.section_sizes[index]
        if offset != expected:
            where = (
                "overlaps the previous section"
                if offset < expected
                else f"leaves a gap after byte {expected}"
            )
            if index == 0:
                where = "is not right after the header" if offset > expected else "overlaps the header"
            raise errors.EifSectionTable(
                f"section {index} at offset {offset} {where}",
                hint="the image is damaged; rebuild it",
                section=index,
                offset=offset,
            )
        end = offset + SECTION_HEADER_BYTES + size
        if end >= 1 << 64:
            raise errors.EifSectionTable(
                f"section {index} ({size} bytes at offset {offset}) overflows the 64-bit file space",
                hint="the image is damaged; rebuild it",
                section=index,
                size=size,
            )
        expected = end
    if expected > file_size:
        raise errors.EifTruncated(
            f"{name} is {file_size} bytes but its section table needs {expected}",
            hint="the image was cut short or is damaged; copy or rebuild it",
            needed=expected,
            file_size=file_size,
        )
    if expected < file_size:
        raise errors.EifSectionTable(
            f"{name} has {file_size - expected} bytes after its last section",
            hint="the image is damaged; rebuild it",
            trailing=file_size - expected,
        )


def _section_type(number: int, index: int, offset: int, name: str) -> SectionType:
    if number == SectionType.INVALID or number not in SectionType._value2member_map_:
        raise errors.EifUnknownSection(
            f"section {index} of {name} (offset {offset}) has type {number}",
            hint="the image is damaged or was built by an unknown tool",
            section=index,
            type=number,
        )
    return SectionType(number)


def _check_section_order(section_type: SectionType, before: list[Section], index: int, name: str) -> None:
    seen = {s.type for s in before}
    if section_type is not SectionType.RAMDISK and section_type in seen:
        raise errors.EifSectionOrder(
            f"{name} has a second {section_type.name.lower()} section (section {index})",
            hint="rebuild the image",
            section=index,
        )
    if section_type is SectionType.RAMDISK and SectionType.KERNEL not in seen:
        raise errors.EifSectionOrder(
            f"ramdisk section {index} of {name} comes before the kernel",
            hint="rebuild the image",
            section=index,
        )


def _parse_metadata(data: bytes, name: str) -> dict[str, Any]:
    hint = "rebuild the image; the metadata section must be a JSON object"
    try:
        metadata = json.loads(data.decode("utf-8"))
    except Exception as err:
        raise errors.EifMetadataInvalid(
            f"the metadata of {name} is not UTF-8 JSON: {err}", hint=hint
        ) from None
    if not isinstance(metadata, dict):
        raise errors.EifMetadataInvalid(
            f"the metadata of {name} is a JSON {type(metadata).__name__}, not an object", hint=hint
        )
    for key, kind in (("ImageName", str), ("ImageVersion", str), ("BuildMetadata", dict)):
        if not isinstance(metadata.get(key), kind):
            raise errors.EifMetadataInvalid(
                f"the metadata of {name} lacks {key} ({kind.__name__})", hint=hint, keys=sorted(metadata)
            )
    return metadata


# ------------------------------------------------------------------------------------------------ building


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[IO[bytes]]:
    """A temp file beside ``path``, renamed over it on success and removed on any failure."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as err:
        raise errors.EifWriteFailed(
            f"cannot write in {path.parent}: {err.strerror}",
            hint="give an output path in an existing, writable directory",
            path=str(path),
        ) from None
    try:
        with os.fdopen(fd, "w+b") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise errors.EifWriteFailed(
                f"cannot write {path}: {err.strerror or err}",
                hint="check the output path and free space",
                path=str(path),
            ) from None
        raise
