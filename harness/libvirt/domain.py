"""A validated ``VMSpec`` as libvirt domain XML, the libvirt twin of ``build_argv``.

Elements, in this order: name, title (the spec's name), memory, memoryBacking (memfd or file source, shared
access, hugepages, immediate allocation), vcpu, cputune (vcpupin), numatune, os (direct kernel boot, the
firmware as a ROM), features (ACPI for the power button; the split irqchip for TDX), cpu, clock, lifecycle
actions (every stop destroys: QEMU's ``-no-reboot``), devices (the emulator, the console, no USB, no balloon,
then per device in device order), launchSecurity, the DAC label (QEMU runs as the harness's user, and libvirt
relabels nothing), then ``qemu:commandline`` for what libvirt has no element for: vhost-user vsock, and a
user-network NIC with a host port forward.

Harness-served ports (``ChardevChannel``, socketpairs under the QEMU backend) become Unix sockets that QEMU
binds in a private per-run directory (``run_dir``); the harness connects to each while the domain is still
paused, and removes the directory when the domain ends.
"""

from __future__ import annotations

import base64
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness.host.model import HostInfo
from harness.libvirt.errors import LibvirtUnsupported
from harness.qemu.chardevs import Chardev, ChardevChannel, ChardevFile, ChardevSocket
from harness.qemu.devices import (
    Device,
    TpmCrb,
    VhostUserVsockPci,
    VhostVsockPci,
    VirtioBlkPci,
    VirtioNetUser,
    VirtioRngPci,
    VirtioSerialPort,
)
from harness.qemu.objects import (
    MemoryBackend,
    MemoryBackendFile,
    MemoryBackendMemfd,
    SevSnpGuest,
    TdxGuest,
)
from harness.qemu.spec import VMSpec

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
CONSOLE_SOCKET = "console.sock"
COMMANDLINE_SLOT = 0x10  # the first pcie.0 slot of devices given on qemu:commandline
_NUMA_MODE = {"bind": "strict", "preferred": "preferred", "interleave": "interleave"}
ET.register_namespace("qemu", QEMU_NS)


@dataclass(frozen=True)
class DomainSockets:
    """The Unix sockets QEMU binds for the harness: the serial console and each ``ChardevChannel``."""

    console: Path | None
    channels: dict[str, Path] = field(default_factory=dict)


def domain_sockets(spec: VMSpec, run_dir: Path, *, serial: bool = True) -> DomainSockets:
    channels = {c.id: run_dir / f"{c.id}.sock" for c in spec.chardevs() if isinstance(c, ChardevChannel)}
    return DomainSockets(run_dir / CONSOLE_SOCKET if serial else None, channels)


def domain_xml(
    spec: VMSpec,
    host: HostInfo,
    *,
    name: str,
    run_dir: Path,
    owner: tuple[int, int],
    serial: bool = True,
    vcpu_pins: dict[int, int] | None = None,
    emulator: str | None = None,
    files: Mapping[Path, str] | None = None,
) -> str:
    """The domain XML for ``spec`` on ``host``; raises a SpecError (E3xx, E360) before anything runs.
    ``owner`` is the (uid, gid) QEMU runs as; ``vcpu_pins`` maps vCPU index to host CPU; ``files`` maps the
    kernel, initrd and firmware to where the host that runs the domain has them (a remote URI's copies)."""
    spec.validate(host)
    sockets = domain_sockets(spec, run_dir, serial=serial)
    domain_type = "kvm" if spec.resolved_accel(host) == "kvm" else "qemu"
    root = ET.Element("domain", type=domain_type)
    _text(root, "name", name)
    _text(root, "title", spec.name)
    _text(root, "memory", str(spec.memory_mib), unit="MiB")
    _memory_backing(root, spec.memory)
    vcpu = _text(root, "vcpu", str(spec.max_vcpus or spec.vcpus), placement="static")
    if spec.max_vcpus is not None:
        vcpu.set("current", str(spec.vcpus))
    if vcpu_pins:
        cputune = ET.SubElement(root, "cputune")
        for index, cpu in sorted(vcpu_pins.items()):
            ET.SubElement(cputune, "vcpupin", vcpu=str(index), cpuset=str(cpu))
    _numatune(root, spec.memory)
    _os(root, spec, files or {})
    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    if isinstance(spec.confidential, TdxGuest):
        ET.SubElement(features, "ioapic", driver="qemu")  # kernel-irqchip=split
    _cpu(root, spec.resolved_cpu_model(host))
    clock = ET.SubElement(root, "clock", offset="utc")
    if isinstance(spec.confidential, TdxGuest):
        ET.SubElement(clock, "timer", name="hpet", present="no")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _text(root, event, "destroy")
    extra = _devices(root, spec, host, sockets, emulator)
    _launch_security(root, spec)
    seclabel = ET.SubElement(root, "seclabel", type="static", model="dac", relabel="no")
    _text(seclabel, "label", f"+{owner[0]}:+{owner[1]}")
    if extra:
        commandline = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for arg in extra:
            ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element


