"""The host side of vsock for one lab, whatever the backend: attach VMs (CIDs from the host ledger),
``connect(cid, port)`` to a guest, ``listen(port)`` for guests connecting to the host (CID 2).

With the kernel backend these are AF_VSOCK sockets; with a user-space switch (built-in or vhost-device-vsock)
they are Unix sockets in the hybrid convention, which this class hides: callers get a connected stream
socket either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import selectors
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from harness.aio import EventLoopThread, shared_loop
from harness.host import runtime
from harness.host.errors import LedgerExhausted
from harness.host.ledger import Ledger
from harness.host.model import HostInfo
from harness.qemu.chardevs import ChardevSocket
from harness.qemu.devices import Device, VhostUserVsockPci, VhostVsockPci
from harness.vsock import backend_choice
from harness.vsock.errors import (
    CidUnavailable,
    VsockConfigError,
    VsockConnectionRefused,
    VsockTimeout,
    VsockUnknownPeer,
)
from harness.vsock.external import GroupDaemon
from harness.vsock.hybrid import listener_path
from harness.vsock.packet import HOST_CID, MAX_CID, MAX_PORT, RESERVED_CIDS
from harness.vsock.server import SwitchServer, VmEndpoint, close_unix_listener, listen_unix
from harness.vsock.switch import ENCLAVE_GROUP, GROUP_KINDS, MESH_GROUP, PARENT_CID

log = logging.getLogger(__name__)

LEDGER_KIND = "cid"
AUTO_CIDS = range(16, 1 << 16)  # host-unique CIDs handed out when none is asked for
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
DEVICE_ID = "vsock0"


@dataclass(frozen=True)
class VsockAttachment:
    """One VM's vsock: put ``devices`` in its VMSpec; host programs reach it at ``cid`` (or via ``uds``)."""

    name: str
    cid: int
    group: str | None
    backend: str
    devices: tuple[Device, ...]
    uds: Path | None = None  # the hybrid socket (user-space backends)
    host_ports: bool = True  # False: no host listener serves it (an enclave talks to its parent only)
    group_kind: str = MESH_GROUP  # or ENCLAVE_GROUP: CID 3 the parent, the others enclaves reaching it only

    @property
    def enclave(self) -> bool:
        """True for an enclave: a VM of an enclave group other than its parent (CID 3)."""
        return self.group_kind == ENCLAVE_GROUP and self.cid != PARENT_CID

    @property
    def needs_shared_memory(self) -> bool:
        """True when guest RAM must be a shared memfd or file backend (vhost-user)."""
        return any(d.needs_shared_memory for d in self.devices)


