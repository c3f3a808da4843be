"""Enclave image files (EIF v4, as nitro-cli writes them): read and check, build, extract kernel and initrd.

Layout: a 548-byte big-endian header (magic, version, flags, default memory and vCPUs, num_sections, 32
section offsets and sizes, CRC-32/ISO-HDLC of the whole file except the CRC field), then sections back to
back, each a 12-byte header (type, flags, size) and its data. Large sections are streamed,
never held in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import IO, Any, BinaryIO

import harness
from harness.enclave import errors
from harness.enclave.pcrs import ImageMeasurements, PcrHasher, pcr8_of_certificate
from harness.enclave.signing import (
    SIGNATURE_SECTION_MAX_BYTES,
    SignatureEntry,
    check_signature,
    load_signing_material,
    parse_signature_section,
    require_valid_signature,
    signature_section,
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
_SECTION_HEADER = struct.Struct(">HHQ")
HEADER_BYTES = _HEADER.size  # 548
SECTION_HEADER_BYTES = _SECTION_HEADER.size  # 12
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
        with _atomic_output(Path(dest)) as out:
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
    type_number, flags, header_size = _SECTION_HEADER.unpack(raw)
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


def build_eif(
    output: str | os.PathLike[str],
    *,
    kernel: str | os.PathLike[str],
    cmdline: str,
    ramdisks: Sequence[str | os.PathLike[str]],
    name: str | None = None,
    version: str = "1.0",
    custom_metadata: Mapping[str, Any] | None = None,
    build_metadata: Mapping[str, str] | None = None,
    signing_key: str | os.PathLike[str] | bytes | None = None,
    signing_certificate: str | os.PathLike[str] | bytes | None = None,
    arch: str = "x86_64",
) -> EifImage:
    """Write an EIF v4 with nitro-cli's section order: kernel, cmdline, metadata, ramdisks, [signature].

    The output appears whole or not at all (a temp file in its directory, renamed). Each input is read once;
    the output is read back once for its CRC. ``build_metadata`` overrides BuildMetadata fields (BuildTime
    defaults to SOURCE_DATE_EPOCH when set, else now).
    """
    output = Path(output)
    kernel_path = _input_file(kernel, "kernel")
    ramdisk_paths = [_input_file(r, "ramdisk") for r in ramdisks]
    signed = signing_key is not None or signing_certificate is not None
    if not ramdisk_paths or 3 + signed + len(ramdisk_paths) > MAX_SECTIONS:
        raise errors.EifInputInvalid(
            f"an EIF takes 1 to {MAX_SECTIONS - 3 - signed} ramdisks here, got {len(ramdisk_paths)}",
            hint="give at least one --ramdisk, and concatenate some if there are too many",
        )
    cmdline_bytes = _cmdline_bytes(cmdline)
    if arch not in ("x86_64", "aarch64"):
        raise errors.EifInputInvalid(f"unknown architecture {arch!r}", hint="use x86_64 or aarch64")
    metadata = _metadata_bytes(
        output.stem if name is None else name, version, custom_metadata, build_metadata
    )
    material = None
    if signed:
        if signing_key is None or signing_certificate is None:
            raise errors.SigningKeyInvalid(
                "signing needs both a private key and its certificate",
                hint="give --private-key and --signing-certificate together",
            )
        key_source = signing_key if isinstance(signing_key, bytes) else Path(signing_key)
        cert_source = (
            signing_certificate if isinstance(signing_certificate, bytes) else Path(signing_certificate)
        )
        material = load_signing_material(key_source, cert_source)

    hasher = ImageHasher()
    with contextlib.ExitStack() as inputs:
        kernel_file = _open_input(inputs, kernel_path, "kernel")
        ramdisk_files = [_open_input(inputs, p, "ramdisk") for p in ramdisk_paths]
        # (type, source) in nitro-cli's order
        plan: list[tuple[SectionType, IO[bytes] | bytes]] = [
            (SectionType.KERNEL, kernel_file),
            (SectionType.CMDLINE, cmdline_bytes),
            (SectionType.METADATA, metadata),
        ]
        plan += [(SectionType.RAMDISK, f) for f in ramdisk_files]
        with _atomic_output(output) as out:
            sections = _write_sections(out, plan, hasher)
            signature = None
            if material is not None:
                signature = signature_section(material, hasher.pcr0.value)
                sections.append(_write_section(out, len(sections), SectionType.SIGNATURE, signature, ()))
            flags = FLAG_AARCH64 if arch == "aarch64" else 0
            header = _write_header(out, flags, sections)
    entry = parse_signature_section(signature) if signature else None
    return EifImage(
        output,
        header,
        tuple(sections),
        cmdline_bytes,
        json.loads(metadata),
        entry,
        hasher.measurements(pcr8_of_certificate(entry.certificate_der) if entry else None),
        header.crc32,
        check_signature(entry, hasher.pcr0.value) if entry else None,
    )


def _write_sections(
    out: IO[bytes], plan: list[tuple[SectionType, IO[bytes] | bytes]], hasher: ImageHasher
) -> list[Section]:
    """Leave room for the header, then write each planned section, feeding its data to its PCRs."""
    out.write(bytes(HEADER_BYTES))
    return [
        _write_section(out, index, kind, source, hasher.feeds(kind))
        for index, (kind, source) in enumerate(plan)
    ]


def _write_section(
    out: IO[bytes], index: int, kind: SectionType, source: IO[bytes] | bytes, feeds: Sequence[PcrHasher]
) -> Section:
    size = len(source) if isinstance(source, bytes) else os.fstat(source.fileno()).st_size
    offset = out.tell()
    out.write(_SECTION_HEADER.pack(kind, 0, size))
    if _copy(source, out, feeds) != size:
        raise errors.EifInputInvalid(
            f"the {kind.name.lower()} changed size while being read",
            hint="do not change inputs during a build",
        )
    return Section(index, kind, 0, offset, size)


def _write_header(out: IO[bytes], flags: int, sections: list[Section]) -> EifHeader:
    """Write the header over the room left for it, then the CRC of the whole file."""
    pad = (0,) * (MAX_SECTIONS - len(sections))
    header = EifHeader(
        EIF_MAGIC,
        EIF_VERSION,
        flags,
        DEFAULT_MEM_BYTES,
        DEFAULT_CPUS,
        0,
        len(sections),
        tuple(s.offset for s in sections) + pad,
        tuple(s.size for s in sections) + pad,
        0,
        0,
    )
    out.seek(0)
    out.write(header.pack())
    crc = _file_crc(out)
    out.seek(CRC_OFFSET)
    out.write(crc.to_bytes(4, "big"))
    return dataclasses.replace(header, crc32=crc)


def _input_file(path: str | os.PathLike[str], what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise errors.EifInputInvalid(
            f"the {what} {path} is not a file", hint=f"check the {what} path", path=str(path)
        )
    if path.stat().st_size == 0:
        raise errors.EifInputInvalid(
            f"the {what} {path} is empty", hint=f"give a real {what}", path=str(path)
        )
    return path


def _open_input(stack: contextlib.ExitStack, path: Path, what: str) -> IO[bytes]:
    try:
        return stack.enter_context(open(path, "rb"))
    except OSError as err:
        raise errors.EifInputInvalid(
            f"cannot read the {what} {path}: {err.strerror}",
            hint=f"check the {what}'s permissions",
            path=str(path),
        ) from None


def _cmdline_bytes(cmdline: str) -> bytes:
    if not isinstance(cmdline, str) or "\0" in cmdline:
        raise errors.EifInputInvalid(
            "the kernel command line must be text without NUL bytes",
            hint="pass the command line as one string",
        )
    data = cmdline.encode("utf-8")
    if len(data) > CMDLINE_MAX_BYTES:
        raise errors.EifInputInvalid(
            f"the kernel command line is {len(data)} bytes, over {CMDLINE_MAX_BYTES}",
            hint="shorten the command line",
        )
    return data


def _metadata_bytes(
    name: str, version: str, custom: Mapping[str, Any] | None, build: Mapping[str, str] | None
) -> bytes:
    if not name or not version:
        raise errors.EifInputInvalid(
            "the image name and version must not be empty", hint="give --name and --version"
        )
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), UTC) if epoch and epoch.isdigit() else datetime.now(UTC)
    build_info = {
        "BuildTime": when.isoformat(),
        "BuildTool": "teelab",
        "BuildToolVersion": harness.__version__,
        "OperatingSystem": platform.system(),
        "KernelVersion": platform.release(),
    }
    build_info.update(build or {})
    metadata = {
        "ImageName": name,
        "ImageVersion": version,
        "BuildMetadata": build_info,
        "DockerInfo": None,
        "CustomMetadata": dict(custom) if custom is not None else None,
    }
    try:
        text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise errors.EifInputInvalid(
            f"the custom metadata is not JSON: {err}",
            hint="give a JSON object of strings, numbers, lists and objects",
        ) from None
    data = text.encode("utf-8")
    if len(data) > METADATA_MAX_BYTES:
        raise errors.EifInputInvalid(
            f"the metadata is {len(data)} bytes, over {METADATA_MAX_BYTES}",
            hint="shorten the custom metadata",
        )
    return data


def _copy(source: IO[bytes] | bytes, out: IO[bytes], feeds: Sequence[PcrHasher]) -> int:
    if isinstance(source, bytes):
        out.write(source)
        for hasher in feeds:
            hasher.update(source)
        return len(source)
    buffer = bytearray(CHUNK_BYTES)
    total = 0
    while got := source.readinto(buffer):
        chunk = memoryview(buffer)[:got]
        out.write(chunk)
        for hasher in feeds:
            hasher.update(chunk)
        total += got
    return total


def _file_crc(out: IO[bytes]) -> int:
    out.flush()
    out.seek(0)
    crc = zlib.crc32(out.read(CRC_OFFSET))
    out.seek(HEADER_BYTES)
    buffer = bytearray(CHUNK_BYTES)
    while got := out.readinto(buffer):
        crc = zlib.crc32(memoryview(buffer)[:got], crc)
    return crc


@contextlib.contextmanager
def _atomic_output(path: Path) -> Iterator[IO[bytes]]:
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
