"""Plan the launch of an enclave image (EIF) as a guest: the sizing rules, the kernel and concatenated
ramdisks in sealed memfds (measured while copied), and the emulated security module with the image's PCRs
0, 1, 2 (8) and the parent's PCR3 and PCR4 behind the VM's security-processor port."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teelab_guest.enclave_app import EXIT_REGEX, AppDocument, parse_document_line

from harness.agent import agent_port
from harness.enclave import errors
from harness.enclave.eif import EifImage, ImageHasher, SectionType, read_eif
from harness.enclave.nsm import SecurityModule
from harness.enclave.pcrs import pcr3_of_parent_role, pcr4_of_parent_instance
from harness.host.model import HostInfo
from harness.qemu.machine import Machine
from harness.qemu.spec import VMSpec
from harness.tee.platforms import TEE_CHANNEL, EmulatedNsmBackend, TeeAttachment, lab_authority

MIB = 1 << 20
MIN_MEMORY_MIB = 128
IMAGE_MEMORY_FACTOR = 4  # an enclave needs >= 4 x its image in RAM
MIN_VCPUS = 2
MAX_VCPUS = 62
DEFAULT_VCPUS = 2
DEFAULT_MEMORY_MIB = 512
DEFAULT_PARENT_ROLE = "teelab-host"
SEALS = ("F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE")
_VM_NAME_JUNK = re.compile(r"[^A-Za-z0-9._-]+")


def minimum_memory_mib(eif_bytes: int | None) -> int:
    """128 MiB, or 4 x the image rounded up to a whole MiB when that is more."""
    return max(MIN_MEMORY_MIB, -(-IMAGE_MEMORY_FACTOR * (eif_bytes or 0) // MIB))


def check_vcpus(vcpus: object, *, where: str = "the enclave") -> None:
    """E933 unless ``vcpus`` is even and 2-62 (whole cores; the QingTian and Nitro rule)."""
    whole = isinstance(vcpus, int) and not isinstance(vcpus, bool)
    if not whole or vcpus % 2 or not MIN_VCPUS <= vcpus <= MAX_VCPUS:  # type: ignore[operator]
        raise errors.EnclaveVcpuCount(
            f"{where}: {vcpus!r} vCPUs; an enclave takes an even number from {MIN_VCPUS} to {MAX_VCPUS}",
            hint=f"give vcpus = {max(MIN_VCPUS, min(MAX_VCPUS, _even(vcpus)))}",
            vcpus=vcpus,
        )


def check_memory(memory_mib: object, eif_bytes: int | None, *, where: str = "the enclave") -> None:
    """E932 unless ``memory_mib`` is at least 128 and at least 4 x the image (when its size is known)."""
    need = minimum_memory_mib(eif_bytes)
    if isinstance(memory_mib, bool) or not isinstance(memory_mib, int) or memory_mib < need:
        of_image = f" and 4 x the {eif_bytes:,}-byte image" if eif_bytes else ""
        raise errors.EnclaveMemoryTooSmall(
            f"{where}: {memory_mib!r} MiB of memory; an enclave needs at least {need} MiB "
            f"({MIN_MEMORY_MIB} MiB{of_image})",
            hint=f"give memory_mib = {need} or more",
            memory_mib=memory_mib,
            minimum_mib=need,
            eif_bytes=eif_bytes,
        )


@dataclass
class EnclaveLaunch:
    """What boots one enclave: ``spec`` (kernel and initrd are this process's memfds, named by /proc paths),
    the ``attachment`` that serves ``module`` on the VM's port once launched, and the boot PCRs."""

    image: EifImage
    spec: VMSpec
    attachment: TeeAttachment
    module: SecurityModule
    enclave_id: str
    pcrs: Mapping[int, bytes]
    debug: bool
    files: list[int] = field(default_factory=list)

    def serve(self, machine: Machine) -> None:
        """Answer the module on the launched VM's port (the service owns its copy of the port's socket and
        closes it on QEMU's EOF). The launch is kept (``launch_of``) as long as the machine object lives."""
        service = self.attachment.service
        assert service is not None
        service.serve_socket(machine.channel(TEE_CHANNEL), machine.loop)
        _LAUNCHED[machine] = self

    def release_files(self) -> None:
        """Close the kernel and initrd memfds: once QEMU has started it holds its own copy."""
        while self.files:
            os.close(self.files.pop())

    def close(self) -> None:
        """Release the files and stop serving the module (the service also ends when the VM's port closes)."""
        self.release_files()
        self.attachment.close()

    def __enter__(self) -> EnclaveLaunch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LAUNCHED: weakref.WeakKeyDictionary[Machine, EnclaveLaunch] = weakref.WeakKeyDictionary()


def launch_of(machine: Machine) -> EnclaveLaunch | None:
    """The launch behind an enclave machine (its module, PCRs, enclave id, service), or None."""
    return _LAUNCHED.get(machine)


def plan_enclave(
    eif_path: str | os.PathLike[str],
    *,
    host: HostInfo,
    debug: bool = False,
    parent_role: str = DEFAULT_PARENT_ROLE,
    parent_instance: str | None = None,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    agent: bool = True,
    firmware: Path | None = None,
    name: str | None = None,
    authority: Any = None,
) -> EnclaveLaunch:
    """Check everything, then prepare the launch of ``eif_path``; nothing is left behind when this raises.

    ``vcpus``/``memory_mib`` default to the image's CPUCount/MemoryMiB metadata (teelab recipes write them),
    else 2 vCPUs and 512 MiB (at least the image's minimum). ``parent_instance`` defaults to the host name.
    ``agent`` adds the lab's agent port (lab and test mode); the VM has no network and no disk.
    Raises E933/E932 for sizing, E901-E913 for a bad image, E912 for a signed image that does not verify,
    E916 for an empty parent role or instance, E936 when the file changes while it is copied, E3xx for a spec
    the host cannot run.
    """
    if vcpus is not None:
        check_vcpus(vcpus)
    image = read_eif(eif_path)
    if image.arch != "x86_64":
        raise errors.EifInputInvalid(
            f"{eif_path} is an {image.arch} image; this lab boots x86_64 enclaves",
            hint="build the image for x86_64",
        )
    custom = (image.metadata or {}).get("CustomMetadata")
    if not isinstance(custom, dict):  # any JSON in an image from elsewhere: then it holds no defaults
        custom = {}
    if vcpus is None:
        vcpus = _int_or(custom.get("CPUCount"), DEFAULT_VCPUS)
        check_vcpus(vcpus, where=f"{eif_path} (its CPUCount metadata)")
    if memory_mib is None:
        wanted = _int_or(custom.get("MemoryMiB"), DEFAULT_MEMORY_MIB)
        memory_mib = max(wanted, _even(minimum_memory_mib(image.size)))
    check_memory(memory_mib, image.size)
    instance = parent_instance if parent_instance is not None else (socket.gethostname() or "lab-host")
    pcrs = {
        **image.measurements.as_pcrs(),
        3: pcr3_of_parent_role(parent_role),
        4: pcr4_of_parent_instance(instance),
    }
    if image.is_signed:
        image.require_valid_signature()
    enclave_id = f"{instance}-enc{os.urandom(8).hex()}"
    module = SecurityModule(
        pcrs,
        debug=debug,
        issue_document=(authority or lab_authority()).attestation_document,
        module_id=enclave_id,
    )
    files: list[int] = []
    try:
        kernel, initrd = _load_into_memfds(image, files)
        spec = VMSpec(
            name=name or _vm_name(image),
            kernel=kernel,
            initrd=initrd,
            cmdline=_cmdline_text(image),
            vcpus=vcpus,
            memory_mib=memory_mib,
            devices=(agent_port(),) if agent else (),
            firmware=firmware,
        )
        attachment = EmulatedNsmBackend(module=module).attach(spec, host)
    except BaseException:
        for fd in files:
            os.close(fd)
        raise
    return EnclaveLaunch(image, attachment.spec, attachment, module, enclave_id, pcrs, debug, files)


def wait_for_app(machine: Machine, timeout: float = 60.0) -> AppDocument:
    """Wait for the enclave application's exit line on the console and return the attestation document it
    reported; E934 when it failed or reported none, E4xx when the line never came."""
    status = int(machine.wait_for_console(EXIT_REGEX, timeout)["status"])
    reported = parse_document_line(machine.console_text())
    if status != 0 or reported is None:
        raise errors.EnclaveAppFailed(
            f"{machine.spec.name}: /app/run exited with status {status}"
            + ("" if reported else " and reported no attestation document"),
            hint=f"read its output in {machine.console_log}",
            status=status,
            console_tail=machine.console_text()[-1500:],
        )
    return reported


def _load_into_memfds(image: EifImage, files: list[int]) -> tuple[Path, Path]:
    """Copy the kernel, and the ramdisks concatenated, into two sealed memfds (appended to ``files``), hashing
    what is copied; E936 unless that gives the image's PCR0-2. Returns their /proc paths for QEMU."""
    kernel_fd = _memfd("teelab-enclave-kernel")
    files.append(kernel_fd)
    initrd_fd = _memfd("teelab-enclave-initrd")
    files.append(initrd_fd)
    hasher = ImageHasher()
    with open(kernel_fd, "wb", closefd=False) as kernel, open(initrd_fd, "wb", closefd=False) as initrd:
        outputs = {SectionType.KERNEL: kernel, SectionType.RAMDISK: initrd}
        for section in image.sections:
            feeds = hasher.feeds(section.type)
            if section.type is SectionType.CMDLINE:  # the command line QEMU is given, from the first read
                for pcr in feeds:
                    pcr.update(image.cmdline)
            elif section.type in outputs:
                for chunk in image.section_chunks(section):
                    outputs[section.type].write(chunk)
                    for pcr in feeds:
                        pcr.update(chunk)
    copied = (hasher.pcr0.value, hasher.pcr1.value, hasher.pcr2.value)
    measured = image.measurements
    if copied != (measured.pcr0, measured.pcr1, measured.pcr2):
        raise errors.EnclaveImageChanged(
            f"{image.path} changed while it was being launched: PCR0 read {measured.pcr0.hex()[:16]}..., "
            f"copied {copied[0].hex()[:16]}...",
            hint="do not rewrite an image while an enclave is launched from it; launch it again",
        )
    for fd in (kernel_fd, initrd_fd):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _seals())
    pid = os.getpid()
    return Path(f"/proc/{pid}/fd/{kernel_fd}"), Path(f"/proc/{pid}/fd/{initrd_fd}")


def _memfd(name: str) -> int:
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def _seals() -> int:
    seals = 0
    for seal in SEALS:
        seals |= getattr(fcntl, seal)
    return seals


def _cmdline_text(image: EifImage) -> str:
    try:
        return image.cmdline.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.EifInputInvalid(
            f"the command line of {image.path} is not UTF-8",
            hint="rebuild the image with a text command line",
        ) from None


def _vm_name(image: EifImage) -> str:
    label = str((image.metadata or {}).get("ImageName") or "")
    cleaned = _VM_NAME_JUNK.sub("-", label).strip("-._")[:48]
    return f"enclave-{cleaned}" if cleaned else "enclave"


def _int_or(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _even(value: object) -> int:
    number = value if isinstance(value, int) and not isinstance(value, bool) else MIN_VCPUS
    return number + number % 2
