"""Guest memory as the vhost-user front describes it: regions with guest and user addresses, bounds-checked.

``GuestMemory.from_fds`` maps the fds of SET_MEM_TABLE: memfds sealed against shrinking (F_SEAL_SHRINK, as
QEMU's memory-backend-memfd seals them), so a front end cannot truncate mapped memory and kill the switch
with SIGBUS; ``GuestMemory.synthetic`` backs regions with plain buffers for tests. Every access goes through
``gpa``/``uva`` and is checked to lie inside one region; anything else raises ``GuestFault("bad_address")``.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

from harness.errors import LabError
from harness.vsock.errors import GuestFault

MAX_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS


@dataclass(frozen=True)
class MemoryRegion:
    """One region of SET_MEM_TABLE: ``size`` bytes at ``guest_addr`` (GPA) and ``user_addr`` (QEMU's VA)."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int = 0


class _Mapped:
    """A region with the buffer that backs it (a slice of an mmap, or of a synthetic buffer)."""

    __slots__ = ("buf", "gpa_end", "gpa_start", "region", "uva_end", "uva_start")

    def __init__(self, region: MemoryRegion, buf: memoryview) -> None:
        self.region = region
        self.buf = buf
        self.gpa_start = region.guest_addr
        self.gpa_end = region.guest_addr + region.size
        self.uva_start = region.user_addr
        self.uva_end = region.user_addr + region.size


class GuestMemory:
    """A guest's memory regions; ``gpa(addr, n)`` and ``uva(addr, n)`` return writable views or fault."""

    def __init__(self, mapped: Sequence[_Mapped], maps: Sequence[mmap.mmap] = ()) -> None:
        self._mapped = sorted(mapped, key=lambda m: m.gpa_start)
        self._maps = list(maps)
        self.regions = tuple(m.region for m in self._mapped)
        self._check_overlap()

    def _check_overlap(self) -> None:
        for low, high in zip(self._mapped, self._mapped[1:], strict=False):
            if high.gpa_start < low.gpa_end:
                self.close()
                raise GuestFault(
                    "bad_mem_table", f"regions at {low.gpa_start:#x} and {high.gpa_start:#x} overlap"
                )

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def synthetic(cls, regions: Sequence[tuple[MemoryRegion, bytearray | memoryview]]) -> GuestMemory:
        """Regions backed by caller-owned buffers (each exactly ``region.size`` bytes)."""
        mapped = []
        for region, buf in regions:
            view = memoryview(buf).cast("B")
            if len(view) != region.size:
                raise ValueError(f"buffer of {len(view)} bytes for a region of {region.size}")
            mapped.append(_Mapped(region, view))
        return cls(mapped)

    @classmethod
    def from_fds(cls, regions: Sequence[MemoryRegion], fds: Sequence[int]) -> GuestMemory:
        """Map each region's fd (shared, read-write). The fds stay the caller's to close."""
        if len(regions) != len(fds) or not 0 < len(regions) <= MAX_REGIONS:
            raise GuestFault("bad_mem_table", f"{len(regions)} regions with {len(fds)} fds")
        maps: list[mmap.mmap] = []
        mapped: list[_Mapped] = []
        try:
            for region, fd in zip(regions, fds, strict=True):
                if region.size <= 0:
                    raise GuestFault("bad_mem_table", f"region at {region.guest_addr:#x} has size 0")
                _check_backing(fd, region)
                # hugetlbfs files need offsets and lengths aligned to their page size (st_blksize).
                align = max(mmap.PAGESIZE, os.fstat(fd).st_blksize)
                start = region.mmap_offset - region.mmap_offset % align
                length = region.mmap_offset + region.size - start
                length += -length % align
                mm = mmap.mmap(
                    fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start
                )
                maps.append(mm)
                skip = region.mmap_offset - start
                mapped.append(_Mapped(region, memoryview(mm)[skip : skip + region.size]))
        except (OSError, ValueError, OverflowError) as exc:
            _release(mapped, maps)
            raise GuestFault("bad_mem_table", f"cannot map guest memory: {exc}") from exc
        except LabError:
            _release(mapped, maps)
            raise
        return cls(mapped, maps)

    # -- access ---------------------------------------------------------------------------------
    def gpa(self, addr: int, length: int) -> memoryview:
        """A view of ``length`` bytes at guest-physical ``addr``; it must lie inside one region."""
        for m in self._mapped:
            if m.gpa_start <= addr and addr + length <= m.gpa_end:
                offset = addr - m.gpa_start
                return m.buf[offset : offset + length]
        raise GuestFault("bad_address", f"GPA {addr:#x}+{length:#x} is outside guest memory")

    def uva(self, addr: int, length: int) -> memoryview:
        """A view of ``length`` bytes at front-end user address ``addr`` (vring addresses use these)."""
        for m in self._mapped:
            if m.uva_start <= addr and addr + length <= m.uva_end:
                offset = addr - m.uva_start
                return m.buf[offset : offset + length]
        raise GuestFault("bad_address", f"user address {addr:#x}+{length:#x} is outside guest memory")

    def close(self) -> None:
        """Unmap; views handed out earlier must not be used afterwards."""
        _release(self._mapped, self._maps)
        self._mapped = []
        self._maps = []


def _check_backing(fd: int, region: MemoryRegion) -> None:
    """The region's fd must be sealed against shrinking and hold the whole region: a file that is (or can
    become) shorter than the mapping turns a guest access into SIGBUS, which would end the whole switch."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # not a memfd: a plain or hugetlbfs file that anyone holding it can truncate
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise GuestFault(
            "unsealed_memory",
            f"region at {region.guest_addr:#x}: its fd is not sealed against shrinking (F_SEAL_SHRINK); "
            "use memory-backend-memfd (seal=on, QEMU's default)",
        )
    if os.fstat(fd).st_size < region.mmap_offset + region.size:
        raise GuestFault("bad_mem_table", f"region at {region.guest_addr:#x} ends past the end of its file")


def _release(mapped: Sequence[_Mapped], maps: Sequence[mmap.mmap]) -> None:
    for m in mapped:
        with contextlib.suppress(BufferError):
            m.buf.release()
    for mm in maps:
        # BufferError: a view is still alive somewhere; the map then goes when the last view does.
        with contextlib.suppress(BufferError):
            mm.close()