class VsockHost:
    """vsock for the VMs of one lab; ``close()`` detaches them all and removes every socket it made."""

    def __init__(
        self,
        host: HostInfo,
        *,
        backend: str | None = None,
        ledger: Ledger | None = None,
        loop: EventLoopThread | None = None,
        runtime_dir: Path | None = None,
    ) -> None:
        self.host = host
        self.backend = backend_choice.configured_backend(backend)
        self.ledger = ledger or Ledger()
        self._loop = loop or shared_loop()
        self._own_dir = runtime_dir is None
        self.runtime_dir = runtime_dir or runtime.runtime_dir("vsock")
        self.attachments: dict[str, VsockAttachment] = {}
        self._claimed: dict[str, int] = {}
        self._server: SwitchServer | None = None
        self._daemons: dict[str, GroupDaemon] = {}
        self._listeners: list[VsockListener] = []
        self._owner = f"vsock:{os.getpid()}:{id(self):x}"

    # -- VMs ------------------------------------------------------------------------------------
    def attach(
        self,
        name: str,
        *,
        group: str | None = None,
        cid: int | None = None,
        host_ports: bool = True,
        group_kind: str = MESH_GROUP,
    ) -> VsockAttachment:
        """Give VM ``name`` a vsock device. ``group`` names the VMs it may reach by CID (the CID is then
        scoped to the group, so a parent can be CID 3 in each); without one it reaches only the host.
        Without ``host_ports`` no host listener (``listen``) accepts its connections: they are reset.
        ``group_kind="enclave"`` makes the group a parent's (CID 3) and its enclaves': an enclave reaches
        only the parent, and neither the host nor other enclaves reach it (the built-in switch only)."""
        _check_attach(name, group, cid, group_kind)
        if name in self.attachments:
            raise VsockConfigError(f"VM {name} already has vsock", hint="detach it first or use another name")
        kind = backend_choice.resolve(self.host, self.backend, grouped=group is not None)
        if group_kind == ENCLAVE_GROUP and kind != backend_choice.BUILTIN:
            raise VsockConfigError(
                f"VM {name}: the {kind} backend routes every VM of a group to every other, so it cannot keep "
                "enclaves apart",
                hint="use the 'builtin' vsock backend (or 'auto') for parents and enclaves",
                backend=kind,
            )
        scoped = kind != backend_choice.KERNEL and cid is not None  # group-scoped CIDs skip the host ledger
        if not scoped:
            cid = self._claim_cid(name, cid)
        assert cid is not None
        try:
            made = self._attach(kind, name, group, cid, group_kind)
            attachment = dataclasses.replace(made, host_ports=host_ports and not made.enclave)
        except BaseException:
            self._release_cid(name)
            raise
        self.attachments[name] = attachment
        try:
            for listener in self._listeners:
                listener._add_vm(attachment)
        except BaseException:  # a port path of this VM's that is not free: the attach is undone whole
            self.detach(name)
            raise
        log.info("vsock: %s is CID %d (%s%s)", name, cid, kind, f", group {group}" if group else "")
        return attachment

    def _attach(
        self, kind: str, name: str, group: str | None, cid: int, group_kind: str = MESH_GROUP
    ) -> VsockAttachment:
        if kind == backend_choice.KERNEL:
            return VsockAttachment(name, cid, None, kind, (VhostVsockPci(DEVICE_ID, guest_cid=cid),))
        endpoint = VmEndpoint(
            name=name,
            cid=cid,
            group=group or f"solo-{name}",
            vhost_socket=self.runtime_dir / f"{name}.vhost",
            uds=self.runtime_dir / f"{name}.vsock",
            group_kind=group_kind,
        )
        endpoint.validate()
        if kind == backend_choice.BUILTIN:
            self._loop.call(self._switch().add_vm, endpoint)
        else:
            self._restart_group(endpoint.group, extra=endpoint)
        device = VhostUserVsockPci(
            DEVICE_ID, chardev=ChardevSocket(f"{DEVICE_ID}-chr", path=endpoint.vhost_socket)
        )
        return VsockAttachment(name, cid, group, kind, (device,), uds=endpoint.uds, group_kind=group_kind)

    def _switch(self) -> SwitchServer:
        if self._server is None:
            self._server = SwitchServer(self._loop.loop)
        return self._server

    def _group_endpoints(self, group: str) -> list[VmEndpoint]:
        return [
            VmEndpoint(a.name, a.cid, group, self.runtime_dir / f"{a.name}.vhost", a.uds)
            for a in self.attachments.values()
            if a.backend == backend_choice.EXTERNAL
            and (a.group or f"solo-{a.name}") == group
            and a.uds is not None
        ]

    def _restart_group(self, group: str, extra: VmEndpoint | None = None) -> None:
        endpoints = self._group_endpoints(group) + ([extra] if extra else [])
        if extra is not None and any(e.cid == extra.cid for e in endpoints[:-1]):
            raise CidUnavailable(f"CID {extra.cid} is already used in group {group}", hint="pick another CID")
        daemon = self._daemons.get(group)
        if daemon is None:
            binary = backend_choice.external_binary() or backend_choice.EXTERNAL_BINARY
            daemon = GroupDaemon(binary, group, self.runtime_dir / f"{group}.log", self._loop)
            self._daemons[group] = daemon
        daemon.restart(endpoints)

    def detach(self, name: str) -> None:
        """Remove VM ``name``'s vsock: its connections end and its CID is free again."""
        attachment = self.attachments.pop(name, None)
        if attachment is None:
            return
        for listener in self._listeners:
            listener._remove_vm(attachment)
        if attachment.backend == backend_choice.BUILTIN and self._server is not None:
            self._loop.call(self._server.remove_vm, name)
        elif attachment.backend == backend_choice.EXTERNAL:
            self._restart_group(attachment.group or f"solo-{name}")
        self._release_cid(name)

    def _claim_cid(self, name: str, cid: int | None) -> int:
        owner = f"{self._owner}:{name}"
        try:
            if cid is None:
                (cid,) = self.ledger.claim(LEDGER_KIND, AUTO_CIDS, 1, owner)
            else:
                self.ledger.claim_exact(LEDGER_KIND, [cid], owner)
        except LedgerExhausted as exc:
            raise CidUnavailable(exc.message, hint=exc.hint or "pick another CID", cid=cid) from None
        self._claimed[name] = cid
        return cid

    def _release_cid(self, name: str) -> None:
        cid = self._claimed.pop(name, None)
        if cid is not None:
            self.ledger.release(LEDGER_KIND, [cid])

    # -- streams --------------------------------------------------------------------------------
    def find(self, cid: int, group: str | None = None) -> VsockAttachment:
        """The VM with ``cid`` (in ``group`` when CIDs repeat across groups)."""
        matches = [
            a for a in self.attachments.values() if a.cid == cid and (group is None or a.group == group)
        ]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise VsockUnknownPeer(
                f"no VM with CID {cid}{f' in group {group}' if group else ''} is attached",
                hint=f"attached: {_names(self.attachments.values()) or 'none'}",
                cid=cid,
            )
        raise VsockUnknownPeer(
            f"CID {cid} is used in groups {', '.join(str(a.group) for a in matches)}",
            hint="name the group: connect(cid, port, group=...)",
            cid=cid,
        )

    def connect(
        self, cid: int, port: int, *, group: str | None = None, timeout: float = 10.0, wait: float = 0.0
    ) -> socket.socket:
        """A stream to guest ``cid`` port ``port``; refused at once (RST) when nothing listens there, unless
        ``wait``: refusals are then retried for that many seconds (a guest whose listener is starting)."""
        _check_port(port)
        attachment = self.find(cid, group)
        if attachment.enclave:
            raise VsockConnectionRefused(
                f"{attachment.name} (CID {cid}) is an enclave: only its parent reaches it",
                hint="connect to the parent (CID 3 of the group) and let it talk to the enclave",
                port=port,
            )
        deadline = time.monotonic() + wait
        while True:
            try:
                if attachment.backend == backend_choice.KERNEL:
                    return _connect_kernel(cid, port, timeout)
                assert attachment.uds is not None
                return connect_hybrid(attachment.uds, port, timeout, what=f"{attachment.name} (CID {cid})")
            except VsockConnectionRefused:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def listen(self, port: int, *, vm: str | None = None, backlog: int = 128) -> VsockListener:
        """Accept guest connections to the host (CID 2) ``port``, from every attached VM (or only ``vm``)."""
        _check_port(port)
        if vm is not None and vm not in self.attachments:
            raise VsockUnknownPeer(f"no VM {vm} is attached", hint=f"attached: {', '.join(self.attachments)}")
        listener = VsockListener(self, port, vm, backlog)
        try:
            for attachment in self.attachments.values():
                listener._add_vm(attachment)
            if self.backend == backend_choice.KERNEL or (
                self.backend == backend_choice.AUTO and self.host.vhost_vsock
            ):
                listener._add_kernel()
        except BaseException:
            listener.close()
            raise
        self._listeners.append(listener)
        return listener

    def stats(self) -> dict[str, object]:
        """The built-in switch's per-VM figures and drop counters (empty for other backends)."""
        if self._server is None:
            return {"vms": {}, "drops": {}}
        return self._loop.call(self._server.stats)

    def close(self) -> None:
        for listener in list(self._listeners):
            listener.close()
        for name in list(self.attachments):
            with contextlib.suppress(Exception):
                self.detach(name)
        if self._server is not None:
            self._loop.call(self._server.close)
            self._server = None
        for daemon in self._daemons.values():
            daemon.stop()
        self._daemons.clear()
        with contextlib.suppress(LedgerExhausted, OSError):
            for name in list(self._claimed):
                self._release_cid(name)
        if self._own_dir:
            runtime.remove_runtime_dir(self.runtime_dir)

    def __enter__(self) -> VsockHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VsockListener:
    """Guest-initiated connections to one host port; ``accept()`` returns (stream, peer CID). ``owner`` is
    None for one outside a lab (harness.vsock.proxy.open_listener)."""

    def __init__(self, owner: VsockHost | None, port: int, vm: str | None, backlog: int) -> None:
        self.owner = owner
        self.port = port
        self.vm = vm
        self.backlog = backlog
        self._selector = selectors.DefaultSelector()
        self._sockets: dict[str, tuple[socket.socket, Path | None, int | None]] = {}
        self.closed = False

    def _add_vm(self, attachment: VsockAttachment) -> None:
        if attachment.uds is None or not attachment.host_ports:
            return
        if self.vm is not None and attachment.name != self.vm:
            return
        path = listener_path(attachment.uds, self.port)
        self._register(attachment.name, listen_unix(path, self.backlog), path, attachment.cid)

    def _add_kernel(self) -> None:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.bind((socket.VMADDR_CID_ANY, self.port))
            sock.listen(self.backlog)
        except BaseException:
            sock.close()
            raise
        self._register("", sock, None, None)

    def _register(self, key: str, sock: socket.socket, path: Path | None, cid: int | None) -> None:
        sock.setblocking(False)
        self._sockets[key] = (sock, path, cid)
        self._selector.register(sock, selectors.EVENT_READ, key)

    def _remove_vm(self, attachment: VsockAttachment) -> None:
        entry = self._sockets.pop(attachment.name, None)
        if entry is not None:
            self._selector.unregister(entry[0])
            close_unix_listener(entry[0], entry[1])

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, int]:
        """The next guest connection and the CID it came from; VsockTimeout after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            for key, _events in self._selector.select(left if left is not None else 1.0):
                entry = self._sockets.get(key.data)
                if entry is None:
                    continue
                sock, _path, cid = entry
                try:
                    conn, addr = sock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(True)
                return conn, cid if cid is not None else addr[0]
            if deadline is not None and time.monotonic() >= deadline:
                break
        raise VsockTimeout(
            f"no guest connected to host port {self.port} within {timeout} s",
            hint="check the guest connects to CID 2 on that port",
            port=self.port,
        )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock, path, _cid in self._sockets.values():
            close_unix_listener(sock, path)
        self._sockets.clear()
        self._selector.close()
        if self.owner is not None:
            with contextlib.suppress(ValueError):
                self.owner._listeners.remove(self)

    def __enter__(self) -> VsockListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_hybrid(uds: Path, port: int, timeout: float = 10.0, *, what: str = "the VM") -> socket.socket:
    """Connect to a guest port through a VM's hybrid Unix socket (``CONNECT <port>`` / ``OK <n>``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(uds))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            byte = sock.recv(1)
            if not byte:
                break
            line += byte
    except TimeoutError:
        sock.close()
        raise VsockTimeout(
            f"{what} did not answer a connection to port {port} within {timeout} s",
            hint="is the guest up and its vsock driver loaded?",
            port=port,
        ) from None
    except OSError as exc:
        sock.close()
        raise VsockConnectionRefused(
            f"cannot reach {what}'s vsock socket {uds}: {exc}",
            hint="is the VM attached and its switch running?",
            port=port,
        ) from exc
    if not line.startswith(b"OK "):
        sock.close()
        raise VsockConnectionRefused(
            f"{what} refused port {port}: nothing listens there",
            hint="start the guest's listener first",
            port=port,
            answer=line.decode(errors="replace"),
        )
    sock.settimeout(None)
    return sock


