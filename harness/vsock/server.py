"""The built-in switch as a service on an asyncio loop: per VM, a vhost-user socket for QEMU and a hybrid
Unix socket for the host; VMs come and go while the others keep running."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from harness.vsock.device import VsockDevice
from harness.vsock.errors import CidUnavailable, VsockConfigError, VsockPathTooLong, VsockSwitchError
from harness.vsock.packet import MAX_CID, RESERVED_CIDS
from harness.vsock.switch import GROUP_KINDS, MESH_GROUP, Switch
from harness.vsock.vhost_user import VhostUserSession

log = logging.getLogger(__name__)

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL
LISTENER_SUFFIX_MAX = len("_4294967295")


@dataclass(frozen=True)
class VmEndpoint:
    """Where one VM's vsock lives: QEMU connects to ``vhost_socket``; host programs use ``uds``.
    ``group_kind`` is ``mesh`` or ``enclave`` (CID 3 the parent, every other VM an enclave of it)."""

    name: str
    cid: int
    group: str
    vhost_socket: Path
    uds: Path
    group_kind: str = MESH_GROUP

    def validate(self) -> None:
        if self.cid in RESERVED_CIDS or not 3 <= self.cid <= MAX_CID:
            raise VsockConfigError(
                f"VM {self.name}: CID {self.cid} is reserved or out of range",
                hint=f"use a CID from 3 to {MAX_CID}",
                cid=self.cid,
            )
        if not self.group:
            raise VsockConfigError(f"VM {self.name}: empty routing group", hint="name the group")
        if self.group_kind not in GROUP_KINDS:
            raise VsockConfigError(
                f"VM {self.name}: unknown group kind {self.group_kind!r}",
                hint=f"use one of {', '.join(GROUP_KINDS)}",
            )
        for path, extra in ((self.vhost_socket, 0), (self.uds, LISTENER_SUFFIX_MAX)):
            if len(os.fsencode(path)) + extra > UNIX_PATH_MAX:
                raise VsockPathTooLong(
                    f"VM {self.name}: socket path {path} is {len(os.fsencode(path))} bytes; with "
                    f"{extra} more for _<port> it passes the {UNIX_PATH_MAX}-byte limit",
                    hint="set TEELAB_RUNTIME_DIR (or TEELAB_STATE_DIR) to a shorter directory",
                    path=str(path),
                )


class _VmService:
    """One VM's listeners, its device in the switch and its current vhost-user session."""

    def __init__(self, server: SwitchServer, endpoint: VmEndpoint, device: VsockDevice) -> None:
        self.server = server
        self.endpoint = endpoint
        self.device = device
        self.session: VhostUserSession | None = None
        self.sessions = 0
        self.vhost_listener = listen_unix(endpoint.vhost_socket)
        try:
            self.uds_listener = listen_unix(endpoint.uds)
        except BaseException:
            close_unix_listener(self.vhost_listener, endpoint.vhost_socket)
            raise
        loop = server.loop
        loop.add_reader(self.vhost_listener.fileno(), self._accept_front)
        loop.add_reader(self.uds_listener.fileno(), self._accept_host)

    def _accept_front(self) -> None:
        try:
            sock, _ = self.vhost_listener.accept()
        except OSError:
            return
        if self.session is not None and not self.session.closed:
            log.warning("%s: a second vhost-user front-end connected; refused", self.endpoint.name)
            sock.close()
            return
        self.sessions += 1
        self.session = VhostUserSession(
            sock, self.device, self.server.loop, event_idx=self.server.event_idx, on_close=self._front_gone
        )

    def _front_gone(self, session: VhostUserSession) -> None:
        log.info("%s: vhost-user front-end disconnected", self.endpoint.name)

    def _accept_host(self) -> None:
        try:
            sock, _ = self.uds_listener.accept()
        except OSError:
            return
        side = self.server.switch.host_sides.get(self.device)
        if side is None:
            sock.close()
            return
        side.accept(sock)

    def close(self) -> None:
        loop = self.server.loop
        loop.remove_reader(self.vhost_listener.fileno())
        loop.remove_reader(self.uds_listener.fileno())
        if self.session is not None:
            self.session.close()
        self.server.switch.detach(self.device)
        close_unix_listener(self.vhost_listener, self.endpoint.vhost_socket)
        close_unix_listener(self.uds_listener, self.endpoint.uds)


class SwitchServer:
    """The built-in vsock switch serving VMs on ``loop``; all methods run on the loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, event_idx: bool = True) -> None:
        raise_fd_limit()
        self.loop = loop
        self.event_idx = event_idx
        self.switch = Switch(loop)
        self._vms: dict[str, _VmService] = {}

    def add_vm(self, endpoint: VmEndpoint) -> None:
        endpoint.validate()
        if endpoint.name in self._vms:
            raise VsockConfigError(
                f"VM {endpoint.name} is already attached to the switch",
                hint="detach it first or pick another name",
            )
        try:
            device = self.switch.attach(
                endpoint.name, endpoint.cid, endpoint.group, endpoint.uds, endpoint.group_kind
            )
        except ValueError as exc:
            raise CidUnavailable(
                str(exc), hint="pick another CID or another group", cid=endpoint.cid
            ) from None
        try:
            self._vms[endpoint.name] = _VmService(self, endpoint, device)
        except BaseException:
            self.switch.detach(device)
            raise
        log.info(
            "switch: %s attached as CID %d in %s group %s",
            endpoint.name, endpoint.cid, endpoint.group_kind, endpoint.group,
        )  # fmt: skip

    def remove_vm(self, name: str) -> None:
        service = self._vms.pop(name, None)
        if service is not None:
            service.close()

    def vms(self) -> list[VmEndpoint]:
        return [s.endpoint for s in self._vms.values()]

    def stats(self) -> dict[str, object]:
        data = self.switch.stats()
        for name, service in self._vms.items():
            entry = data["vms"].get(name)  # type: ignore[union-attr]
            if entry is not None:
                entry["front_end"] = service.session is not None and not service.session.closed
                entry["sessions"] = service.sessions
        return data

    def close(self) -> None:
        for name in list(self._vms):
            self.remove_vm(name)


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit (each host connection of a VM holds
    one); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def listen_unix(path: Path, backlog: int = 128) -> socket.socket:
    """A listening, non-blocking Unix socket at ``path``; a stale socket file there is replaced, one that a
    live listener (in this process or another) still serves, or any other file, is refused (E708)."""
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise VsockSwitchError(
                f"{path} exists and is not a socket", hint="remove it or pick another path", path=str(path)
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)
        else:
            raise VsockSwitchError(
                f"{path} is in use: another listener serves it",
                hint="stop it or pick another path",
                path=str(path),
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise VsockSwitchError(
            f"cannot listen on {path}: {exc}",
            hint="check the directory exists and is writable",
            path=str(path),
        ) from exc
    return sock


def close_unix_listener(sock: socket.socket, path: Path | None) -> None:
    """Close a listening socket and remove its path (none for an AF_VSOCK socket)."""
    sock.close()
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
