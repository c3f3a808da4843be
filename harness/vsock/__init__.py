"""vsock for teelab guests: one host-side API (``VsockHost``: attach, connect, listen) over the kernel's
vhost-vsock, the built-in user-space vhost-user-vsock switch, or rust-vmm's vhost-device-vsock."""

from harness.vsock.backend_choice import BACKENDS, configured_backend
from harness.vsock.host import VsockAttachment, VsockHost, VsockListener, connect_hybrid
from harness.vsock.proxy import VsockProxy
from harness.vsock.switch import ENCLAVE_GROUP, MESH_GROUP

__all__ = [
    "BACKENDS",
    "ENCLAVE_GROUP",
    "MESH_GROUP",
    "VsockAttachment",
    "VsockHost",
    "VsockListener",
    "VsockProxy",
    "configured_backend",
    "connect_hybrid",
]
