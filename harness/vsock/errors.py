"""Coded errors of the vsock layer (E7xx), and ``GuestFault``, the internal sign of a guest fault."""

from __future__ import annotations

from harness.errors import LabError


class VsockError(LabError):
    code = "E700"
    title = "vsock error"
    explanation = (
        "Something went wrong in the host side of vsock (the kernel backend or the user-space switch)."
    )


class VsockBackendUnavailable(VsockError):
    code = "E701"
    title = "vsock backend not available on this host"
    explanation = (
        "The vsock backend asked for cannot run here: 'kernel' needs /dev/vhost-vsock, 'vhost-device-vsock' "
        "needs the rust-vmm binary on PATH, 'builtin' needs QEMU's vhost-user-vsock-pci device."
    )
    exit_status = 2


class VsockConfigError(VsockError):
    code = "E702"
    title = "bad vsock configuration"
    explanation = (
        "A vsock setting is invalid: an unknown backend name, a reserved CID (0-2, 2**32-1), a port out of "
        "range, a routing group used with a backend that cannot route between VMs, a VM naming another "
        "group kind (mesh or enclave) than its group has, or an enclave group on a backend that cannot keep "
        "enclaves apart (only the built-in switch can)."
    )
    exit_status = 2


class CidUnavailable(VsockError):
    code = "E703"
    title = "vsock CID not available"
    explanation = (
        "The CID asked for is taken (by another VM of the routing group, or by another lab on this host for "
        "host-wide CIDs), or no free CID was left in the range."
    )
    exit_status = 2


class VsockConnectionRefused(VsockError, ConnectionRefusedError):
    code = "E704"
    title = "vsock connection refused"
    explanation = "Nothing listens on that vsock port: the peer answered the connection request with a reset."


class VsockTimeout(VsockError, TimeoutError):
    code = "E705"
    title = "vsock operation timed out"
    explanation = (
        "The peer did not answer a connection request (or an accept waited) longer than the timeout."
    )


class VsockPathTooLong(VsockError):
    code = "E706"
    title = "Unix socket path too long"
    explanation = (
        "A vhost-user or hybrid-vsock Unix socket path is longer than the 107 bytes the kernel allows "
        "(the hybrid convention appends _<port> to the VM's socket path)."
    )
    exit_status = 2


class VsockUnknownPeer(VsockError):
    code = "E707"
    title = "no such vsock peer"
    explanation = (
        "No VM attached to this host-side vsock has that CID (in that routing group), or a CID is used by "
        "VMs of several groups and no group was named."
    )
    exit_status = 2


class VsockSwitchError(VsockError):
    code = "E708"
    title = "vsock switch failed"
    explanation = (
        "The user-space vsock switch (built-in or vhost-device-vsock) could not start, or stopped answering; "
        "its log says why."
    )


class AllowlistError(VsockError):
    code = "E720"
    title = "bad vsock-proxy allowlist"
    explanation = (
        "The vsock-proxy allowlist file could not be read: it must be UTF-8 YAML (or JSON) of the form "
        "'allowlist: [{address: HOST, port: N}, ...]' in the subset docs/vsock.md describes; a key given "
        "twice is refused, not merged."
    )
    exit_status = 2


class ProxyTargetRefused(VsockError):
    code = "E721"
    title = "vsock-proxy target not in the allowlist"
    explanation = (
        "vsock-proxy only forwards to an address and port that the allowlist names: the port must match, "
        "then the host name or one of the addresses it resolves to. The target is resolved once, when it is "
        "checked; a name that does not resolve then is refused."
    )
    exit_status = 2


class GuestFault(Exception):
    """A guest (or its VMM) broke a virtio or vsock rule; ``reason`` names the drop counter.

    Internal: the switch catches it, counts it and resets only what the offender owns; it never escapes.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