def _connect_kernel(cid: int, port: int, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((cid, port))
    except TimeoutError:
        sock.close()
        raise VsockTimeout(
            f"CID {cid} did not answer on port {port} within {timeout} s", hint="is the guest up?", port=port
        ) from None
    except OSError as exc:
        sock.close()
        raise VsockConnectionRefused(
            f"CID {cid} refused port {port}: {exc}", hint="start the guest's listener", port=port
        ) from exc
    sock.settimeout(None)
    return sock


def _check_attach(name: str, group: str | None, cid: int | None, group_kind: str) -> None:
    """Refuse a bad group name, group kind or CID before anything is claimed (E702)."""
    if group is not None and not _GROUP.fullmatch(group):
        raise VsockConfigError(
            f"routing group {group!r} is not a plain name",
            hint="use letters, digits, '_' and '-' (up to 64)",
            group=group,
        )
    if group_kind not in GROUP_KINDS:
        raise VsockConfigError(
            f"VM {name}: unknown group kind {group_kind!r}",
            hint=f"use one of {', '.join(GROUP_KINDS)}",
            group_kind=group_kind,
        )
    if group_kind == ENCLAVE_GROUP and group is None:
        raise VsockConfigError(
            f"VM {name}: an enclave group needs a name",
            hint="attach the parent and its enclaves with the same group=...",
            group_kind=group_kind,
        )
    if cid is not None and (cid in RESERVED_CIDS or not 3 <= cid <= MAX_CID):
        raise VsockConfigError(
            f"VM {name}: CID {cid} is reserved or out of range",
            hint=f"use a CID from 3 to {MAX_CID} (0, 1, 2 and 2**32-1 are reserved)",
            cid=cid,
        )


def _check_port(port: int) -> None:
    if not 0 <= port < MAX_PORT:
        raise VsockConfigError(
            f"vsock port {port} is out of range", hint=f"use 0 to {MAX_PORT - 1}", port=port
        )


def _names(attachments: object) -> str:
    return ", ".join(f"{a.name}={a.cid}" for a in attachments)  # type: ignore[attr-defined]


__all__ = ["HOST_CID", "VsockAttachment", "VsockHost", "VsockListener", "connect_hybrid"]
