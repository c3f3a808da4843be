"""The facade that the CLI, the pytest plugin and the demo use: probes the host, builds images, boots
guests and owns their teardown."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from teelab_guest import protocol

from harness import images
from harness.agent import AGENT_CHANNEL, GuestAgent, agent_port
from harness.attest import Policy
from harness.enclave.carver import ParentVm
from harness.enclave.plan import DEFAULT_PARENT_ROLE, plan_enclave
from harness.enclave.pool import (
    MEMHP_ONLINE,
    EnclavePool,
    book_parent,
    boot_memory,
    hugepage_lock,
    layout_parent,
    rebook,
)
from harness.enclave.service import EnclaveApi
from harness.errors import ConfigError
from harness.host.hugepages import ensure_pool
from harness.host.model import HostInfo
from harness.host.probe import hugepage_pools, probe
from harness.libvirt.backend import libvirt_uri, new_machine, vm_backend
from harness.qemu.chardevs import ChardevChannel
from harness.qemu.devices import Device, VirtioNetUser
from harness.qemu.errors import MachineError
from harness.qemu.machine import Machine
from harness.qemu.objects import MemoryBackend, MemoryBackendMemfd
from harness.qemu.spec import VMSpec
from harness.ssh import NIC_ID, GuestSsh, SshUnavailable, free_port, open_ssh
from harness.tee.measure import SnpMeasurement, TdxMeasurement
from harness.tee.platforms import TeeAttachment, choose_backend
from harness.tee.vtpm import Vtpm, vtpm_is_ephemeral
from harness.vsock import ENCLAVE_GROUP, VsockAttachment, VsockHost, VsockProxy

READY_PATTERN = re.compile(protocol.READY_REGEX)
FAST_FIRMWARE = "qboot.rom"  # a minimal BIOS: boots a -kernel guest ~70 ms sooner than SeaBIOS under TCG


@dataclass(frozen=True)
class GuestBoot:
    """A guest that reached guest-init's readiness line."""

    machine: Machine
    role: str
    guest_uptime: float
    seconds: float  # host-measured, from launch to the readiness line
    agent: GuestAgent | None = None  # the guest agent, when the spec carries its port


@dataclass(frozen=True)
class CvmPlan:
    """A confidential VM ready to boot: ``spec`` with its TEE (real or emulated) and vsock attached."""

    name: str
    tee: TeeAttachment
    vsock: VsockAttachment | None
    vtpm: Vtpm | None = None

    @property
    def spec(self) -> VMSpec:
        return self.tee.spec

    def measurement_hex(self) -> str | None:
        """The launch measurement (SNP) or MRTD (TDX) the guest's evidence will carry, or None."""
        expected = self.tee.measurement
        if isinstance(expected, SnpMeasurement):
            return expected.measurement.hex()
        if isinstance(expected, TdxMeasurement):
            return expected.mrtd.hex()
        return None


