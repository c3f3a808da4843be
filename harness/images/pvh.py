"""The uncompressed kernel inside a bzImage, for booting through its PVH entry point.

A bzImage is a boot stub plus the kernel ELF (``vmlinux.bin``, then its relocations) compressed with gzip, xz,
lz4, zstd...; the stub decompresses it before the kernel starts. Under TCG that costs real time (Debian 13's
zstd kernel: ~0.7 s of emulated CPU, against ~0.1 s for Debian 12's lz4 one). A kernel built with
``CONFIG_PVH`` carries a Xen ``PHYS32_ENTRY`` note, and QEMU boots such an ELF directly with ``-kernel``:
the same kernel code, without the stub (and so without the stub's KASLR of the kernel's own address).
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable

HEADER_MAGIC = b"HdrS"
XEN_NOTE_NAME = b"Xen\0"
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE, SHT_NOBITS, EM_X86_64 = 4, 8, 62


def pvh_elf(bzimage: bytes) -> bytes | None:
    """The kernel ELF in ``bzimage``, cut to its own length, when it has a PVH entry; None when the file is
    not a bzImage with a payload this host can decompress, or the kernel has no PVH entry."""
    payload = _payload(bzimage)
    if payload is None:
        return None
    data = _decompress(payload)
    if data is None or not data.startswith(b"\x7fELF"):
        return None
    elf = data[: _elf_length(data)]
    return elf if has_pvh_entry(elf) else None


def _payload(bzimage: bytes) -> bytes | None:
    """The compressed kernel: ``payload_offset``/``payload_length`` of the setup header (boot protocol 2.08+),
    counted from the protected-mode code after the setup sectors."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != HEADER_MAGIC:
        return None
    if struct.unpack_from("<H", bzimage, 0x206)[0] < 0x208:
        return None
    setup_sectors = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    return bzimage[start : start + length] if start + length <= len(bzimage) else None


def _decompress(payload: bytes) -> bytes | None:
    """Decompress by the format's magic; trailing bytes (the size the kernel build appends) are ignored."""
    formats: list[tuple[bytes, Callable[[bytes], bytes | None]]] = [
        (b"\x1f\x8b", lambda p: zlib.decompressobj(wbits=31).decompress(p)),
        (b"\xfd7zXZ\x00", lambda p: lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(p)),
        (b"\x5d\x00\x00", lambda p: lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(p)),
        (b"BZh", lambda p: bz2.BZ2Decompressor().decompress(p)),
        (b"\x28\xb5\x2f\xfd", lambda p: _tool(["zstd", "-dcq"], p)),
        (b"\x02\x21\x4c\x18", lambda p: _tool(["lz4", "-dcq"], p)),
    ]
    for magic, decompress in formats:
        if payload.startswith(magic):
            try:
                return decompress(payload)
            except (lzma.LZMAError, OSError, zlib.error, EOFError, ValueError):
                return None
    return None


def _tool(argv: list[str], payload: bytes) -> bytes | None:
    """A decompressor's output for ``payload``: zstd and lz4 complain about the appended size after the
    frame, so their exit status says nothing; the ELF check afterwards does."""
    if shutil.which(argv[0]) is None:
        return None
    done = subprocess.run(argv, input=payload, capture_output=True, check=False)
    return done.stdout or None


def _elf_length(elf: bytes) -> int:
    """Where the ELF file ends: after its last section, segment or header table."""
    (phoff, shoff) = struct.unpack_from("<QQ", elf, 0x20)
    (phentsize, phnum, shentsize, shnum) = struct.unpack_from("<HHHH", elf, 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    for index in range(phnum):
        offset, filesz = struct.unpack_from("<Q16xQ", elf, phoff + index * phentsize + 8)
        end = max(end, offset + filesz)
    for index in range(shnum):
        kind, offset, size = struct.unpack_from("<4xI16xQQ", elf, shoff + index * shentsize)
        if kind != SHT_NOBITS:
            end = max(end, offset + size)
    return min(end, len(elf))


def has_pvh_entry(elf: bytes) -> bool:
    """Whether an x86-64 ELF has a ``Xen`` note of type ``XEN_ELFNOTE_PHYS32_ENTRY`` (QEMU's PVH boot)."""
    if len(elf) < 64 or elf[:5] != b"\x7fELF\x02" or struct.unpack_from("<H", elf, 0x12)[0] != EM_X86_64:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    (phentsize, phnum) = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        kind, offset, filesz = struct.unpack_from("<I4xQ16xQ", elf, phoff + index * phentsize)
        if kind == PT_NOTE and _notes_have_pvh(elf[offset : offset + filesz]):
            return True
    return False


def _notes_have_pvh(notes: bytes) -> bool:
    position = 0
    while position + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, position)
        name = notes[position + 12 : position + 12 + namesz]
        if name == XEN_NOTE_NAME and kind == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        position += 12 + _aligned(namesz) + _aligned(descsz)
    return False


def _aligned(size: int) -> int:
    return (size + 3) & ~3
