"""Typed QEMU ``-device`` values: vsock (kernel, vhost-user), virtio-serial ports, virtio-mem, virtio-rng."""

from __future__ import annotations

import re
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from harness.host.model import HostInfo
from harness.qemu.chardevs import Chardev, ChardevChannel, ChardevSocket
from harness.qemu.errors import MemorySizeError, OptionInvalid, SpecFileMissing, VhostVsockUnavailable
from harness.qemu.objects import MemoryBackend, MemoryBackendFile
from harness.qemu.options import check_id, escape, onoff, require_type, size_mib

VSOCK_CID_MAX = 2**32 - 1  # U32_MAX is VMADDR_CID_ANY
VIRTIO_SERIAL_BUS = "virtio-serial0"
_PORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Device(ABC):
    """One ``-device``; chardevs, memory backends and a shared controller it needs come with it."""

    id: str
    qemu_type: ClassVar[str]
    needs_shared_memory: ClassVar[bool] = False

    def validate(self, host: HostInfo) -> None:
        check_id("device", self.id)
        types = [self.qemu_type]
        if (controller := self.controller()) is not None:
            types.append(controller[1])
        for type_name in types:
            hint = f"install a QEMU that offers -device {type_name} or drop that device from the spec"
            require_type(host, "device", type_name, hint)

    def chardevs(self) -> tuple[Chardev, ...]:
        return ()

    def memory_backends(self) -> tuple[MemoryBackend, ...]:
        return ()

    def controller(self) -> tuple[str, str] | None:
        """``(id, qemu type)`` of a controller shared by devices of this kind, added once."""
        return None

    @property
    def hotplug_mib(self) -> int:
        """Memory beyond the boot RAM this device can plug (counted into ``-m maxmem=``)."""
        return 0

    def properties(self) -> list[str]:
        """Properties after ``type,id=..``."""
        return []

    def args(self) -> list[str]:
        return ["-device", ",".join([self.qemu_type, f"id={self.id}", *self.properties()])]


@dataclass(frozen=True)
class VhostVsockPci(Device):
    """Kernel vsock (needs /dev/vhost-vsock): guest <-> host only."""

    id: str
    guest_cid: int
    qemu_type: ClassVar[str] = "vhost-vsock-pci"

    def validate(self, host: HostInfo) -> None:
        super().validate(host)
        if not 3 <= self.guest_cid < VSOCK_CID_MAX:
            raise OptionInvalid(
                f"device {self.id}: guest CID {self.guest_cid} is reserved or out of range",
                hint=f"pick a guest_cid from 3 to {VSOCK_CID_MAX - 1} (0-2 are reserved)",
                id=self.id,
            )
        if not host.vhost_vsock:
            raise VhostVsockUnavailable(
                f"device {self.id}: this host has no /dev/vhost-vsock",
                hint="modprobe vhost_vsock, or use VhostUserVsockPci with the user-space vsock backend",
                id=self.id,
            )

    def properties(self) -> list[str]:
        return [f"guest-cid={self.guest_cid}"]


@dataclass(frozen=True)
class VhostUserVsockPci(Device):
    """vsock served by a user-space vhost-user backend on ``chardev``; guest RAM must be shared."""

    id: str
    chardev: ChardevSocket | ChardevChannel
    qemu_type: ClassVar[str] = "vhost-user-vsock-pci"
    needs_shared_memory: ClassVar[bool] = True

    def validate(self, host: HostInfo) -> None:
        super().validate(host)
        if not isinstance(self.chardev, (ChardevSocket, ChardevChannel)):
            raise OptionInvalid(
                f"device {self.id}: vhost-user needs a socket chardev, got {type(self.chardev).__name__}",
                hint="pass ChardevSocket(id, path=<backend socket>) or ChardevChannel(id)",
                id=self.id,
            )

    def chardevs(self) -> tuple[Chardev, ...]:
        return (self.chardev,)

    def properties(self) -> list[str]:
        return [f"chardev={self.chardev.id}"]


