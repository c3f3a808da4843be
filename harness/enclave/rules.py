"""The carve rules (QingTian and Nitro, REFERENCE section 1), checked on a snapshot of the parent's pool
before anything is touched: each broken rule raises its own code (E932/E933, E937-E946)."""

from __future__ import annotations

from dataclasses import dataclass

from harness.enclave import errors
from harness.enclave.plan import MAX_VCPUS, check_memory, check_vcpus
from harness.host.model import HostCpu

PARENT_MIN_VCPUS = 2
PARENT_MIN_MEMORY_MIB = 512
DEFAULT_MAX_ENCLAVES = 2
PAGE_CAP_MIB = {2048: 512, 1024 * 1024: 256 * 1024}  # enclave memory limit by hugepage size (KiB)


@dataclass(frozen=True)
class PoolCpu:
    """One of the parent's pool vCPUs (its index, which is also its CPU number in the guest) and the host
    CPU its thread is pinned to."""

    vcpu: int
    host_cpu: int


@dataclass(frozen=True)
class PoolView:
    """The parent as a carve finds it."""

    parent_vcpus: int  # vCPUs the parent has now
    parent_memory_mib: int  # memory the parent has now
    free_cpus: tuple[PoolCpu, ...]  # pool vCPUs still with the parent
    free_memory_mib: int  # pool memory still with the parent
    page_kib: int
    enclaves: int
    host_cpus: tuple[HostCpu, ...]
    parent_host_cpus: frozenset[int]  # host CPUs of the vCPUs that stay with the parent in any case
    overcommit: bool = False
    max_enclaves: int = DEFAULT_MAX_ENCLAVES
    memory_node: int = 0


@dataclass(frozen=True)
class CarveRequest:
    """What ``run-enclave`` asks: ``cpu_count`` or ``cpu_ids`` (parent CPU numbers), memory, image size."""

    memory_mib: int
    cpu_count: int | None = None
    cpu_ids: tuple[int, ...] | None = None
    eif_bytes: int | None = None


def check_carve(view: PoolView, request: CarveRequest) -> tuple[PoolCpu, ...]:
    """The pool vCPUs the enclave gets, once every rule holds; raises the first broken rule's error."""
    if view.enclaves >= view.max_enclaves:
        raise errors.EnclaveCountLimit(
            f"the parent runs {view.enclaves} enclave(s), its limit is {view.max_enclaves}",
            hint="terminate an enclave first (teelab-enclave terminate-enclave)",
            limit=view.max_enclaves,
        )
    chosen = _choose_cpus(view, request)
    _check_cpus(view, chosen)
    _check_memory(view, request)
    return chosen


def _choose_cpus(view: PoolView, request: CarveRequest) -> tuple[PoolCpu, ...]:
    wanted = len(request.cpu_ids) if request.cpu_ids is not None else request.cpu_count
    check_vcpus(wanted, where="run-enclave")
    assert isinstance(wanted, int)
    if view.parent_vcpus - wanted < PARENT_MIN_VCPUS:
        raise errors.CarveRefused(
            f"the parent has {view.parent_vcpus} vCPUs; giving {wanted} would leave it fewer than "
            f"{PARENT_MIN_VCPUS}",
            hint=f"ask for at most {max(0, view.parent_vcpus - PARENT_MIN_VCPUS)} vCPUs",
            parent_vcpus=view.parent_vcpus,
        )
    free = {c.vcpu: c for c in view.free_cpus}
    if request.cpu_ids is not None:
        outside = sorted(set(request.cpu_ids) - set(free))
        if outside or len(set(request.cpu_ids)) != len(request.cpu_ids):
            raise errors.PoolExhausted(
                f"CPU ids {list(request.cpu_ids)}: {outside or 'repeated ids'} not free in the pool",
                hint=f"choose among the pool's free CPUs {sorted(free)}",
                free=sorted(free),
            )
        return tuple(free[i] for i in request.cpu_ids)
    if len(free) < wanted:
        raise errors.PoolExhausted(
            f"{wanted} vCPUs asked, the pool has {len(free)} free",
            hint="terminate an enclave, or ask for fewer vCPUs",
            free=sorted(free),
        )
    cores = {c.cpu: (c.package, c.core) for c in view.host_cpus}  # siblings side by side: whole cores first
    return tuple(sorted(view.free_cpus, key=lambda c: (cores.get(c.host_cpu), c.host_cpu, c.vcpu))[:wanted])


def _check_cpus(view: PoolView, chosen: tuple[PoolCpu, ...]) -> None:
    by_cpu = {c.cpu: c for c in view.host_cpus}
    host = {c.host_cpu for c in chosen}
    cpu0 = set(by_cpu[0].siblings) if 0 in by_cpu else {0}
    if host & cpu0:
        raise errors.CpuZeroTaken(
            f"the enclave would run on host CPU(s) {sorted(host & cpu0)}: CPU 0 and its siblings stay out",
            hint="pin the pool's vCPUs to other host CPUs",
        )
    nodes = {by_cpu[c].node for c in host if c in by_cpu} | {view.memory_node}
    if len(nodes) > 1:
        raise errors.NumaSplit(
            f"the enclave's CPUs and memory would come from NUMA nodes {sorted(nodes)}",
            hint="choose CPUs on the node of the pool's memory",
            nodes=sorted(nodes),
        )
    if view.overcommit:
        return  # several vCPUs share a host CPU: there is no core to keep whole
    others = view.parent_host_cpus | {c.host_cpu for c in view.free_cpus if c not in chosen}
    for cpu in sorted(host):
        siblings = set(by_cpu[cpu].siblings) if cpu in by_cpu else {cpu}
        if not siblings <= host or siblings & others:
            raise errors.SharedCore(
                f"host CPU {cpu} shares its core with {sorted(siblings - {cpu})}, not all the enclave's",
                hint="ask for whole cores: every SMT sibling of each CPU",
                cpu=cpu,
            )


def _check_memory(view: PoolView, request: CarveRequest) -> None:
    memory = request.memory_mib
    check_memory(memory, request.eif_bytes, where="run-enclave")
    page_mib = max(1, view.page_kib // 1024)
    if memory % page_mib:
        raise errors.EnclaveMemoryAlignment(
            f"{memory} MiB is not a multiple of the pool's {page_mib} MiB pages",
            hint=f"ask for {-(-memory // page_mib) * page_mib} MiB",
        )
    cap = PAGE_CAP_MIB.get(view.page_kib)
    if cap is not None and memory > cap:
        raise errors.EnclaveMemoryTooLarge(
            f"{memory} MiB on {page_mib} MiB pages; the limit there is {cap} MiB",
            hint=f"ask for at most {cap} MiB, or use a pool of 1 GiB pages",
            cap_mib=cap,
        )
    if view.parent_memory_mib - memory < PARENT_MIN_MEMORY_MIB:
        raise errors.ParentMemoryReserve(
            f"the parent has {view.parent_memory_mib} MiB; giving {memory} would leave it under "
            f"{PARENT_MIN_MEMORY_MIB} MiB",
            hint=f"ask for at most {max(0, view.parent_memory_mib - PARENT_MIN_MEMORY_MIB)} MiB",
        )
    if memory > view.free_memory_mib:
        raise errors.PoolExhausted(
            f"{memory} MiB asked, the pool has {view.free_memory_mib} MiB free",
            hint="terminate an enclave, or ask for less memory",
        )


__all__ = ["MAX_VCPUS", "CarveRequest", "PoolCpu", "PoolView", "check_carve"]
