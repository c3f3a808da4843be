"""The host's vsock-proxy: guest connections to a host vsock port are forwarded to one TCP address, which must
be on an allowlist (AWS's vsock-proxy rule: the port matches, then the name or an address it resolves to).

The target is resolved once, when it is checked; every connection goes to the addresses that passed, so a
name that later resolves elsewhere (DNS rebinding) cannot lead off the list.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from teelab_guest import vsock_proxy
from teelab_guest.vsock_proxy import Resolver, system_addresses

from harness.vsock.errors import AllowlistError, ProxyTargetRefused, VsockBackendUnavailable, VsockTimeout
from harness.vsock.host import VsockListener, _check_port
from harness.vsock.hybrid import listener_path
from harness.vsock.server import listen_unix


def load_allowlist(path: Path) -> list[tuple[str, int]]:
    """The allowlist file at ``path`` (the YAML subset or JSON of docs/vsock.md); AllowlistError if it cannot
    be read or is not in that format."""
    try:
        return vsock_proxy.load_allowlist(str(path))
    except (OSError, vsock_proxy.AllowlistError) as exc:
        raise AllowlistError(
            f"{path}: {exc}", hint="see docs/vsock.md for the allowlist format", path=str(path)
        ) from None


def open_listener(port: int, uds: Sequence[Path] = (), backlog: int = 128) -> VsockListener:
    """Guest connections to host (CID 2) ``port`` outside a lab: through each VM hybrid socket in ``uds`` (VMs
    behind a user-space switch), or kernel AF_VSOCK when none is given."""
    _check_port(port)
    listener = VsockListener(None, port, None, backlog)
    try:
        for vm_socket in uds:
            path = listener_path(vm_socket, port)
            # the VM's CID is not known from its socket alone
            listener._register(str(vm_socket), listen_unix(path, backlog), path, socket.VMADDR_CID_ANY)
        if not uds:
            try:
                listener._add_kernel()
            except OSError as exc:
                raise VsockBackendUnavailable(
                    f"cannot listen on vsock port {port}: {exc}",
                    hint="modprobe vhost_vsock, or give --uds for VMs behind a user-space switch",
                ) from exc
    except BaseException:
        listener.close()
        raise
    return listener


class VsockProxy:
    """Accepts on ``listener`` in a thread and joins each guest connection to a new TCP connection to
    ``remote``, at the addresses checked against ``allowlist`` (default: ``remote`` alone) when it starts;
    ``close()`` stops accepting (connections in flight run to their end). ``resolve`` turns a name into
    addresses (default: the system's getaddrinfo)."""

    def __init__(
        self,
        listener: VsockListener,
        remote: tuple[str, int],
        allowlist: list[tuple[str, int]] | None = None,
        resolve: Resolver = system_addresses,
    ) -> None:
        allowlist = allowlist if allowlist is not None else [remote]
        try:
            self.addresses = vsock_proxy.checked_addresses(allowlist, *remote, resolve=resolve)
        except vsock_proxy.TargetRefused as exc:
            listener.close()
            raise ProxyTargetRefused(
                f"{remote[0]}:{remote[1]}: {exc}",
                hint="add it to the allowlist, or forward to an address that is there",
                allowlist=[f"{host}:{port}" for host, port in allowlist],
            ) from None
        self.listener = listener
        self.remote = remote
        self.forwarded = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"vsock-proxy-{listener.port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and not self.listener.closed:  # its VsockHost may close it first
            try:
                conn, _cid = self.listener.accept(timeout=0.2)
            except VsockTimeout:
                continue
            except (OSError, ValueError):  # the listener closed while accept waited in select()
                return
            self.forwarded += 1
            threading.Thread(
                target=vsock_proxy.forward, args=(conn, self.addresses, self.remote[1]), daemon=True
            ).start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()

    def __enter__(self) -> VsockProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
