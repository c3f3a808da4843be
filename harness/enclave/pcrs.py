"""Enclave PCRs (SHA-384): each is SHA384(48 zero bytes || SHA384(content)), as Nitro measures them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from harness.enclave.errors import PcrInputInvalid

PCR_BYTES = 48
ZERO_PCR = bytes(PCR_BYTES)
# nitro-cli prints the Debug form of its Rust hasher under this key; we keep its exact text.
HASH_ALGORITHM = "Sha384 { ... }"


def extend(pcr: bytes, data: bytes) -> bytes:
    """A PCR extended with ``data``: SHA384(pcr || data)."""
    if len(pcr) != PCR_BYTES:
        raise PcrInputInvalid(f"a PCR is {PCR_BYTES} bytes, got {len(pcr)}", hint="pass a SHA-384 value")
    return hashlib.sha384(pcr + data).digest()


class PcrHasher:
    """Streams content into one PCR: feed ``update`` any number of times, then read ``value``."""

    def __init__(self) -> None:
        self._content = hashlib.sha384()
        self.fed = 0

    def update(self, data: bytes | memoryview) -> None:
        self._content.update(data)
        self.fed += len(data)

    @property
    def value(self) -> bytes:
        return hashlib.sha384(ZERO_PCR + self._content.digest()).digest()


def measure(content: bytes) -> bytes:
    """The PCR of one piece of content."""
    hasher = PcrHasher()
    hasher.update(content)
    return hasher.value


def _measure_text(text: str, what: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise PcrInputInvalid(f"{what} must be a non-empty string, got {text!r}", hint=f"pass the {what}")
    return measure(text.encode("utf-8"))


def pcr3_of_parent_role(role: str) -> bytes:
    """PCR3: the parent's role or identity (Nitro: the parent instance's IAM role ARN)."""
    return _measure_text(role, "parent role")


def pcr4_of_parent_instance(instance_id: str) -> bytes:
    """PCR4: the parent's instance id."""
    return _measure_text(instance_id, "parent instance id")


def pcr8_of_certificate(certificate_der: bytes) -> bytes:
    """PCR8: the DER signing certificate of a signed image."""
    return measure(certificate_der)


@dataclass(frozen=True)
class ImageMeasurements:
    """PCR0 (kernel, cmdline, all ramdisks), PCR1 (kernel, cmdline, first ramdisk), PCR2 (other ramdisks),
    and PCR8 (signing certificate) for signed images."""

    pcr0: bytes
    pcr1: bytes
    pcr2: bytes
    pcr8: bytes | None = None

    def as_pcrs(self) -> dict[int, bytes]:
        """The image's PCRs by index, as a security module is given them at boot."""
        pcrs = {0: self.pcr0, 1: self.pcr1, 2: self.pcr2}
        if self.pcr8 is not None:
            pcrs[8] = self.pcr8
        return pcrs

    def to_dict(self) -> dict[str, str]:
        """nitro-cli's ``Measurements`` object: HashAlgorithm and hex PCRs."""
        out = {
            "HashAlgorithm": HASH_ALGORITHM,
            "PCR0": self.pcr0.hex(),
            "PCR1": self.pcr1.hex(),
            "PCR2": self.pcr2.hex(),
        }
        if self.pcr8 is not None:
            out["PCR8"] = self.pcr8.hex()
        return out