@dataclass(frozen=True)
class VirtioSerialPort(Device):
    """A named virtio-serial port (``/dev/virtio-ports/<name>`` in the guest) on the shared controller."""

    id: str
    name: str
    chardev: Chardev
    qemu_type: ClassVar[str] = "virtserialport"

    def validate(self, host: HostInfo) -> None:
        super().validate(host)
        if not _PORT_NAME.fullmatch(self.name):
            raise OptionInvalid(
                f"device {self.id}: port name {self.name!r} is not a plain dotted name",
                hint="use letters, digits, '.', '_' and '-', like org.teelab.tee.0",
                id=self.id,
            )

    def chardevs(self) -> tuple[Chardev, ...]:
        return (self.chardev,)

    def controller(self) -> tuple[str, str] | None:
        return (VIRTIO_SERIAL_BUS, "virtio-serial-pci")

    def properties(self) -> list[str]:
        return [f"bus={VIRTIO_SERIAL_BUS}.0", f"chardev={self.chardev.id}", f"name={escape(self.name)}"]


@dataclass(frozen=True)
class VirtioMemPci(Device):
    """Hot-(un)pluggable memory from ``memdev``; ``requested_size_mib`` is what the guest gets now."""

    id: str
    memdev: MemoryBackend
    requested_size_mib: int
    block_size_mib: int = 2
    node: int = 0
    prealloc: bool = False  # allocate each block as it is plugged (hugetlb: fail the plug, not SIGBUS later)
    qemu_type: ClassVar[str] = "virtio-mem-pci"

    @property
    def hotplug_mib(self) -> int:
        return self.memdev.size_mib

    def validate(self, host: HostInfo) -> None:
        super().validate(host)
        block = self.block_size_mib
        if block < 2 or block & (block - 1):
            raise OptionInvalid(
                f"device {self.id}: block size {block} MiB is not a power of two >= 2",
                hint="use block_size_mib=2 (or 4, 8, ...)",
                id=self.id,
            )
        if self.memdev.size_mib % block or self.requested_size_mib % block:
            raise MemorySizeError(
                f"device {self.id}: memdev {self.memdev.size_mib} MiB and requested "
                f"{self.requested_size_mib} MiB must be multiples of the {block} MiB block size",
                hint=f"round both sizes to a multiple of {block} MiB",
                id=self.id,
            )
        if not 0 <= self.requested_size_mib <= self.memdev.size_mib:
            raise MemorySizeError(
                f"device {self.id}: requested {self.requested_size_mib} MiB but memdev "
                f"{self.memdev.id} holds {self.memdev.size_mib} MiB",
                hint=f"request at most {self.memdev.size_mib} MiB or grow the memdev",
                id=self.id,
            )
        if isinstance(self.memdev, MemoryBackendFile) and self.memdev.prealloc:
            raise OptionInvalid(
                f"device {self.id}: memdev {self.memdev.id} has prealloc, which virtio-mem refuses",
                hint="set prealloc=False on the virtio-mem memdev",
                id=self.id,
            )
        if self.node < 0:
            raise OptionInvalid(f"device {self.id}: node {self.node}", hint="use node=0", id=self.id)

    def memory_backends(self) -> tuple[MemoryBackend, ...]:
        return (self.memdev,)

    def properties(self) -> list[str]:
        return [
            f"memdev={self.memdev.id}",
            f"node={self.node}",
            f"block-size={size_mib(self.block_size_mib)}",
            f"requested-size={size_mib(self.requested_size_mib)}",
        ] + (["prealloc=on"] if self.prealloc else [])


@dataclass(frozen=True)
class VirtioRngPci(Device):
    """A virtio entropy source fed by QEMU's built-in RNG backend."""

    id: str
    qemu_type: ClassVar[str] = "virtio-rng-pci"


