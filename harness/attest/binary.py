"""A bounds-checked reader for little-endian wire formats: every short read names the field it was for."""

from __future__ import annotations

from harness.attest.errors import EvidenceTruncated


class Reader:
    """Reads ``data`` from the front; ``take`` raises EvidenceTruncated naming the field it was for."""

    def __init__(self, data: bytes, kind: str, *, offset: int = 0, end: int | None = None) -> None:
        self.data = data
        self.kind = kind
        self.pos = offset
        self.end = len(data) if end is None else end

    def take(self, size: int, field: str, *, size_field: str | None = None) -> bytes:
        """The next ``size`` bytes of ``field``; when ``size`` came from a length field of the format, name
        it as ``size_field``: a length that runs past the end is that field's fault."""
        if size < 0 or self.pos + size > self.end:
            named = size_field or field
            raise EvidenceTruncated(
                f"{self.kind}: {named} says {field} has {size} bytes at offset {self.pos:#x}, "
                f"only {max(0, self.end - self.pos)} remain"
                if size_field
                else f"{self.kind}: {field} needs {size} bytes at offset {self.pos:#x}, "
                f"only {max(0, self.end - self.pos)} remain",
                field=named,
                kind=self.kind,
                offset=self.pos,
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def rest(self) -> bytes:
        chunk = self.data[self.pos : self.end]
        self.pos = self.end
        return chunk

    @property
    def remaining(self) -> int:
        return self.end - self.pos
