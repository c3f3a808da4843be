"""The facade that the CLI, the pytest plugin and the demo use: probes the host, builds images, boots
guests and owns their teardown."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from teelab_guest import protocol

from harness import images
from harness.agent import AGENT_CHANNEL, GuestAgent, agent_port
from harness.enclave.run import DEFAULT_PARENT_ROLE, plan_enclave
from harness.host.model import HostInfo
from harness.host.probe import probe
from harness.qemu.machine import Machine, MachineError
from harness.qemu.spec import ChardevChannel, Device, MemoryBackend, VMSpec

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


class Lab:
    """One lab session: the host probe, the machines it launched and their teardown."""

    def __init__(self, host: HostInfo | None = None) -> None:
        self.host = host or probe()
        self._machines: list[Machine] = []
        self._agents: dict[Machine, GuestAgent] = {}
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
    ) -> VMSpec:
        """A ``VMSpec`` that boots ``image``; ``role`` overrides the recipe's ``teelab.role=``; ``agent`` adds
        the guest agent's port."""
        cmdline = image.cmdline
        if role is not None:
            cmdline = with_role(cmdline, role)
        if cmdline_extra:
            cmdline = f"{cmdline} {cmdline_extra}"
        return VMSpec(
            name=name or image.name,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=cmdline,
            vcpus=vcpus,
            memory_mib=memory_mib,
            memory=memory,
            devices=(agent_port(), *devices) if agent else tuple(devices),
            firmware=Path(fast) if (fast := self.host.qemu.firmware(FAST_FIRMWARE)) else None,
        )

    # -- machines -------------------------------------------------------------------------------
    def launch(self, spec: VMSpec, *, artifacts: Path | None = None) -> Machine:
        """Validate, launch and track a machine; ``close()`` stops it if the caller does not."""
        machine = Machine(spec, self.host, artifacts=artifacts)
        self.launched.append(machine)
        machine.launch()
        self._machines.append(machine)
        return machine

    def boot(self, spec: VMSpec, *, timeout: float = 60.0) -> GuestBoot:
        """Launch ``spec`` and wait for guest-init's readiness line."""
        started = time.monotonic()
        machine = self.launch(spec)
        try:
            match = machine.wait_for_console(READY_PATTERN, timeout)
            seconds = time.monotonic() - started
            agent = self.agent(machine) if _has_agent(spec) else None
        except MachineError:
            self.stop(machine)
            raise
        return GuestBoot(machine, match["role"], float(match["uptime"]), seconds, agent)

    def agent(self, machine: Machine) -> GuestAgent:
        """The guest agent of a machine this lab launched (one per machine)."""
        if machine not in self._agents:
            self._agents[machine] = GuestAgent(machine)
        return self._agents[machine]

    def boot_image(self, name: str, *, timeout: float = 60.0, **spec_options: object) -> GuestBoot:
        """Build (or take from the cache) image ``name`` and boot it."""
        image = images.build(name)
        return self.boot(self.spec_for_image(image, **spec_options), timeout=timeout)  # type: ignore[arg-type]

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
        fast = self.host.qemu.firmware(FAST_FIRMWARE)
        launch = plan_enclave(
            eif_path, host=self.host, debug=debug, parent_role=parent_role, parent_instance=parent_instance,
            vcpus=vcpus, memory_mib=memory_mib, agent=agent, firmware=Path(fast) if fast else None, name=name,
        )  # fmt: skip
        started = time.monotonic()
        try:
            machine = self.launch(launch.spec)
        except BaseException:
            launch.close()
            raise
        finally:
            launch.release_files()
        try:
            launch.serve(machine)
            match = machine.wait_for_console(READY_PATTERN, timeout)
            seconds = time.monotonic() - started
            guest_agent = self.agent(machine) if agent else None
        except BaseException:
            self.stop(machine, powerdown_timeout=0)
            launch.close()
            raise
        return GuestBoot(machine, match["role"], float(match["uptime"]), seconds, guest_agent)

    def stop(self, machine: Machine, powerdown_timeout: float = 10.0) -> None:
        if machine in self._machines:
            self._machines.remove(machine)
        agent = self._agents.pop(machine, None)
        if agent is not None:
            agent.close()
        if machine.exit_info is None:
            machine.shutdown(powerdown_timeout=powerdown_timeout)

    def close(self) -> None:
        """Stop every machine this lab launched, newest first."""
        for machine in reversed(list(self._machines)):
            with contextlib.suppress(MachineError):
                self.stop(machine, powerdown_timeout=3.0)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _has_agent(spec: VMSpec) -> bool:
    return any(isinstance(c, ChardevChannel) and c.id == AGENT_CHANNEL for c in spec.chardevs())


def with_role(cmdline: str, role: str) -> str:
    """``cmdline`` with its ``teelab.role=`` set to ``role``."""
    words = [w for w in cmdline.split() if not w.startswith("teelab.role=")]
    return " ".join([*words, f"teelab.role={role}"])
