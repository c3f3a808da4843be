"""The vTPM PCRs a guest will have, predicted from its launch inputs: the kernel command line (PCR 8) and
what guest-init measures out of the initramfs before it loads anything (PCR 9), with the events guest-init
logs (``teelab_guest.tpm_boot`` computes both sides). PCRs 0-7 are zero: qboot measures nothing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from teelab_guest import tpm_boot, tpm_wire

from harness.tee.errors import MeasureInputInvalid, MeasureInputMissing

NEWC_MAGIC = (b"070701", b"070702")
NEWC_HEADER = 110
S_IFMT, S_IFREG = 0o170000, 0o100000


@dataclass(frozen=True)
class TpmPrediction:
    """The events guest-init will extend and the SHA-256 PCRs 0-9 they lead to."""

    events: tuple[dict[str, object], ...]
    pcrs: dict[int, bytes]

    def to_dict(self) -> dict[str, object]:
        return {"pcrs": {str(i): v.hex() for i, v in self.pcrs.items()}, "events": list(self.events)}


def cpio_file_digests(initrd: Path) -> dict[str, str]:
    """SHA-256 (hex) of every regular file of an uncompressed newc initramfs, by path."""
    try:
        data = Path(initrd).read_bytes()
    except OSError as exc:
        raise MeasureInputMissing(
            f"initrd {initrd}: {exc.strerror or exc}", hint="build the image first"
        ) from None
    out: dict[str, str] = {}
    at = 0
    while at + NEWC_HEADER <= len(data):
        head = data[at : at + NEWC_HEADER]
        if head[:6] not in NEWC_MAGIC:
            raise MeasureInputInvalid(
                f"initrd {initrd}: no newc header at byte {at}",
                hint="guest-init's files are read from an uncompressed newc initramfs (teelab images are)",
            )
        fields = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_at = at + NEWC_HEADER
        name = data[name_at : name_at + name_size - 1].decode()
        body_at = _align(name_at + name_size)
        if name == "TRAILER!!!":
            break
        if mode & S_IFMT == S_IFREG:
            out[name.removeprefix("./")] = hashlib.sha256(data[body_at : body_at + size]).hexdigest()
        at = _align(body_at + size)
    return out


def _align(offset: int) -> int:
    return (offset + 3) & ~3


def predict(cmdline: str, initrd: Path) -> TpmPrediction:
    """What a guest booted with ``cmdline`` and ``initrd`` measures, and its PCRs 0-9."""
    files = cpio_file_digests(initrd)
    events = [tpm_boot.cmdline_event(cmdline)]
    for kind, prefixes in tpm_boot.MEASURED_CODE.items():
        entries = [(path, digest) for path, digest in files.items() if tpm_boot.covered(path, prefixes)]
        events.append(tpm_boot.event(tpm_boot.PCR_CODE, kind, tpm_boot.manifest(entries)))
    pcrs = {i: bytes(32) for i in tpm_boot.QUOTED_PCRS}
    for item in events:
        index = int(item["pcr"])  # type: ignore[call-overload]
        pcrs[index] = tpm_wire.extend(pcrs[index], bytes.fromhex(str(item["digest"])))
    return TpmPrediction(tuple(events), pcrs)
