"""Which vsock backend serves a VM (the choice, not a backend): the probe's choice, overridable by argument,

``kernel`` is ``vhost-vsock-pci`` on /dev/vhost-vsock (guest <-> host only, host-wide CIDs); ``builtin`` is
this package's user-space switch; ``vhost-device-vsock`` is rust-vmm's binary. ``auto`` takes the kernel
where it exists for VMs without a routing group and the built-in switch for everything else.
"""

from __future__ import annotations

import shutil

from harness import config
from harness.host.model import HostInfo
from harness.vsock.errors import VsockBackendUnavailable, VsockConfigError

AUTO = "auto"
KERNEL = "kernel"
BUILTIN = "builtin"
EXTERNAL = "vhost-device-vsock"
BACKENDS = (AUTO, KERNEL, BUILTIN, EXTERNAL)
ENV_BACKEND = "TEELAB_VSOCK_BACKEND"
EXTERNAL_BINARY = "vhost-device-vsock"


def configured_backend(requested: str | None = None) -> str:
    """The backend asked for: ``requested``, else $TEELAB_VSOCK_BACKEND, else ``[vsock] backend`` in
    teelab.toml, else ``auto`` (the probe decides per VM)."""
    return config.choice("vsock", "backend", BACKENDS, AUTO, requested=requested)


def external_binary() -> str | None:
    return shutil.which(EXTERNAL_BINARY)


def resolve(host: HostInfo, backend: str, *, grouped: bool) -> str:
    """The concrete backend for one VM (``grouped``: it routes to siblings), checked against the host."""
    if backend == AUTO:
        backend = KERNEL if host.vhost_vsock and not grouped else BUILTIN
    if backend == KERNEL:
        if grouped:
            raise VsockConfigError(
                "the kernel vsock backend routes only between a guest and the host, not between VMs",
                hint="use backend 'builtin' (or 'auto') for VMs in a routing group",
            )
        if not host.vhost_vsock:
            raise VsockBackendUnavailable(
                "this host has no /dev/vhost-vsock",
                hint="modprobe vhost_vsock, or use the 'builtin' backend",
            )
    elif not host.qemu.has("vhost-user-vsock-pci"):
        raise VsockBackendUnavailable(
            f"QEMU ({host.qemu.binary}) lacks the vhost-user-vsock-pci device the {backend} backend needs",
            hint="install a QEMU with vhost-user-vsock-pci (Debian's qemu-system-x86 has it)",
        )
    elif backend == EXTERNAL and external_binary() is None:
        raise VsockBackendUnavailable(
            f"{EXTERNAL_BINARY} is not on PATH",
            hint="install rust-vmm's vhost-device-vsock (cargo install vhost-device-vsock) or use 'builtin'",
        )
    return backend
