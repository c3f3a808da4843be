"""The host carver: enclaves cut out of a running parent VM, and given back.

``ParentVm.carve`` checks every rule first (``rules.check_carve``: nothing is touched when one breaks), then
takes the vCPUs from the parent (offlined by the parent's pool service, unplugged over QMP where QEMU can plug
them back), shrinks the parent's virtio-mem region so its hugepages go back to the host's pool, and launches
the enclave VM on them: hugepage memory preallocated, vCPU threads pinned to exactly the host CPUs the parent
gave up, vsock in the parent's routing group and the emulated security module, no agent, no network, no disk.
It returns when the enclave's heartbeat reaches the parent. ``terminate`` gives everything back. When the
parent's QEMU ends (stop, crash, SIGKILL), a pidfd watch kills its enclaves at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from teelab_guest import pool_wire

from harness.enclave import errors
from harness.enclave.plan import DEFAULT_VCPUS, EnclaveLaunch, plan_enclave
from harness.enclave.pool import (
    PAGE_TOKENS,
    VIRTIO_MEM_ID,
    ParentLayout,
    cpu_release_mode,
    hugepage_lock,
    hugepage_memory,
    pool_owner,
    release_parent,
    vcpu_owner,
)
from harness.enclave.rules import CarveRequest, PoolCpu, PoolView, check_carve
from harness.host.errors import LedgerExhausted
from harness.host.ledger import Ledger
from harness.host.model import HostInfo
from harness.host.probe import hugepage_pools
from harness.qemu.devices import Device
from harness.qemu.machine import Machine
from harness.qemu.spec import VMSpec
from harness.vsock import ENCLAVE_GROUP, VsockHost

log = logging.getLogger(__name__)

MIB = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a VM name, and its vsock socket's file name
HEARTBEAT_BASE_SECONDS = 60.0  # under TCG; nitro-cli scales its timeout with the image size too
HEARTBEAT_SECONDS_PER_MIB = 0.5
MEMORY_SETTLE_SECONDS = 60.0


@dataclass
class Enclave:
    """A running enclave: its VM, what it took from the parent, and how it answers ``describe``."""

    enclave_id: str
    name: str
    cid: int
    cpus: tuple[PoolCpu, ...]
    memory_mib: int
    debug: bool
    launch: EnclaveLaunch
    machine: Machine
    owner: str  # its ledger owner
    ledger_values: dict[int, int]  # parent vCPU -> the ledger value it held
    carve_seconds: float = 0.0
    heartbeat_seconds: float = 0.0
    state: str = "RUNNING"

    def describe(self, layout: ParentLayout) -> dict[str, Any]:
        """nitro-cli's describe-enclaves fields, and where the vCPUs run."""
        pcrs = self.launch.pcrs
        return {
            "EnclaveName": self.name,
            "EnclaveID": self.enclave_id,
            "ProcessID": self.machine.pid,
            "EnclaveCID": self.cid,
            "NumberOfCPUs": len(self.cpus),
            "CPUIDs": [c.vcpu for c in self.cpus],
            "HostCPUs": [c.host_cpu for c in self.cpus],
            "CPUMapping": layout.reason,
            "MemoryMiB": self.memory_mib,
            "State": self.state if self.machine.running else "TERMINATED",
            "Flags": "DEBUG_MODE" if self.debug else "NONE",
            "Measurements": {
                "HashAlgorithm": "Sha384 { ... }",
                **{f"PCR{i}": pcrs[i].hex() for i in (0, 1, 2)},
            },
        }


