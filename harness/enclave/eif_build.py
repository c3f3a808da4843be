"""Building enclave image files (EIF v4, byte for byte as nitro-cli writes them): sections streamed from the
inputs, PCRs measured on the way, the CRC written last, the file put in place atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import harness
from harness.enclave import errors
from harness.enclave.eif import (
    CHUNK_BYTES,
    CMDLINE_MAX_BYTES,
    CRC_OFFSET,
    DEFAULT_CPUS,
    DEFAULT_MEM_BYTES,
    EIF_MAGIC,
    EIF_VERSION,
    FLAG_AARCH64,
    HEADER_BYTES,
    MAX_SECTIONS,
    METADATA_MAX_BYTES,
    SECTION_HEADER_STRUCT,
    EifHeader,
    EifImage,
    ImageHasher,
    Section,
    SectionType,
    atomic_output,
)
from harness.enclave.pcrs import PcrHasher, pcr8_of_certificate
from harness.enclave.signing import (
    check_signature,
    load_signing_material,
    parse_signature_section,
    signature_section,
)


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
        with atomic_output(output) as out:
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
    out.write(SECTION_HEADER_STRUCT.pack(kind, 0, size))
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