def _memory_backing(root: ET.Element, memory: MemoryBackend | None) -> None:
    if memory is None:
        return
    backing = ET.SubElement(root, "memoryBacking")
    demand = memory.hugepage_demand()
    if demand is not None:
        pages = ET.SubElement(backing, "hugepages")
        ET.SubElement(pages, "page", size=str(demand.page_kib), unit="KiB")
    if isinstance(memory, MemoryBackendMemfd):
        ET.SubElement(backing, "source", type="memfd")
    elif isinstance(memory, MemoryBackendFile) and demand is None:
        ET.SubElement(backing, "source", type="file")  # in qemu.conf's memory_backing_dir, not mem_path
    if memory.shared:
        ET.SubElement(backing, "access", mode="shared")
    if getattr(memory, "prealloc", False):
        ET.SubElement(backing, "allocation", mode="immediate")


def _numatune(root: ET.Element, memory: MemoryBackend | None) -> None:
    nodes: tuple[int, ...] = getattr(memory, "host_nodes", ())
    policy = getattr(memory, "policy", None)
    if nodes:
        numatune = ET.SubElement(root, "numatune")
        mode = _NUMA_MODE[policy or "preferred"]
        ET.SubElement(numatune, "memory", mode=mode, nodeset=",".join(map(str, nodes)))