@dataclass
class ParentVm:
    """A running parent with its pool; made by ``Lab.boot_parent``. ``close()`` ends its enclaves."""

    layout: ParentLayout
    machine: Machine
    host: HostInfo
    vsock: VsockHost
    group: str
    ledger: Ledger
    ledger_values: dict[int, int]  # vCPU -> ledger value (host CPU, or slot when overcommitted)
    boot: Any = None  # the GuestBoot (agent, readiness) when a Lab booted it
    closers: list[Any] = field(default_factory=list)  # run at close, after the enclaves are gone
    enclaves: dict[str, Enclave] = field(default_factory=dict)
    cpu_mode: str = ""
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _watch: int | None = None
    _count: int = 0

    def __post_init__(self) -> None:
        self.cpu_mode = self.cpu_mode or cpu_release_mode(self.host)
        self._watch_parent()

    # -- the pool -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.layout.name

    def view(self) -> PoolView:
        taken = {c.vcpu for e in self.enclaves.values() for c in e.cpus}
        used_mib = sum(e.memory_mib for e in self.enclaves.values())
        total_vcpus = self.layout.kept_vcpus + len(self.layout.pool_vcpus)
        return PoolView(
            parent_vcpus=total_vcpus - len(taken),
            parent_memory_mib=self.layout.boot_memory_mib + self.layout.pool.memory_mib - used_mib,
            free_cpus=tuple(
                PoolCpu(v, self.layout.vcpu_host[v]) for v in self.layout.pool_vcpus if v not in taken
            ),
            free_memory_mib=self.layout.pool.memory_mib - used_mib,
            page_kib=self.layout.pool.page_kib,
            enclaves=len(self.enclaves),
            host_cpus=self.host.cpus,
            parent_host_cpus=frozenset(
                h for v, h in self.layout.vcpu_host.items() if v not in self.layout.pool_vcpus
            ),
            overcommit=self.layout.overcommit,
            max_enclaves=self.layout.pool.max_enclaves,
            memory_node=self.layout.node,
        )

    def order(self, order: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """One order to the parent's pool service; E947 when it fails."""
        with self._orders(timeout) as conn:
            conn.sendall(pool_wire.encode(order))
            answer = pool_wire.read_frame(conn)
        if not answer.get("ok"):
            raise errors.EnclaveBootFailed(
                f"{self.name}'s pool service refused {order.get('op')}: {answer.get('error')}",
                hint=f"read {self.machine.console_log}",
            )
        return answer

    @contextlib.contextmanager
    def _orders(self, timeout: float) -> Any:
        conn = self.vsock.connect(pool_wire.PARENT_CID, pool_wire.POOL_PORT, group=self.group, wait=30)
        conn.settimeout(timeout)
        try:
            yield conn
        finally:
            conn.close()

    # -- carve ----------------------------------------------------------------------------------
    def carve(
        self,
        eif_path: str | os.PathLike[str],
        *,
        memory_mib: int,
        cpu_count: int | None = None,
        cpu_ids: tuple[int, ...] | None = None,
        cid: int | None = None,
        name: str | None = None,
        debug: bool = False,
        timeout: float | None = None,
        **plan_options: Any,
    ) -> Enclave:
        """Cut an enclave out of this parent and boot ``eif_path`` in it; returns once its heartbeat came.
        Raises the broken rule's code (E932/E933, E937-E946) before touching anything, E9xx for a bad image,
        E947 when the enclave does not come up (everything taken is given back first)."""
        with self._lock:
            started = time.monotonic()
            if cpu_count is None and cpu_ids is None:
                cpu_count = DEFAULT_VCPUS
            self._count += 1
            name = name or f"{self.name}-enc{self._count}"
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise errors.EnclaveCidInvalid(
                    f"enclave name {name!r} is not a plain name",
                    hint="use up to 64 letters, digits, '.', '_' and '-', starting with a letter or digit",
                )
            if any(e.name == name for e in self.enclaves.values()):
                raise errors.EnclaveCidInvalid(
                    f"an enclave named {name} already runs in {self.name}", hint="give another --enclave-name"
                )
            eif_bytes = _size_of(eif_path)
            request = CarveRequest(memory_mib, cpu_count, tuple(cpu_ids) if cpu_ids else None, eif_bytes)
            chosen = check_carve(self.view(), request)
            self._check_cid(cid)
            plan_options.setdefault("parent_instance", self.name)  # PCR4, and the enclave id's prefix
            launch = plan_enclave(
                eif_path, host=self.host, debug=debug, vcpus=len(chosen), memory_mib=memory_mib, agent=False,
                name=name, firmware=self.machine.spec.firmware, **plan_options,
            )  # fmt: skip
            undo: list[Any] = [launch.close]
            try:
                enclave = self._carve(launch, name, chosen, memory_mib, cid, debug, timeout, undo)
            except BaseException:
                with (
                    contextlib.suppress(Exception),
                    hugepage_lock(self.ledger),
                ):  # the carve's error is raised
                    _undo_all(undo)
                raise
            enclave.carve_seconds = round(time.monotonic() - started, 3)
            self.enclaves[enclave.enclave_id] = enclave
            log.info("%s: enclave %s (CID %d) in %.2f s", self.name, name, enclave.cid, enclave.carve_seconds)
            return enclave

    def _check_cid(self, cid: int | None) -> None:
        if cid is None:
            return
        used = {e.cid for e in self.enclaves.values()}
        if isinstance(cid, bool) or not isinstance(cid, int) or not 4 <= cid < 2**32 - 1 or cid in used:
            raise errors.EnclaveCidInvalid(
                f"enclave CID {cid!r} is {'taken' if cid in used else 'out of range'}",
                hint="use a CID of 4 or more that no other enclave of this parent has, or leave it out",
                cid=cid,
            )

    def _carve(
        self,
        launch: EnclaveLaunch,
        name: str,
        chosen: tuple[PoolCpu, ...],
        memory_mib: int,
        cid: int | None,
        debug: bool,
        timeout: float | None,
        undo: list[Any],
    ) -> Enclave:
        # in the parent's enclave group: the enclave reaches its parent only, and only its parent reaches it
        attachment = self.vsock.attach(name, group=self.group, cid=cid, group_kind=ENCLAVE_GROUP)
        undo.append(lambda: self.vsock.detach(name))
        heartbeat = self._arm_heartbeat(attachment.cid, timeout or _heartbeat_timeout(launch, memory_mib))
        undo.append(heartbeat.close)
        vcpus = [c.vcpu for c in chosen]
        self._take_cpus(vcpus)
        undo.append(lambda: self._give_cpus(vcpus))
        with hugepage_lock(self.ledger):  # the pages the shrink frees go to this enclave, none other
            self._resize_pool(-memory_mib)
            undo.append(lambda: self._resize_pool(memory_mib))
            machine = self._launch_enclave(launch, attachment, memory_mib, debug)
        undo.insert(0, lambda: machine.kill())  # first of all: the enclave goes before its resources return
        launch.release_files()
        launch.serve(machine)
        for index, tid in sorted(machine.vcpu_threads().items()):
            os.sched_setaffinity(tid, {chosen[index].host_cpu})
        owner = f"enclave:{self.layout.holder}:{launch.enclave_id}"
        values = {c.vcpu: self.ledger_values[c.vcpu] for c in chosen}
        self.ledger.transfer(self.layout.ledger_kind, list(values.values()), owner, pid=machine.pid)
        undo.insert(1, lambda: self._ledger_back(owner, values, memory_mib))
        pages = self.layout.pages(memory_mib)
        tokens = [
            c.value
            for c in self.ledger.claims(self.layout.page_kind)
            if c.owner == pool_owner(self.layout.holder)
        ]
        self.ledger.transfer(self.layout.page_kind, tokens[:pages], owner, pid=machine.pid)
        started = time.monotonic()
        _wait_heartbeat(heartbeat, machine, attachment.cid)
        heartbeat.close()
        seconds = round(time.monotonic() - started, 3)
        return Enclave(
            launch.enclave_id, name, attachment.cid, chosen, memory_mib, debug, launch, machine, owner,
            values, heartbeat_seconds=seconds,
        )  # fmt: skip

    def _launch_enclave(
        self, launch: EnclaveLaunch, attachment: Any, memory_mib: int, debug: bool
    ) -> Machine:
        spec = enclave_spec(
            launch.spec, memory_mib, self.layout.pool.page_kib, attachment.devices, self.layout.node
        )
        host = replace(self.host, hugepages=hugepage_pools(Path("/")))  # the shrink has just freed pages
        machine = Machine(spec, host, serial=debug)  # a console only in debug mode
        machine.launch()
        return machine

    def _arm_heartbeat(self, cid: int, timeout: float) -> socket.socket:
        """A connection to the pool service that answers when ``cid``'s heartbeat comes."""
        conn = self.vsock.connect(pool_wire.PARENT_CID, pool_wire.POOL_PORT, group=self.group, wait=30)
        try:
            conn.settimeout(10)
            conn.sendall(pool_wire.encode({"op": "heartbeat", "cid": cid, "timeout": timeout}))
            if not pool_wire.read_frame(conn).get("armed"):
                raise errors.EnclaveBootFailed(
                    f"{self.name} did not arm the heartbeat", hint="read its console"
                )
            conn.settimeout(timeout + 5)
        except BaseException:
            conn.close()
            raise
        return conn

    def _take_cpus(self, vcpus: list[int]) -> None:
        self.order({"op": "offline", "cpus": vcpus})
        if self.cpu_mode != "unplug":
            return
        for vcpu in vcpus:
            self.machine.qmp("device_del", id=self.layout.cpu_device(vcpu).id)
        deadline = time.monotonic() + 30
        while set(vcpus) & set(self.machine.vcpu_threads()):
            if time.monotonic() > deadline:
                raise errors.EnclaveBootFailed(
                    f"{self.name} did not release vCPUs {vcpus}", hint="read the parent's console"
                )
            time.sleep(0.1)

    def _give_cpus(self, vcpus: list[int]) -> None:
        if self.cpu_mode == "unplug":
            present = self.machine.vcpu_threads()
            for vcpu in vcpus:
                if vcpu not in present:
                    self.machine.qmp("device_add", **self.layout.cpu_device(vcpu).qmp_arguments())
        threads = self.machine.vcpu_threads()
        for vcpu in vcpus:
            os.sched_setaffinity(threads[vcpu], {self.layout.vcpu_host[vcpu]})
        self.order({"op": "online", "cpus": vcpus})

    def settle_pool(self) -> None:
        """Wait until the guest has plugged all of the pool region it was asked to (at boot: all of it),
        so its hugepages are taken before another parent counts them as free."""
        self._resize_pool(0)

    def _resize_pool(self, delta_mib: int) -> None:
        """Grow or shrink the virtio-mem region and wait until the guest has (un)plugged it all."""
        path = f"/machine/peripheral/{VIRTIO_MEM_ID}"
        target = self.machine.qmp("qom-get", path=path, property="requested-size") + delta_mib * MIB
        self.machine.qmp("qom-set", path=path, property="requested-size", value=target)
        deadline = time.monotonic() + MEMORY_SETTLE_SECONDS
        while (size := self.machine.qmp("qom-get", path=path, property="size")) != target:
            if time.monotonic() > deadline:
                raise errors.EnclaveBootFailed(
                    f"{self.name}'s pool memory is {size // MIB} MiB, {target // MIB} MiB asked",
                    hint="the parent could not unplug its pool memory (is it online_movable?)",
                )
            time.sleep(0.1)

    def _ledger_back(self, owner: str, values: dict[int, int], memory_mib: int) -> None:
        """The enclave's CPUs go back to their vCPUs' owners, its hugepages to the pool. Claims the ledger
        reaped already (the enclave's QEMU died first) are claimed afresh."""
        pid = self.machine.pid if self.machine.running else None
        for vcpu, value in values.items():
            self._hand_over(self.layout.ledger_kind, [value], vcpu_owner(self.layout.holder, vcpu), pid)
        kind = self.layout.page_kind
        tokens = [c.value for c in self.ledger.claims(kind) if c.owner == owner]
        self._hand_over(kind, tokens, pool_owner(self.layout.holder), pid)
        missing = self.layout.pages(memory_mib) - len(tokens)
        if missing > 0:
            self.ledger.claim(kind, PAGE_TOKENS, missing, pool_owner(self.layout.holder), pid=pid)

    def _hand_over(self, kind: str, values: list[int], owner: str, pid: int | None) -> None:
        try:
            self.ledger.transfer(kind, values, owner, pid=pid)
        except LedgerExhausted:
            held = {c.value for c in self.ledger.claims(kind)}
            self.ledger.claim_exact(kind, [v for v in values if v not in held], owner, pid=pid)

    # -- lifecycle ------------------------------------------------------------------------------
    def find(self, enclave_id: str | None = None, name: str | None = None) -> Enclave:
        for enclave in self.enclaves.values():
            if enclave.enclave_id == enclave_id or (name is not None and enclave.name == name):
                return enclave
        raise errors.EnclaveUnknown(
            f"no enclave {enclave_id or name!r} in {self.name}",
            hint=f"running: {', '.join(e.enclave_id for e in self.enclaves.values()) or 'none'}",
        )

    def terminate(self, enclave: Enclave) -> dict[str, Any]:
        """Stop the enclave and give its CPUs (onlined) and memory (virtio-mem grown) back to the parent."""
        with self._lock:
            self.enclaves.pop(enclave.enclave_id, None)
            enclave.state = "TERMINATING"
            steps = [
                lambda: self._ledger_back(enclave.owner, enclave.ledger_values, enclave.memory_mib),
                enclave.machine.kill,
                enclave.launch.close,
                lambda: self.vsock.detach(enclave.name),
            ]
            if self.machine.running:
                steps += [
                    lambda: self._resize_pool(enclave.memory_mib),
                    lambda: self._give_cpus([c.vcpu for c in enclave.cpus]),
                ]
            with hugepage_lock(self.ledger):  # the pages the enclave frees go back to this parent
                _undo_all(steps)
            return {"EnclaveName": enclave.name, "EnclaveID": enclave.enclave_id, "Terminated": True}

    def describe(self) -> list[dict[str, Any]]:
        return [e.describe(self.layout) for e in self.enclaves.values()]

    def _watch_parent(self) -> None:
        """Kill the enclaves the moment the parent's QEMU ends (whatever ended it)."""
        pid = self.machine.pid
        if pid is None:
            return
        self._watch = os.pidfd_open(pid)
        loop = self.machine.loop.loop
        loop.call_soon_threadsafe(loop.add_reader, self._watch, self._parent_gone)

    def _parent_gone(self) -> None:
        for enclave in list(self.enclaves.values()):
            if enclave.machine.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(enclave.machine.pid, signal.SIGKILL)
        self._unwatch()

    def _unwatch(self) -> None:
        if self._watch is not None:
            fd, self._watch = self._watch, None
            loop = self.machine.loop.loop
            if not loop.is_closed():
                loop.call_soon_threadsafe(_remove_and_close, loop, fd)

    def close(self) -> None:
        """Terminate every enclave (giving back to the parent while it runs) and drop the parent's claims."""
        with self._lock:
            steps = [lambda e=e: self.terminate(e) for e in list(self.enclaves.values())]
            steps += [*self.closers, self._unwatch, lambda: release_parent(self.ledger, self.layout.holder)]
            self.closers = []
            _undo_all(steps)


def enclave_spec(
    planned: VMSpec, memory_mib: int, page_kib: int, vsock: tuple[Device, ...], node: int = 0
) -> VMSpec:
    """The planned enclave on hugepages of ``node`` (preallocated, shared with the vsock switch) with its
    vsock: the kernel, initrd and security module's port from the plan, and nothing else."""
    memory = hugepage_memory("ram0", memory_mib, page_kib, node)
    return replace(planned, memory=memory, devices=(*planned.devices, *vsock))


def _remove_and_close(loop: Any, fd: int) -> None:
    with contextlib.suppress(Exception):
        loop.remove_reader(fd)
    os.close(fd)


def _wait_heartbeat(conn: socket.socket, machine: Machine, cid: int) -> None:
    try:
        answer = pool_wire.read_frame(conn)
    except (ValueError, OSError) as exc:
        answer = {"ok": False, "error": str(exc)}
    if not answer.get("ok") or not machine.running:
        raise errors.EnclaveBootFailed(
            f"enclave CID {cid} sent no heartbeat to its parent ({answer.get('error', 'the VM exited')})",
            hint=f"run it with --debug-mode and read {machine.console_log}",
            cid=cid,
        )


def _heartbeat_timeout(launch: EnclaveLaunch, memory_mib: int) -> float:
    image_mib = launch.image.size / MIB
    return HEARTBEAT_BASE_SECONDS + HEARTBEAT_SECONDS_PER_MIB * (image_mib + memory_mib / 8)


def _size_of(eif_path: str | os.PathLike[str]) -> int | None:
    try:
        return os.stat(eif_path).st_size
    except OSError:
        return None  # read_eif names the problem (E913)


def _undo_all(steps: list[Any]) -> None:
    """Run every step even when one fails; the first failure is raised at the end."""
    failure: BaseException | None = None
    for step in steps:
        try:
            step()
        except Exception as exc:
            log.warning("carver: %s", exc)
            failure = failure or exc
    if failure is not None:
        raise failure
