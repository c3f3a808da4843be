"""The libvirt connection: libvirt-python imported on demand, its event loop on a daemon thread (lifecycle
events and keepalives), coded errors when libvirtd cannot be reached."""

from __future__ import annotations

import threading
from typing import Any

from harness.libvirt.errors import LibvirtUnavailable

DEFAULT_URI = "qemu:///system"
_events_lock = threading.Lock()
_events_started = False


def libvirt_module() -> Any:
    """``import libvirt``, or E461 naming the missing extra."""
    try:
        import libvirt
    except ImportError as exc:
        raise LibvirtUnavailable(
            "libvirt-python is not installed",
            hint="pip install 'teelab[libvirt]' (needs libvirt-dev and pkg-config to build)",
        ) from exc
    return libvirt


def _start_event_loop(libvirt: Any) -> None:
    """libvirt's default event loop, once per process, before the first connection (events need it)."""
    global _events_started
    with _events_lock:
        if _events_started:
            return
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions instead
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="teelab-libvirt-events", daemon=True).start()
        _events_started = True


def connect(uri: str | None = None) -> Any:
    """A new connection to ``uri`` (``qemu:///system`` by default) with keepalives; E461 when refused."""
    libvirt = libvirt_module()
    _start_event_loop(libvirt)
    uri = uri or DEFAULT_URI
    try:
        conn = libvirt.open(uri)
        conn.setKeepAlive(5, 3)
    except libvirt.libvirtError as exc:
        raise LibvirtUnavailable(
            f"cannot connect to libvirt at {uri}: {exc.get_error_message()}",
            hint="start libvirtd (`libvirtd -d`, or systemctl start libvirtd) or pick --backend qemu",
            uri=uri,
        ) from exc
    return conn