def _os(root: ET.Element, spec: VMSpec, files: Mapping[Path, str]) -> None:
    os_ = ET.SubElement(root, "os")
    _text(os_, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.firmware is not None:
        _text(os_, "loader", files.get(spec.firmware, str(spec.firmware)), type="rom", readonly="yes")
    _text(os_, "kernel", files.get(spec.kernel, str(spec.kernel)))
    if spec.initrd is not None:
        _text(os_, "initrd", files.get(spec.initrd, str(spec.initrd)))
    if spec.cmdline:
        _text(os_, "cmdline", spec.cmdline)


def _cpu(root: ET.Element, model: str) -> None:
    if model == "max":
        ET.SubElement(root, "cpu", mode="maximum", check="none")
    elif model == "host":
        ET.SubElement(root, "cpu", mode="host-passthrough", check="none")
    else:
        cpu = ET.SubElement(root, "cpu", mode="custom", match="exact", check="none")
        _text(cpu, "model", model, fallback="forbid")


def _devices(
    root: ET.Element, spec: VMSpec, host: HostInfo, sockets: DomainSockets, emulator: str | None
) -> list[str]:
    """Adds ``<devices>``; returns the ``qemu:commandline`` arguments of what libvirt has no element for."""
    devices = ET.SubElement(root, "devices")
    binary = emulator or host.qemu.binary or "qemu-system-x86_64"
    _text(devices, "emulator", shutil.which(binary) or binary)  # libvirt takes an absolute path only
    if sockets.console is not None:
        serial = ET.SubElement(devices, "serial", type="unix")
        ET.SubElement(serial, "source", mode="bind", path=str(sockets.console))
        target = ET.SubElement(serial, "target", type="isa-serial", port="0")
        ET.SubElement(target, "model", name="isa-serial")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    extra: list[str] = []
    root_bus = "pcie.0" if "q35" in spec.machine else "pci.0"
    disks = 0
    for device in spec.devices:
        if (args := _commandline(device, root_bus, COMMANDLINE_SLOT + len(extra) // 4)) is not None:
            extra += args
        elif isinstance(device, VirtioSerialPort):
            channel = _chardev(devices, "channel", device.chardev, sockets)
            ET.SubElement(channel, "target", type="virtio", name=device.name)
            _alias(channel, device)
        elif isinstance(device, VhostVsockPci):
            vsock = ET.SubElement(devices, "vsock", model="virtio")
            ET.SubElement(vsock, "cid", auto="no", address=str(device.guest_cid))
            _alias(vsock, device)
        elif isinstance(device, VirtioRngPci):
            rng = ET.SubElement(devices, "rng", model="virtio")
            ET.SubElement(rng, "backend", model="builtin")
            _alias(rng, device)
        elif isinstance(device, VirtioBlkPci):
            disk = ET.SubElement(devices, "disk", type="file", device="disk")
            ET.SubElement(disk, "driver", name="qemu", type="raw")
            ET.SubElement(disk, "source", file=str(device.path))
            ET.SubElement(disk, "target", dev=f"vd{chr(ord('a') + disks)}", bus="virtio")
            if device.read_only:
                ET.SubElement(disk, "readonly")
            _alias(disk, device)
            disks += 1
        elif isinstance(device, TpmCrb):
            tpm = ET.SubElement(devices, "tpm", model="tpm-crb")
            backend = ET.SubElement(tpm, "backend", type="external")
            ET.SubElement(backend, "source", type="unix", mode="connect", path=str(device.chardev.path))
            _alias(tpm, device)
        else:
            raise _unsupported(spec, device)
    return extra


def _commandline(device: Device, bus: str, slot: int) -> list[str] | None:
    """The ``qemu:commandline`` arguments of a device libvirt has no element for, at a fixed PCI slot that
    libvirt, knowing nothing of the device, does not hand out; None for every other device."""
    if isinstance(device, VhostUserVsockPci) and isinstance(device.chardev, ChardevSocket):
        # libvirt's <vsock> is the kernel's vhost-vsock only: vhost-user vsock has no element.
        flag, value = device.args()
        return [*device.chardev.args(), flag, f"{value},bus={bus},addr={slot:#x}"]
    if isinstance(device, VirtioNetUser):
        # <interface type='user'> forwards host ports only with the passt backend, not QEMU's user network.
        return ["-netdev", device.netdev(), "-device", f"{device.args()[-1]},bus={bus},addr={slot:#x}"]
    return None


def _chardev(devices: ET.Element, tag: str, chardev: Chardev, sockets: DomainSockets) -> ET.Element:
    if isinstance(chardev, ChardevChannel):
        element = ET.SubElement(devices, tag, type="unix")
        ET.SubElement(element, "source", mode="bind", path=str(sockets.channels[chardev.id]))
    elif isinstance(chardev, ChardevSocket) and chardev.path is not None:
        element = ET.SubElement(devices, tag, type="unix")
        mode = "bind" if chardev.server else "connect"
        ET.SubElement(element, "source", mode=mode, path=str(chardev.path))
    elif isinstance(chardev, ChardevFile):
        element = ET.SubElement(devices, tag, type="file")
        ET.SubElement(element, "source", path=str(chardev.path))
    else:
        raise LibvirtUnsupported(
            f"chardev {chardev.id} ({type(chardev).__name__}) has no libvirt form here",
            hint="use ChardevChannel, a ChardevSocket with a path, or ChardevFile",
            id=chardev.id,
        )
    return element


def _alias(element: ET.Element, device: Device) -> None:
    ET.SubElement(element, "alias", name=f"ua-{device.id}")  # libvirt's user aliases start with ua-


def _unsupported(spec: VMSpec, device: Device) -> LibvirtUnsupported:
    return LibvirtUnsupported(
        f"{spec.name}: device {device.id} ({type(device).__name__}) is not rendered by the libvirt backend",
        hint="boot this VM with the QEMU backend (--backend qemu); the enclave carve's vCPU and virtio-mem "
        "devices and harness-served vhost-user channels stay QEMU-direct",
        device=device.id,
    )


def _launch_security(root: ET.Element, spec: VMSpec) -> None:
    guest = spec.confidential
    if guest is None:
        return
    if isinstance(guest, SevSnpGuest):
        element = ET.SubElement(
            root,
            "launchSecurity",
            type="sev-snp",
            authorKey="yes" if guest.author_key_enabled else "no",
            kernelHashes="yes" if guest.kernel_hashes else "no",
        )
        _text(element, "cbitpos", str(guest.cbitpos))
        _text(element, "reducedPhysBits", str(guest.reduced_phys_bits))
        _text(element, "policy", f"0x{guest.policy:08x}")
        for tag, blob in (
            ("idBlock", guest.id_block),
            ("idAuth", guest.id_auth),
            ("hostData", guest.host_data),
        ):
            if blob is not None:
                _text(element, tag, base64.b64encode(blob).decode())
    elif isinstance(guest, TdxGuest):
        element = ET.SubElement(root, "launchSecurity", type="tdx")
        _text(element, "policy", f"0x{guest.td_attributes:x}")
        for tag, name in (
            ("mrConfigId", "mrconfigid"),
            ("mrOwner", "mrowner"),
            ("mrOwnerConfig", "mrownerconfig"),
        ):
            value = getattr(guest, name)
            if value is not None:
                _text(element, tag, base64.b64encode(value).decode())
        socket = guest.quote_generation_socket
        if isinstance(socket, tuple):
            raise LibvirtUnsupported(
                f"{spec.name}: libvirt reaches the TDX quote generation service by Unix socket only",
                hint="pass quote_generation_socket=Path('/var/run/tdx-qgs/qgs.socket') (the QGS's socket)",
                socket=list(socket),
            )
        if socket is not None:
            ET.SubElement(element, "quoteGenerationService", path=str(socket))
    else:
        raise LibvirtUnsupported(
            f"{spec.name}: confidential guest {type(guest).__name__} has no launchSecurity form",
            hint="use SevSnpGuest or TdxGuest",
        )
