"""QEMU layer: typed VM specs, objects and devices, argv assembly (``build_argv``) and ``Machine``."""

from harness.qemu.argv import build_argv
from harness.qemu.errors import SpecError
from harness.qemu.spec import (
    Chardev,
    ChardevChannel,
    ChardevFile,
    ChardevSocket,
    ChardevStdio,
    ConfidentialGuest,
    Device,
    MemoryBackend,
    MemoryBackendFile,
    MemoryBackendMemfd,
    MemoryBackendRam,
    SevSnpGuest,
    TdxGuest,
    VhostUserVsockPci,
    VhostVsockPci,
    VirtioMemPci,
    VirtioRngPci,
    VirtioSerialPort,
    VMSpec,
)

__all__ = [
    "Chardev",
    "ChardevChannel",
    "ChardevFile",
    "ChardevSocket",
    "ChardevStdio",
    "ConfidentialGuest",
    "Device",
    "MemoryBackend",
    "MemoryBackendFile",
    "MemoryBackendMemfd",
    "MemoryBackendRam",
    "SevSnpGuest",
    "SpecError",
    "TdxGuest",
    "VMSpec",
    "VhostUserVsockPci",
    "VhostVsockPci",
    "VirtioMemPci",
    "VirtioRngPci",
    "VirtioSerialPort",
    "build_argv",
]
