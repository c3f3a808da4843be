"""Measured boot in guest-init: before it loads anything, guest-init measures the kernel command line and
the code it runs into the vTPM's SHA-256 bank, and keeps a TCG-style event log.

qboot measures nothing and the kernel measures nothing but IMA's boot_aggregate (PCR 10), so PCRs 0-7 stay
zero; the measurements are GRUB's PCRs:

- PCR 8, ``kernel-cmdline``: SHA-256 of /proc/cmdline (without its newline);
- PCR 9, ``guest-init``: SHA-256 of a manifest of /init, /etc/teelab and guest-init's package (its sources and
  the .pyc files Python actually loads);
- PCR 9, ``kernel-modules``: SHA-256 of a manifest of the modules guest-init loads.

A manifest is one ``<path> <sha256 hex>`` line per regular file, sorted by path. The host predicts the same
digests from the image's initramfs (``harness.tee.tpm_measure``), with this module's functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable

PCR_CMDLINE, PCR_CODE = 8, 9
QUOTED_PCRS = tuple(range(10))  # the firmware's (zero under qboot) and guest-init's
MEASURED_CODE = {
    "guest-init": ("init", "etc/teelab", "usr/lib/python3/dist-packages/teelab_guest"),
    "kernel-modules": ("lib/modules/teelab",),
}
EVENT_LOG = "/run/teelab/tpm-events.json"


def manifest(entries: Iterable[tuple[str, str]]) -> str:
    """``<path> <sha256 hex>`` lines, sorted by path."""
    return "".join(f"{path} {digest}\n" for path, digest in sorted(entries))


def cmdline_event(cmdline: str) -> dict[str, object]:
    text = cmdline.rstrip("\n")
    return event(PCR_CMDLINE, "kernel-cmdline", text)


def event(pcr: int, kind: str, data: str) -> dict[str, object]:
    return {"pcr": pcr, "type": kind, "digest": hashlib.sha256(data.encode()).hexdigest(), "data": data}


def covered(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def file_digests(root: str, prefixes: Iterable[str]) -> list[tuple[str, str]]:
    """(path relative to ``root``, sha256 hex) of every regular file under ``prefixes``."""
    out = []
    for prefix in prefixes:
        top = os.path.join(root, prefix)
        walk = [(os.path.dirname(top), [], [os.path.basename(top)])] if os.path.isfile(top) else os.walk(top)
        for directory, _dirs, files in walk:
            for name in files:
                path = os.path.join(directory, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as handle:
                        digest = hashlib.sha256(handle.read()).hexdigest()
                    out.append((os.path.relpath(path, root), digest))
    return out


def boot_events(root: str = "/", cmdline_path: str = "/proc/cmdline") -> list[dict[str, object]]:
    """The events of this boot, in the order they are extended."""
    with open(cmdline_path) as handle:
        events = [cmdline_event(handle.read())]
    for kind, prefixes in MEASURED_CODE.items():
        events.append(event(PCR_CODE, kind, manifest(file_digests(root, prefixes))))
    return events


def measure_boot(
    extend: Callable[[int, bytes], None], events: list[dict[str, object]], log_path: str = EVENT_LOG
) -> None:
    """Extend each event into its PCR, then write the event log (0644: it holds no secret)."""
    for item in events:
        extend(int(item["pcr"]), bytes.fromhex(str(item["digest"])))  # type: ignore[call-overload]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as handle:
        json.dump(events, handle)


def pcr_extend_command(index: int, digest: bytes) -> bytes:
    """TPM2_PCR_Extend of one SHA-256 digest with the empty password: marshalled here, so the boot path
    imports nothing more (``teelab_guest.tpm_device`` has the same command)."""
    password = (0x40000009).to_bytes(4, "big") + bytes(5)  # TPM_RS_PW, empty nonce, attributes, empty hmac
    body = index.to_bytes(4, "big") + len(password).to_bytes(4, "big") + password
    body += (1).to_bytes(4, "big") + (0x000B).to_bytes(2, "big") + digest  # one digest, SHA-256
    return (
        (0x8002).to_bytes(2, "big") + (10 + len(body)).to_bytes(4, "big") + (0x182).to_bytes(4, "big") + body
    )


def measure_if_present(device: str = "/dev/tpmrm0") -> bool:
    """Guest-init's step: measure this boot when the VM has a TPM; False when it has none. A TPM that refuses
    an extend raises: guest-init then fails the boot rather than run unmeasured."""
    if not os.path.exists(device):
        return False
    fd = os.open(device, os.O_RDWR)

    def extend(index: int, digest: bytes) -> None:
        os.write(fd, pcr_extend_command(index, digest))
        response = os.read(fd, 4096)
        if len(response) < 10 or response[6:10] != bytes(4):
            raise OSError(f"TPM2_PCR_Extend of PCR {index} failed: response {response[:10].hex()}")

    try:
        measure_boot(extend, boot_events())
    finally:
        os.close(fd)
    return True