class Lab:
    """One lab session: the host probe, the machines it launched and their teardown."""

    def __init__(
        self, host: HostInfo | None = None, *, backend: str | None = None, uri: str | None = None
    ) -> None:
        self.backend = vm_backend(backend)  # qemu (forked here) or libvirt (docs/libvirt.md)
        if uri and self.backend != "libvirt":
            raise ConfigError(
                f"a libvirt URI ({uri}) was given but the VM backend is {self.backend}",
                hint="pass backend='libvirt' (teelab --backend libvirt) with the URI",
            )
        self.libvirt_uri = libvirt_uri(uri) if self.backend == "libvirt" else None  # E463 for a refused one
        self.host = host or probe()
        self._machines: list[Machine] = []
        self._agents: dict[Machine, GuestAgent] = {}
        self._ssh: dict[Machine, GuestSsh] = {}
        self._closers: dict[Machine, list[Callable[[], None]]] = {}  # run once the machine has stopped
        self._vsock: VsockHost | None = None
        self.launched: list[Machine] = []  # every machine of this session, for artifact reports

    # -- specs ----------------------------------------------------------------------------------
    def spec_for_image(
        self,
        image: images.BuiltImage,
        *,
        name: str | None = None,
        role: str | None = None,
        vcpus: int = 2,
        memory_mib: int = 512,
        cmdline_extra: str = "",
        memory: MemoryBackend | None = None,
        devices: Sequence[Device] = (),
        agent: bool = True,
        ssh: bool = False,
    ) -> VMSpec:
        """A ``VMSpec`` that boots ``image``; ``role`` overrides the recipe's ``teelab.role=``; ``agent`` adds
        the guest agent's port; ``ssh`` a NIC with a loopback port forwarded to its SSH port (``Lab.ssh``)."""
        if ssh and (role or image.role) == "enclave":
            raise SshUnavailable(f"{name or image.name} is an enclave", hint="enclaves never get a NIC")
        if ssh:
            devices = (*devices, VirtioNetUser(NIC_ID, host_port=free_port()))
        cmdline = image.cmdline
        if role is not None:
            cmdline = with_role(cmdline, role)
        if cmdline_extra:
            cmdline = f"{cmdline} {cmdline_extra}"
        return VMSpec(
            name=name or image.name,
            kernel=image.boot_kernel(self.host.accel),
            initrd=image.initrd,
            cmdline=cmdline,
            vcpus=vcpus,
            memory_mib=memory_mib,
            memory=memory,
            devices=(agent_port(), *devices) if agent else tuple(devices),
            firmware=self._fast_firmware(),
        )

    def _fast_firmware(self) -> Path | None:
        """QEMU's qboot, where this QEMU ships it."""
        fast = self.host.qemu.firmware(FAST_FIRMWARE)
        return Path(fast) if fast else None

    # -- machines -------------------------------------------------------------------------------
    def launch(self, spec: VMSpec, *, artifacts: Path | None = None) -> Machine:
        """Validate, launch and track a machine; ``close()`` stops it if the caller does not."""
        machine = new_machine(self.backend, spec, self.host, artifacts=artifacts, uri=self.libvirt_uri)
        self.launched.append(machine)
        machine.launch()
        self._machines.append(machine)
        return machine

    def boot(
        self,
        spec: VMSpec,
        *,
        timeout: float = 60.0,
        on_launch: Callable[[Machine], Any] | None = None,
        closers: Sequence[Callable[[], None]] = (),
    ) -> GuestBoot:
        """Launch ``spec`` and wait for guest-init's readiness line. ``on_launch`` runs as soon as QEMU is up
        (to serve a device's port); ``closers`` run once the machine has stopped, or at once if it fails to
        start."""
        started = time.monotonic()
        try:
            machine = self.launch(spec)
        except BaseException:
            _run_all(closers)
            raise
        self._closers[machine] = list(closers)
        try:
            if on_launch is not None:
                on_launch(machine)
            match = machine.wait_for_console(READY_PATTERN, timeout)
            seconds = time.monotonic() - started
            agent = self.agent(machine) if _has_agent(spec) else None
        except BaseException:
            self.stop(machine, powerdown_timeout=0)
            raise
        return GuestBoot(machine, match["role"], float(match["uptime"]), seconds, agent)

    # -- vsock and confidential VMs -------------------------------------------------------------
    @property
    def vsock(self) -> VsockHost:
        """This lab's vsock (backend chosen by the probe and teelab.toml), made on first use."""
        if self._vsock is None:
            self._vsock = VsockHost(self.host)
        return self._vsock

    @contextlib.contextmanager
    def vsock_proxy(
        self, port: int, remote: tuple[str, int], allowlist: list[tuple[str, int]] | None = None
    ) -> Iterator[VsockProxy]:
        """Forward guest connections to host (CID 2) ``port`` to ``remote``, which must be on ``allowlist``
        (default: ``remote`` alone)."""
        with VsockProxy(self.vsock.listen(port), remote, allowlist) as proxy:
            yield proxy

    def tee_mode(self, kind: str) -> str:
        """``real`` when this host runs ``kind`` (snp, tdx) guests on hardware, else ``emulated``."""
        return "emulated" if choose_backend(kind, self.host).emulated else "real"  # type: ignore[arg-type]

    def plan_cvm(
        self,
        image: images.BuiltImage,
        *,
        name: str,
        kind: str = "snp",
        mode: str = "auto",
        cmdline_extra: str = "",
        vcpus: int = 2,
        memory_mib: int = 512,
        vsock: bool = True,
        group: str | None = None,
        cid: int | None = None,
        vtpm: str | None = None,
        devices: Sequence[Device] = (),
        **tee_options: Any,
    ) -> CvmPlan:
        """A confidential VM booting ``image`` with role ``cvm``: the TEE of ``kind`` (real where the host has
        it unless ``mode`` says otherwise, emulated elsewhere), with ``vsock`` a vsock device, with ``vtpm``
        ("ephemeral" or "persistent") a vTPM (swtpm, started now, stopped with the VM); ``devices`` are added
        (a data disk)."""
        attachment = self.vsock.attach(name, group=group, cid=cid) if vsock else None
        own = tuple(attachment.devices) if attachment else ()
        tpm = None
        try:
            if vtpm is not None:
                tpm = Vtpm(name, ephemeral=vtpm_is_ephemeral(vtpm)).start()
            shared = attachment is not None and attachment.needs_shared_memory
            spec = self.spec_for_image(
                image, name=name, role="cvm", vcpus=vcpus, memory_mib=memory_mib, cmdline_extra=cmdline_extra,
                memory=MemoryBackendMemfd("ram0", memory_mib, share=True) if shared else None,
                devices=(*own, *((tpm.device(),) if tpm else ()), *devices),
            )  # fmt: skip
            tee = choose_backend(kind, self.host, mode, **tee_options).attach(spec, self.host)  # type: ignore[arg-type]
        except BaseException:
            if tpm is not None:
                tpm.close()
            if attachment is not None:
                self.vsock.detach(name)
            raise
        return CvmPlan(name, tee, attachment, tpm)

    def boot_planned(self, plan: CvmPlan, *, timeout: float = 60.0) -> GuestBoot:
        """Boot a planned CVM; its TEE service and vsock go when it stops."""
        closers = [plan.tee.close]
        if plan.vtpm is not None:
            closers.append(plan.vtpm.close)
        if plan.vsock is not None:
            closers.append(lambda: self.vsock.detach(plan.name))
        return self.boot(plan.spec, timeout=timeout, on_launch=plan.tee.after_launch, closers=closers)

    def boot_cvm(self, image: str | images.BuiltImage, *, timeout: float = 60.0, **options: Any) -> GuestBoot:
        """Plan and boot a CVM from an image (name or built image); see ``plan_cvm`` for ``options``."""
        built = images.build(image) if isinstance(image, str) else image
        options.setdefault("name", built.name)
        return self.boot_planned(self.plan_cvm(built, **options), timeout=timeout)

    def ssh(self, machine: Machine, policy: Policy | None = None) -> GuestSsh:
        """An SSH session (paramiko) to a machine booted with a NIC (``ssh=True``), its host key pinned from
        what the guest reports over its agent, or with ``policy`` (a CVM) from its verified evidence; one per
        machine, closed when it stops."""
        if machine not in self._ssh:
            session = open_ssh(self.agent(machine), machine.spec, policy)
            self._ssh[machine] = session
            self._closers.setdefault(machine, []).insert(0, session.close)
        return self._ssh[machine]

    def agent(self, machine: Machine) -> GuestAgent:
        """The guest agent of a machine this lab launched (one per machine)."""
        if machine not in self._agents:
            self._agents[machine] = GuestAgent(machine)
        return self._agents[machine]

    def boot_image(self, name: str, *, timeout: float = 60.0, **spec_options: object) -> GuestBoot:
        """Build (or take from the cache) image ``name`` and boot it."""
        image = images.build(name)
        return self.boot(self.spec_for_image(image, **spec_options), timeout=timeout)  # type: ignore[arg-type]

    def boot_parent(
        self,
        image: str | images.BuiltImage = "parent",
        *,
        name: str = "parent",
        pool: EnclavePool | None = None,
        vcpus: int = 2,
        memory_mib: int = 512,
        group: str | None = None,
        tee: str | None = None,
        timeout: float = 120.0,
    ) -> ParentVm:
        """Boot a parent with an enclave pool (``pool``, default 2 vCPUs and 256 MiB): ``memory_mib`` of
        boot RAM and the pool on hugepages (reserved in the host's pool when short: needs root), the pool's
        vCPUs as devices, every vCPU pinned as the ledger booked it, vsock at CID 3 of its routing group;
        with ``tee`` ("snp", "tdx") a confidential parent, real where the host has it, emulated elsewhere.
        Its enclaves (``ParentVm.carve``) end with it."""
        built = images.build(image) if isinstance(image, str) else image
        layout = layout_parent(
            self.host, name, pool or EnclavePool(), kept_vcpus=vcpus, boot_memory_mib=memory_mib
        )
        ledger = self.vsock.ledger
        pages = contextlib.ExitStack()  # the hugepage lock, until the parent holds all its pages
        pages.enter_context(hugepage_lock(ledger))
        group = group or f"{name}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        closers: list[Callable[[], None]] = []
        try:
            ensure_pool(layout.pool.page_kib, layout.pages(memory_mib + layout.pool.memory_mib))
            self.host = replace(self.host, hugepages=hugepage_pools(Path("/")))
            attachment = self.vsock.attach(name, group=group, cid=3, group_kind=ENCLAVE_GROUP)
            closers.append(lambda: self.vsock.detach(name))
            values = book_parent(ledger, layout)
            spec = self.spec_for_image(
                built, name=name, role="parent", vcpus=vcpus, memory_mib=memory_mib,
                cmdline_extra=MEMHP_ONLINE, memory=boot_memory(layout),
                devices=(*layout.devices, *attachment.devices),
            )  # fmt: skip
            spec = replace(spec, max_vcpus=vcpus + len(layout.pool_vcpus))
            attached = choose_backend(tee, self.host).attach(spec, self.host) if tee else None  # type: ignore[arg-type]
            if attached is not None:
                closers.append(attached.close)
                spec = attached.spec
        except BaseException:
            pages.close()
            _run_all(closers)
            raise
        parents: list[ParentVm] = []
        closers.insert(0, lambda: [p.close() for p in parents])
        # The hugepage lock is held until the pool region is plugged: QEMU preallocates boot RAM at launch,
        # but the pool's pages only when the guest's virtio-mem driver plugs its blocks, after boot; a
        # parent booting meanwhile in another process would count them as free and fail to map its own.
        with pages:
            boot = self.boot(
                spec, timeout=timeout, closers=closers,
                on_launch=attached.after_launch if attached is not None else None,
            )  # fmt: skip
            try:
                threads = boot.machine.vcpu_threads()
                for vcpu, cpu in layout.vcpu_host.items():
                    os.sched_setaffinity(threads[vcpu], {cpu})
                rebook(ledger, layout, boot.machine.pid)
                parent = ParentVm(
                    layout, boot.machine, self.host, self.vsock, group, ledger, values, boot=boot
                )
                parents.append(parent)
                parent.closers.append(EnclaveApi(parent).close)  # teelab-enclave's requests from the parent
                parent.order({"op": "status"})  # the pool service is up
                parent.settle_pool()
            except BaseException:
                self.stop(boot.machine, powerdown_timeout=0)
                raise
        return parent

    def boot_enclave(
        self,
        eif_path: str | os.PathLike[str],
        *,
        debug: bool = False,
        parent_role: str = DEFAULT_PARENT_ROLE,
        parent_instance: str | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        agent: bool = True,
        name: str | None = None,
        timeout: float = 60.0,
    ) -> GuestBoot:
        """Boot an enclave image (EIF) with its emulated security module: PCR0-2 (and 8) from the image, PCR3
        and PCR4 from ``parent_role``/``parent_instance``; documents carry zero PCRs when ``debug``.

        No network, no disk; ``agent`` adds the lab's agent port. ``stop``/``close`` end it: QEMU, and with
        its port the module's service; the kernel and initrd memfds are closed once QEMU has loaded them.
        Bad input (E932/E933 sizing, E901-E913 image) raises before anything starts.
        """
        launch = plan_enclave(
            eif_path, host=self.host, debug=debug, parent_role=parent_role, parent_instance=parent_instance,
            vcpus=vcpus, memory_mib=memory_mib, agent=agent, firmware=self._fast_firmware(), name=name,
        )  # fmt: skip

        def serve(machine: Machine) -> None:
            launch.release_files()  # QEMU holds its own copies of the kernel and initrd now
            launch.serve(machine)

        return self.boot(launch.spec, timeout=timeout, on_launch=serve, closers=[launch.close])

    def stop(self, machine: Machine, powerdown_timeout: float = 10.0) -> None:
        if machine in self._machines:
            self._machines.remove(machine)
        self._ssh.pop(machine, None)
        agent = self._agents.pop(machine, None)
        if agent is not None:
            agent.close()
        try:
            if machine.exit_info is None:
                machine.shutdown(powerdown_timeout=powerdown_timeout)
        finally:
            _run_all(self._closers.pop(machine, []))

    def close(self) -> None:
        """Stop every machine this lab launched, newest first, then the lab's vsock. A machine's closer that
        fails does not keep the other machines running: the first such failure is raised at the end."""
        try:
            _run_all([functools.partial(self._stop_at_close, m) for m in reversed(self._machines)])
        finally:
            if self._vsock is not None:
                self._vsock.close()
                self._vsock = None

    def _stop_at_close(self, machine: Machine) -> None:
        with contextlib.suppress(MachineError):
            self.stop(machine, powerdown_timeout=3.0)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_all(closers: Sequence[Callable[[], None]]) -> None:
    """Run every closer even when one fails; the first failure is raised after the rest have run."""
    failure: BaseException | None = None
    for close in closers:
        try:
            close()
        except Exception as exc:  # keep closing the rest
            failure = failure or exc
    if failure is not None:
        raise failure


def _has_agent(spec: VMSpec) -> bool:
    return any(isinstance(c, ChardevChannel) and c.id == AGENT_CHANNEL for c in spec.chardevs())


def tpm_guest(boot: GuestBoot, module: str = "teelab_guest.tpm_attest") -> Callable[..., dict[str, Any]]:
    """Runs ``module`` (``tpm_attest``, or ``tpm_disk``) in a booted guest through its agent, for
    ``harness.tee.vtpm_attest`` and ``vtpm_disk``: ``call(args, stdin=b"")`` returns the JSON it printed."""
    agent = boot.agent
    if agent is None:
        raise MachineError(f"{boot.machine.spec.name} has no guest agent", hint="boot it with agent=True")

    def call(args: Sequence[str], stdin: bytes = b"") -> dict[str, Any]:
        done = agent.exec(["python3", "-m", module, *args], stdin=stdin, check=True, timeout=120)
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    return call


def with_role(cmdline: str, role: str) -> str:
    """``cmdline`` with its ``teelab.role=`` set to ``role``."""
    words = [w for w in cmdline.split() if not w.startswith("teelab.role=")]
    return " ".join([*words, f"teelab.role={role}"])
