"""The host's vsock-proxy: guest connections to a host vsock port are forwarded to one TCP address, which must
be on an allowlist (AWS's vsock-proxy rule: the port matches, then the name or an address it resolves to)."""

from __future__ import annotations

import threading

from teelab_guest import vsock_proxy

from harness.vsock.errors import ProxyTargetRefused, VsockTimeout
from harness.vsock.host import VsockListener


class VsockProxy:
    """Accepts on ``listener`` in a thread and joins each guest connection to a new TCP connection to
    ``remote``; ``close()`` stops accepting (connections in flight run to their end)."""

    def __init__(
        self, listener: VsockListener, remote: tuple[str, int], allowlist: list[tuple[str, int]] | None = None
    ) -> None:
        allowlist = allowlist if allowlist is not None else [remote]
        if not vsock_proxy.allowed(allowlist, *remote):
            listener.close()
            raise ProxyTargetRefused(
                f"{remote[0]}:{remote[1]} is not on the allowlist {allowlist}",
                hint="add it to the allowlist, or forward to an address that is there",
            )
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
            threading.Thread(target=vsock_proxy.forward, args=(conn, self.remote), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()

    def __enter__(self) -> VsockProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
