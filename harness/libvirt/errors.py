"""Coded errors of the libvirt backend: a spec part it cannot express (E360) or that cannot follow a remote
URI (E361), domains it drives (E46x), and remote URIs it refuses (E463)."""

from __future__ import annotations

from harness.qemu.errors import MachineError, SpecError


class LibvirtUnsupported(SpecError):
    code = "E360"
    title = "not expressible in the libvirt backend"
    explanation = (
        "The VMSpec holds a part the libvirt backend does not render (a vCPU or virtio-mem device for the "
        "enclave carve, a harness-served vhost-user socketpair, a TDX quote service over vsock); nothing was "
        "started. Boot that VM with the QEMU backend (--backend qemu)."
    )


class LibvirtError(MachineError):
    code = "E460"
    title = "libvirt domain error"
    explanation = "libvirtd refused or failed an operation on a domain; the error carries libvirt's message."


class LibvirtUnavailable(LibvirtError):
    code = "E461"
    title = "libvirt not reachable"
    explanation = (
        "The libvirt backend needs libvirt-python (pip install teelab[libvirt]) and a running libvirtd "
        "(`libvirtd -d`, or systemctl start libvirtd) that the harness can connect to."
    )


class DomainStartFailed(LibvirtError):
    code = "E462"
    title = "libvirt domain did not start"
    explanation = (
        "libvirtd refused the domain XML or QEMU failed under it. The artifact folder has domain.xml and "
        "run.sh (virsh create) to reproduce it, and libvirtd's log names the cause."
    )


class RemoteUnsupported(LibvirtUnsupported):
    code = "E361"
    title = "not available over a remote libvirt URI"
    explanation = (
        "Over a qemu+ssh:// URI the harness forwards the console and its virtio-serial channels (the guest "
        "agent, the emulated security processor) over SSH and copies the kernel, initrd and firmware to the "
        "lab host. A part that needs this machine itself cannot follow: vhost-user vsock and the vTPM pass "
        "file descriptors over their sockets, a user-network NIC forwards a port on the lab host's loopback, "
        "a disk or socket path names a file on the lab host, and the lab host's hugepages and TEE hardware "
        "are not probed. Nothing was started. Run the harness on that host (teelab --host user@host ...)."
    )


class RemoteUriRefused(LibvirtError):
    code = "E463"
    title = "libvirt URI refused"
    explanation = (
        "The libvirt backend takes a local URI (qemu:///system) or qemu+ssh://[user@]host[:port]/system with "
        "the optional parameters keyfile= and known_hosts=. Host keys are checked against known_hosts and "
        "never trusted on first use, so no_verify=1 is refused, and so is command= (the harness runs ssh "
        "itself to pin the host key); other transports (tls, tcp, libssh) are not supported."
    )
    exit_status = 2