@dataclass(frozen=True)
class X86Cpu(Device):
    """A vCPU added as a device (``-smp N,maxcpus=M`` leaves room for it), so QMP ``device_del`` can unplug it
    and ``device_add`` plug it back. ``model`` is the ``-cpu`` model (max under TCG, host under KVM)."""

    id: str
    socket_id: int
    core_id: int = 0
    thread_id: int = 0
    model: str = "max"

    @property
    def qemu_type(self) -> str:  # type: ignore[override]
        return f"{self.model}-x86_64-cpu"

    def validate(self, host: HostInfo) -> None:
        super().validate(host)
        if min(self.socket_id, self.core_id, self.thread_id) < 0:
            raise OptionInvalid(f"device {self.id}: negative topology id", hint="use ids >= 0", id=self.id)

    def properties(self) -> list[str]:
        return [f"socket-id={self.socket_id}", f"core-id={self.core_id}", f"thread-id={self.thread_id}"]

    def qmp_arguments(self) -> dict[str, object]:
        """The same device as ``device_add`` arguments (to plug it back after an unplug)."""
        return {
            "driver": self.qemu_type,
            "id": self.id,
            "socket-id": self.socket_id,
            "core-id": self.core_id,
            "thread-id": self.thread_id,
        }


@dataclass(frozen=True)
class TpmCrb(Device):
    """A TPM 2.0 (CRB interface) whose TPM is an external emulator (swtpm) on ``chardev``, its control
    socket: ``-tpmdev emulator`` then ``-device tpm-crb``. The backend's id is ``<id>-dev``."""

    id: str
    chardev: ChardevSocket
    qemu_type: ClassVar[str] = "tpm-crb"

    def validate(self, host: HostInfo) -> None:
        super().validate(host)
        if not isinstance(self.chardev, ChardevSocket) or self.chardev.path is None or self.chardev.server:
            raise OptionInvalid(
                f"device {self.id}: the TPM emulator needs a client socket chardev with a path",
                hint="pass ChardevSocket(id, path=<swtpm control socket>) (swtpm listens, QEMU connects)",
                id=self.id,
            )

    def chardevs(self) -> tuple[Chardev, ...]:
        return (self.chardev,)

    def args(self) -> list[str]:
        backend = f"{self.id}-dev"
        return [
            "-tpmdev",
            f"emulator,id={backend},chardev={self.chardev.id}",
            "-device",
            f"{self.qemu_type},id={self.id},tpmdev={backend}",
        ]


@dataclass(frozen=True)
class VirtioBlkPci(Device):
    """A virtio-blk disk backed by a raw image file (``-blockdev file`` then ``-device virtio-blk-pci``); the
    backend's node name is ``<id>-file``."""

    id: str
    path: Path
    read_only: bool = False
    qemu_type: ClassVar[str] = "virtio-blk-pci"

    def validate(self, host: HostInfo) -> None:
        super().validate(host)
        if not Path(self.path).is_file():
            raise SpecFileMissing(
                f"device {self.id}: disk image {self.path} does not exist",
                hint="create it first (truncate -s 64M disk.img) or point path= at an existing file",
                path=str(self.path),
            )

    def args(self) -> list[str]:
        node = f"{self.id}-file"
        blockdev = (
            f"driver=file,node-name={node},filename={escape(self.path)},read-only={onoff(self.read_only)}"
        )
        return ["-blockdev", blockdev, "-device", f"{self.qemu_type},id={self.id},drive={node}"]


@dataclass(frozen=True)
class VirtioNetUser(Device):
    """A virtio-net NIC on QEMU's user-mode network (``-netdev user``, guest 10.0.2.15, host 10.0.2.2) with
    ``host_port`` on the host's loopback forwarded to the guest's ``guest_port`` (SSH). The backend's id is
    ``<id>-net``."""

    id: str
    host_port: int
    guest_port: int = 22
    qemu_type: ClassVar[str] = "virtio-net-pci"

    def validate(self, host: HostInfo) -> None:
        super().validate(host)
        if not (1 <= self.host_port <= 65535 and 1 <= self.guest_port <= 65535):
            raise OptionInvalid(
                f"device {self.id}: ports {self.host_port} -> {self.guest_port} are not TCP ports",
                hint="use ports from 1 to 65535",
                id=self.id,
            )

    def netdev(self) -> str:
        """The ``-netdev`` option string."""
        return f"user,id={self.id}-net,hostfwd=tcp:127.0.0.1:{self.host_port}-:{self.guest_port}"

    def args(self) -> list[str]:
        return ["-netdev", self.netdev(), "-device", f"{self.qemu_type},id={self.id},netdev={self.id}-net"]
