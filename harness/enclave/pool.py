"""A parent VM with an enclave pool, configured like Nitro's allocator: its memory on hugepages (a boot
region and a virtio-mem region for the pool), its pool vCPUs as devices that can be unplugged, every vCPU
pinned to a host CPU, and all of it booked in the host ledger.

On a host with too few cores for a strict one-to-one mapping (a parent keeps 2 vCPUs, an enclave takes whole
cores, never CPU 0), the pool runs in overcommit mode: several vCPUs share a host CPU. Only the rules that
need more cores (no core shared with the parent) are relaxed; ``describe`` and ``teelab doctor`` say so.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from harness import paths
from harness.enclave import errors
from harness.host.ledger import Ledger
from harness.host.model import HostInfo
from harness.qemu.devices import Device, VirtioMemPci, X86Cpu
from harness.qemu.objects import MemoryBackendMemfd

PARENT_KEPT_VCPUS = 2
PARENT_BOOT_MEMORY_MIB = 512
SLOTS_PER_CPU = 256  # overcommit: ledger value host_cpu * 256 + slot, one slot per vCPU on that CPU
STRICT_KIND = "cpu"
OVERCOMMIT_KIND = "cpu-slot"
PAGE_TOKENS = range(1 << 24)  # hugepages are booked by count: each claim takes that many tokens
VIRTIO_MEM_ID = "pool-mem0"
MEMHP_ONLINE = "memhp_default_state=online_movable"  # hot-plugged memory online and unpluggable, no udev


@dataclass(frozen=True)
class EnclavePool:
    """What the parent sets aside for enclaves (Nitro's allocator.yaml): ``memory_mib`` of hugepages of
    ``page_kib``, ``cpu_count`` vCPUs (or the host CPUs in ``cpu_ids``), at most ``max_enclaves`` enclaves.
    ``overcommit`` None: on only when this host lacks the cores for a strict mapping."""

    memory_mib: int = 256
    cpu_count: int = 2
    cpu_ids: tuple[int, ...] | None = None
    page_kib: int = 2048
    max_enclaves: int = 2
    overcommit: bool | None = None


@dataclass(frozen=True)
class ParentLayout:
    """Where a parent's vCPUs run: ``vcpu_host`` maps each vCPU index to its host CPU; the pool's vCPUs are
    ``pool_vcpus`` (the last ones, added as devices)."""

    name: str
    pool: EnclavePool
    kept_vcpus: int
    boot_memory_mib: int
    vcpu_host: dict[int, int]
    pool_vcpus: tuple[int, ...]
    overcommit: bool
    reason: str  # why the mapping is strict or overcommitted
    cpu_model: str = "max"
    node: int = 0
    devices: tuple[Device, ...] = field(default=())

    @property
    def holder(self) -> str:
        """The parent's name in ledger owners, unique across processes (two pytest workers may both boot
        a "parent")."""
        return f"{self.name}@{os.getpid()}"

    @property
    def ledger_kind(self) -> str:
        return OVERCOMMIT_KIND if self.overcommit else STRICT_KIND

    @property
    def page_kind(self) -> str:
        return f"hugepages-{self.pool.page_kib}kB"

    def pages(self, memory_mib: int) -> int:
        return memory_mib * 1024 // self.pool.page_kib

    def cpu_device(self, vcpu: int) -> X86Cpu:
        return X86Cpu(f"pool-cpu{vcpu}", socket_id=0, core_id=vcpu, model=self.cpu_model)


def layout_parent(
    host: HostInfo,
    name: str,
    pool: EnclavePool,
    *,
    kept_vcpus: int = PARENT_KEPT_VCPUS,
    boot_memory_mib: int = PARENT_BOOT_MEMORY_MIB,
) -> ParentLayout:
    """Map the parent's vCPUs to host CPUs. Pool vCPUs go to whole cores away from CPU 0 and its siblings;
    E939 when the host cannot give them, or cannot map strictly while overcommit is False."""
    online = [c for c in host.cpus if c.online]
    cpu0 = {s for c in online if c.cpu == 0 for s in c.siblings} or {0}
    if pool.cpu_ids is not None:
        unknown = sorted(set(pool.cpu_ids) - {c.cpu for c in online})
        if unknown or set(pool.cpu_ids) & cpu0:
            raise errors.PoolExhausted(
                f"pool CPUs {list(pool.cpu_ids)}: {unknown or sorted(set(pool.cpu_ids) & cpu0)} are "
                f"{'not online host CPUs' if unknown else 'CPU 0 or its siblings'}",
                hint=f"choose among {[c.cpu for c in online if c.cpu not in cpu0]}",
            )
        pool_cpus = list(pool.cpu_ids)
    else:
        by_core = sorted((c for c in online if c.cpu not in cpu0), key=lambda c: (c.package, c.core, c.cpu))
        pool_cpus = [c.cpu for c in by_core]
    if not pool_cpus:
        raise errors.PoolExhausted(
            f"this host has {len(online)} CPU(s): none outside CPU 0's core for an enclave pool",
            hint="run the parent on a host with at least 2 CPUs",
        )
    kept_cpus = [c.cpu for c in online if c.cpu not in pool_cpus[: pool.cpu_count]]
    need = kept_vcpus + pool.cpu_count
    strict_fits = len(pool_cpus) >= pool.cpu_count and len(kept_cpus) >= kept_vcpus
    overcommit = pool.overcommit if pool.overcommit is not None else not strict_fits
    if not overcommit and not strict_fits:
        raise errors.PoolExhausted(
            f"a strict mapping needs {need} host CPUs ({pool.cpu_count} for the pool outside CPU 0's core); "
            f"this host has {len(online)}",
            hint="set overcommit=True in the pool (several vCPUs per host CPU), or a smaller pool",
        )
    if overcommit:
        reason = f"overcommit: {len(online)} host CPUs for {need} vCPUs (no core kept whole)"
        kept_cpus = sorted(cpu0 & {c.cpu for c in online}) or kept_cpus
    else:
        reason = f"strict: one host CPU per vCPU ({need} of {len(online)})"
        pool_cpus = pool_cpus[: pool.cpu_count]
    vcpu_host = {v: kept_cpus[v % len(kept_cpus)] for v in range(kept_vcpus)}
    pool_vcpus = tuple(range(kept_vcpus, kept_vcpus + pool.cpu_count))
    for i, v in enumerate(pool_vcpus):
        vcpu_host[v] = pool_cpus[i % len(pool_cpus)]
    model = "host" if host.accel == "kvm" else "max"
    node = next((c.node for c in online if c.cpu == vcpu_host[pool_vcpus[0]]), 0) if pool_vcpus else 0
    layout = ParentLayout(
        name, pool, kept_vcpus, boot_memory_mib, vcpu_host, pool_vcpus, overcommit, reason, model, node
    )
    pool_memory = MemoryBackendMemfd(
        "pool-ram0", pool.memory_mib, share=True, hugetlb=True, hugetlbsize_kib=pool.page_kib,
        host_nodes=(node,), policy="bind",
    )  # fmt: skip
    block = max(2, pool.page_kib // 1024)
    devices: tuple[Device, ...] = tuple(layout.cpu_device(v) for v in pool_vcpus)
    devices += (
        VirtioMemPci(VIRTIO_MEM_ID, pool_memory, pool.memory_mib, block_size_mib=block, prealloc=True),
    )
    return replace(layout, devices=devices)


def boot_memory(layout: ParentLayout) -> MemoryBackendMemfd:
    """The parent's boot RAM: hugepages of the pool's node, preallocated, shared with the vsock switch."""
    return hugepage_memory("ram0", layout.boot_memory_mib, layout.pool.page_kib, layout.node)


def hugepage_memory(backend: str, memory_mib: int, page_kib: int, node: int) -> MemoryBackendMemfd:
    """Preallocated hugepage RAM from one host NUMA node, in a sealed memfd the vsock switch can map."""
    return MemoryBackendMemfd(
        backend, memory_mib, share=True, hugetlb=True, hugetlbsize_kib=page_kib, prealloc=True,
        host_nodes=(node,), policy="bind",
    )  # fmt: skip


@contextlib.contextmanager
def hugepage_lock(ledger: Ledger) -> Iterator[None]:
    """Held from the moment hugepages are freed or reserved until the QEMU that takes them has them (its
    memory is preallocated before it answers QMP), so another lab of this host cannot take them meanwhile."""
    with paths.exclusive_lock(ledger.directory / "hugepages.lock"):
        yield


def vcpu_owner(parent: str, vcpu: int) -> str:
    return f"parent:{parent}:vcpu{vcpu}"


def book_parent(ledger: Ledger, layout: ParentLayout, pid: int | None = None) -> dict[int, int]:
    """Claim each vCPU's host CPU (or a slot on it, overcommitted) and the parent's hugepages; returns vCPU
    index -> ledger value. All or nothing."""
    values: dict[int, int] = {}
    try:
        for vcpu, cpu in sorted(layout.vcpu_host.items()):
            owner = vcpu_owner(layout.holder, vcpu)
            if layout.overcommit:
                slots = range(cpu * SLOTS_PER_CPU, (cpu + 1) * SLOTS_PER_CPU)
                (values[vcpu],) = ledger.claim(OVERCOMMIT_KIND, slots, 1, owner, pid=pid)
            else:
                ledger.claim_exact(STRICT_KIND, [cpu], owner, pid=pid)
                values[vcpu] = cpu
        ledger.claim(
            layout.page_kind,
            PAGE_TOKENS,
            layout.pages(layout.boot_memory_mib),
            f"parent:{layout.holder}:ram",
            pid=pid,
        )
        ledger.claim(
            layout.page_kind,
            PAGE_TOKENS,
            layout.pages(layout.pool.memory_mib),
            pool_owner(layout.holder),
            pid=pid,
        )
    except BaseException:
        release_parent(ledger, layout.holder)
        raise
    return values


def pool_owner(parent: str) -> str:
    return f"parent:{parent}:pool"


def release_parent(ledger: Ledger, parent: str) -> None:
    """Drop every claim of the parent (its vCPUs, its boot RAM and its pool)."""
    prefix = f"parent:{parent}:"
    for owner in sorted({c.owner for c in ledger.claims() if c.owner.startswith(prefix)}):
        ledger.release_owner(owner)


def host_cpu_of(layout: ParentLayout, ledger_value: int) -> int:
    return ledger_value // SLOTS_PER_CPU if layout.overcommit else ledger_value


def cpu_release_mode(host: HostInfo) -> str:
    """How a carve takes vCPUs from the parent: ``unplug`` (offlined in the guest, then QMP device_del;
    plugged back with device_add), or ``offline`` where plugging a vCPU back is known to crash QEMU: QEMU 7.2
    under TCG dies (heap corruption) on the first CPU device_add after a device_del. The offlined vCPU's
    thread then stays parked in QEMU, never scheduled, and the enclave has its host CPU."""
    return "offline" if host.accel == "tcg" and host.qemu.version < (8, 0, 0) else "unplug"


def rebook(ledger: Ledger, layout: ParentLayout, pid: int | None) -> None:
    """Put the parent's claims on its QEMU's pid, so they go if it dies while the harness lives on."""
    prefix = f"parent:{layout.holder}:"
    for kind in (layout.ledger_kind, layout.page_kind):
        owners: dict[str, list[int]] = {}
        for claim in ledger.claims(kind):
            if claim.owner.startswith(prefix):
                owners.setdefault(claim.owner, []).append(claim.value)
        for owner, values in owners.items():
            ledger.transfer(kind, values, owner, pid=pid)


def pool_summary(host: HostInfo, pool: EnclavePool | None = None) -> dict[str, object]:
    """What a default parent's pool gets on this host: the CPU mapping (strict or overcommit, and why) and how
    a carve takes vCPUs, for ``teelab doctor``."""
    try:
        layout = layout_parent(host, "parent", pool or EnclavePool())
    except errors.EnclaveError as exc:
        return {"mapping": "unavailable", "reason": exc.message, "cpu_release": cpu_release_mode(host)}
    return {
        "mapping": "overcommit" if layout.overcommit else "strict",
        "reason": layout.reason,
        "vcpu_host": layout.vcpu_host,
        "cpu_release": cpu_release_mode(host),
    }
