"""``VMSpec``: a backend-neutral description of one VM, and its validation against a probed host."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from harness.host.model import Accel, HostInfo
from harness.qemu.chardevs import Chardev
from harness.qemu.devices import Device
from harness.qemu.epc import CPU_FEATURES as EPC_CPU_FEATURES
from harness.qemu.epc import EpcSection, validate_epc
from harness.qemu.errors import (
    AccelUnavailable,
    CmdlineError,
    DuplicateId,
    MachineTypeUnknown,
    MemorySizeError,
    MissingRequirement,
    OptionInvalid,
    SpecFileMissing,
    VcpuCountError,
)
from harness.qemu.objects import (
    ConfidentialGuest,
    HugepageDemand,
    MemoryBackend,
    check_hugepages,
)

MAX_VCPUS = 255
MIN_MEMORY_MIB = 64
MAX_CMDLINE_BYTES = 2048
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class VMSpec:
    """One VM: kernel boot, CPUs, memory, devices and an optional confidential guest."""

    name: str
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    vcpus: int = 1
    max_vcpus: int | None = None
    memory_mib: int = 256
    machine: str = "q35"
    cpu_model: str | None = None
    accel: Literal["kvm", "tcg"] | None = None
    memory: MemoryBackend | None = None
    devices: tuple[Device, ...] = ()
    confidential: ConfidentialGuest | None = None
    firmware: Path | None = None
    epc: tuple[EpcSection, ...] = ()  # SGX EPC sections (SGX hosts)

    def resolved_accel(self, host: HostInfo) -> Accel:
        return self.accel or host.accel

    def resolved_cpu_model(self, host: HostInfo) -> str:
        model = self.cpu_model or ("host" if self.resolved_accel(host) == "kvm" else "max")
        return ",".join((model, *EPC_CPU_FEATURES)) if self.epc else model

    def memory_backends(self) -> tuple[MemoryBackend, ...]:
        """The boot RAM backend (if any), then the devices' backends, in device order."""
        own = (self.memory,) if self.memory is not None else ()
        return own + tuple(b for d in self.devices for b in d.memory_backends())

    def chardevs(self) -> tuple[Chardev, ...]:
        return tuple(c for d in self.devices for c in d.chardevs())

    def hotplug_mib(self) -> int:
        return sum(d.hotplug_mib for d in self.devices)

    def validate(self, host: HostInfo) -> None:
        """Raise a coded SpecError for the first thing QEMU or this host could not do."""
        self._check_scalars()
        self._check_files()
        accel = self.resolved_accel(host)
        if self.accel == "kvm" and host.accel != "kvm":
            raise AccelUnavailable(
                f"{self.name} asks for KVM but the host probe chose TCG: {host.accel_reason}",
                hint="leave accel=None to take the probe's choice, or run on a host with usable KVM",
                accel_reason=host.accel_reason,
            )
        if host.qemu.machine_types and self.machine not in host.qemu.machine_types:
            raise MachineTypeUnknown(
                f"QEMU has no machine type {self.machine!r}",
                hint=f"use one of: {', '.join(sorted(host.qemu.machine_types)[:12])}",
                machine=self.machine,
            )
        self._check_ids()
        if self.confidential is not None:
            self.confidential.validate(host, accel)
        if self.epc:
            validate_epc(self.name, self.epc, host, accel)
        for part in (*self.chardevs(), *self.memory_backends(), *self.devices):
            part.validate(host)
        self._check_hugepage_total(host)
        self._check_requirements()

    def _check_scalars(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise OptionInvalid(
                f"VM name {self.name!r} is not a plain name",
                hint="use up to 64 letters, digits, '.', '_' and '-', starting with a letter or digit",
                name=self.name,
            )
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise VcpuCountError(
                f"{self.name}: vcpus={self.vcpus}", hint=f"use 1 to {MAX_VCPUS} vCPUs", vcpus=self.vcpus
            )
        if self.max_vcpus is not None and not self.vcpus <= self.max_vcpus <= MAX_VCPUS:
            raise VcpuCountError(
                f"{self.name}: max_vcpus={self.max_vcpus} with vcpus={self.vcpus}",
                hint=f"set max_vcpus between vcpus ({self.vcpus}) and {MAX_VCPUS}, or None",
                vcpus=self.vcpus,
                max_vcpus=self.max_vcpus,
            )
        if self.memory_mib < MIN_MEMORY_MIB:
            raise MemorySizeError(
                f"{self.name}: memory_mib={self.memory_mib} is below {MIN_MEMORY_MIB} MiB",
                hint=f"give the guest at least memory_mib={MIN_MEMORY_MIB}",
                memory_mib=self.memory_mib,
            )
        size = len(self.cmdline.encode())
        if size > MAX_CMDLINE_BYTES or "\n" in self.cmdline or "\r" in self.cmdline:
            raise CmdlineError(
                f"{self.name}: kernel command line is {size} bytes"
                + (" and contains a newline" if "\n" in self.cmdline or "\r" in self.cmdline else ""),
                hint=f"keep cmdline on one line and under {MAX_CMDLINE_BYTES} bytes; pass data by initrd",
                size=size,
            )

    def _check_files(self) -> None:
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd), ("firmware", self.firmware)):
            if path is not None and not Path(path).is_file():
                raise SpecFileMissing(
                    f"{self.name}: {what} {path} does not exist",
                    hint=f"build or fetch the {what} first, or point {what}= at an existing file",
                    path=str(path),
                )

    def _check_ids(self) -> None:
        controllers = {c[0] for d in self.devices if (c := d.controller()) is not None}
        objects = [b.id for b in self.memory_backends()]
        if self.confidential is not None:
            objects.append(self.confidential.id)
        for kind, ids in (
            ("object", objects),
            ("chardev", [c.id for c in self.chardevs()]),
            ("device", [d.id for d in self.devices] + sorted(controllers)),
        ):
            refuse_duplicate_ids(kind, ids)

    def _check_hugepage_total(self, host: HostInfo) -> None:
        demands = [d for b in self.memory_backends() if (d := b.hugepage_demand()) is not None]
        if len(demands) < 2:
            return
        totals: Counter[tuple[int, tuple[int, ...]]] = Counter()
        for d in demands:
            totals[d.page_kib, d.nodes] += d.pages
        for (page_kib, nodes), pages in totals.items():
            check_hugepages(host, HugepageDemand(page_kib, pages, nodes), f"{self.name}'s memory backends")

    def _check_requirements(self) -> None:
        if self.memory is not None and self.memory.size_mib != self.memory_mib:
            raise MemorySizeError(
                f"{self.name}: memory backend {self.memory.id} is {self.memory.size_mib} MiB "
                f"but memory_mib is {self.memory_mib}",
                hint=f"make the backend size_mib={self.memory_mib} (hotpluggable memory goes to virtio-mem)",
            )
        needs_shared = [d.id for d in self.devices if d.needs_shared_memory]
        if needs_shared and not (self.memory is not None and self.memory.shared):
            raise MissingRequirement(
                f"{self.name}: device {needs_shared[0]} needs guest RAM shared with its vhost-user backend",
                hint="set memory=MemoryBackendMemfd(id, size_mib, share=True) "
                "(or a MemoryBackendFile with share=True)",
                device=needs_shared[0],
            )
        guest = self.confidential
        if guest is None:
            return
        kinds = guest.memory_types
        fits = isinstance(self.memory, kinds) and (self.memory.shared or not guest.needs_shared_memory)
        if kinds and not fits:
            names = " or ".join(k.__name__ for k in kinds)
            raise MissingRequirement(
                f"{self.name}: {guest.qemu_type} needs its RAM in a shared {names}",
                hint=f"set memory={kinds[0].__name__}('ram1', {self.memory_mib}, share=True)",
            )
        if guest.needs_firmware and self.firmware is None:
            raise MissingRequirement(
                f"{self.name}: {guest.qemu_type} boots through OVMF but no firmware is set",
                hint="set firmware= to an OVMF.fd (the AmdSev build for SEV-SNP, a TDX-enabled one for TDX)",
            )


def refuse_duplicate_ids(kind: str, ids: Iterable[str]) -> None:
    seen = Counter(ids)
    twice = sorted(i for i, n in seen.items() if n > 1)
    if twice:
        raise DuplicateId(
            f"{kind} id {twice[0]!r} is used {seen[twice[0]]} times",
            hint=f"give every {kind} its own id",
            kind=kind,
            ids=twice,
        )
