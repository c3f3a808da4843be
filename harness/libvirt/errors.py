"""Coded errors of the libvirt backend: a spec part it cannot express (E360), and domains it drives (E46x)."""

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
