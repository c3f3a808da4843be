"""Host capability groups (the Ansible inventory's groups, the nightly's runner labels): what a host of each
group must offer, and why a probed host falls short."""

from __future__ import annotations

from typing import Literal, get_args

from harness.host.model import HostInfo

Group = Literal["tcg", "kvm", "snp", "tdx", "sgx", "vhost-vsock"]
GROUPS: tuple[Group, ...] = get_args(Group)
# The first QEMU release with each confidential-guest object (QEMU's docs/system/i386/*.rst).
SNP_QEMU = (9, 1, 0)
TDX_QEMU = (10, 1, 0)
# SGX came in QEMU 6.2; sgx-epc.N.node, which teelab always sets (and QEMU then requires), in 7.0.
SGX_QEMU = (7, 0, 0)
# QEMU registers memory-backend-epc only when it can open /dev/sgx_vepc read-write (backends/hostmem-epc.c).
EPC_BACKEND_NOTE = " (QEMU offers it only when it can open /dev/sgx_vepc read-write)"


def _qemu_missing(host: HostInfo, *types: str, since: tuple[int, int, int] | None = None) -> list[str]:
    qemu = host.qemu
    if qemu.binary is None:
        return ["no qemu-system-x86_64 on PATH"]
    missing = []
    if since is not None and (qemu.version or (0, 0, 0)) < since:
        found = ".".join(map(str, qemu.version)) if qemu.version else "of unknown version"
        missing.append(f"QEMU {found} is older than {since[0]}.{since[1]}")
    missing += [f"QEMU has no {t}" for t in types if not qemu.has(t)]
    return missing


def _kvm_missing(host: HostInfo) -> list[str]:
    return [] if host.accel == "kvm" else [f"no usable KVM ({host.accel_reason})"]


def missing(group: Group, host: HostInfo) -> list[str]:
    """Why ``host`` does not give what hosts of ``group`` promise (empty when it does).

    tcg: a QEMU with the memfd backend and the user-space vsock device; kvm: that and usable KVM; snp:
    ``kvm_amd sev_snp=Y``, /dev/sev and QEMU >= 9.1 with ``sev-snp-guest``; tdx: ``kvm_intel tdx=Y`` and QEMU
    >= 10.1 with ``tdx-guest``; sgx: the CPU's SGX with flexible launch control, /dev/sgx_vepc, EPC on some
    node and QEMU >= 7.0 with ``memory-backend-epc``; vhost-vsock: /dev/vhost-vsock and QEMU's
    ``vhost-vsock-pci``.
    """
    if group not in GROUPS:
        raise ValueError(f"unknown capability group {group!r}")
    if group == "tcg":
        return _qemu_missing(host, "memory-backend-memfd", "vhost-user-vsock-pci")
    if group == "kvm":
        return _qemu_missing(host) + _kvm_missing(host)
    if group == "vhost-vsock":
        found = [] if host.vhost_vsock else ["no /dev/vhost-vsock (load vhost_vsock)"]
        return found + _qemu_missing(host, "vhost-vsock-pci")
    if group == "snp":
        found = (
            []
            if host.tee.sev_snp
            else ["the host kernel does not offer SEV-SNP (kvm_amd sev_snp=Y, /dev/sev)"]
        )
        return found + _qemu_missing(host, "sev-snp-guest", since=SNP_QEMU) + _kvm_missing(host)
    if group == "sgx":
        qemu = _qemu_missing(host, "memory-backend-epc", since=SGX_QEMU)
        qemu = [m + EPC_BACKEND_NOTE if m.endswith("memory-backend-epc") else m for m in qemu]
        return sgx_missing(host) + qemu + _kvm_missing(host)
    found = [] if host.tee.tdx else ["the host kernel does not offer TDX (kvm_intel tdx=Y)"]
    return found + _qemu_missing(host, "tdx-guest", since=TDX_QEMU) + _kvm_missing(host)


def sgx_missing(host: HostInfo) -> list[str]:
    """What the host kernel and CPU lack for SGX guests (empty when nothing)."""
    tee = host.tee
    checks = (
        (tee.sgx, "the CPU does not offer SGX (no sgx in /proc/cpuinfo; enable it in the firmware)"),
        (tee.sgx_flc, "no flexible launch control (sgx_lc), which KVM needs to run guest enclaves"),
        (tee.sgx_vepc, "no /dev/sgx_vepc: the kernel's SGX driver cannot give EPC to guests"),
        (bool(tee.sgx_epc), "no EPC on any NUMA node (nodeN/x86/sgx_total_bytes)"),
    )
    return [reason for ok, reason in checks if not ok]
