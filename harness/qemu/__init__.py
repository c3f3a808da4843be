"""QEMU layer: typed VM specs, objects and devices, argv assembly (``build_argv``) and ``Machine``."""

from harness.qemu.argv import build_argv
from harness.qemu.chardevs import Chardev, ChardevChannel, ChardevFile, ChardevSocket, ChardevStdio
from harness.qemu.devices import (
    Device,
    TpmCrb,
    VhostUserVsockPci,
    VhostVsockPci,
    VirtioBlkPci,
    VirtioMemPci,
    VirtioRngPci,
    VirtioSerialPort,
    X86Cpu,
)
from harness.qemu.errors import SpecError
from harness.qemu.objects import (
    ConfidentialGuest,
    MemoryBackend,
    MemoryBackendFile,
    MemoryBackendMemfd,
    MemoryBackendRam,
    SevSnpGuest,
    TdxGuest,
)
from harness.qemu.spec import VMSpec

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
    "TpmCrb",
    "VMSpec",
    "VhostUserVsockPci",
    "VhostVsockPci",
    "VirtioBlkPci",
    "VirtioMemPci",
    "VirtioRngPci",
    "VirtioSerialPort",
    "X86Cpu",
    "build_argv",
]
