"""The carve rules, table-driven: each broken rule has its own code; a carve within them gets whole cores."""

from __future__ import annotations

from dataclasses import replace

import pytest

from harness.enclave import errors
from harness.enclave.rules import CarveRequest, PoolCpu, PoolView, check_carve
from harness.host.model import HostCpu

MIB = 1 << 20


def smt_host(cores: int, nodes: int = 1) -> tuple[HostCpu, ...]:
    """2 threads per core, cores split evenly over ``nodes``: CPU c and c + cores are siblings."""
    per_node = cores // nodes
    return tuple(
        HostCpu(
            cpu=c,
            core=c % cores,
            package=0,
            node=(c % cores) // per_node,
            siblings=(c % cores, c % cores + cores),
        )
        for c in range(2 * cores)
    )


# 8 cores with SMT: the parent keeps cores 0-1 (CPUs 0, 1, 8, 9), its pool is cores 2-3 (CPUs 2, 3, 10, 11).
STRICT = PoolView(
    parent_vcpus=8,
    parent_memory_mib=1536,
    free_cpus=tuple(PoolCpu(v, h) for v, h in zip(range(4, 8), (2, 10, 3, 11), strict=True)),
    free_memory_mib=1024,
    page_kib=2048,
    enclaves=0,
    host_cpus=smt_host(8),
    parent_host_cpus=frozenset({0, 1, 8, 9}),
)
# This machine: 2 host CPUs, the pool's two vCPUs both on host CPU 1.
OVERCOMMIT = PoolView(
    parent_vcpus=4,
    parent_memory_mib=768,
    free_cpus=(PoolCpu(2, 1), PoolCpu(3, 1)),
    free_memory_mib=256,
    page_kib=2048,
    enclaves=0,
    host_cpus=(HostCpu(0, 0, 0, 0, (0,)), HostCpu(1, 1, 0, 0, (1,))),
    parent_host_cpus=frozenset({0}),
    overcommit=True,
)


def test_whole_cores_are_chosen_from_the_pool() -> None:
    chosen = check_carve(STRICT, CarveRequest(memory_mib=256, cpu_count=2))
    assert sorted(c.host_cpu for c in chosen) == [2, 10]


def test_overcommit_maps_two_vcpus_to_one_host_cpu() -> None:
    assert check_carve(OVERCOMMIT, CarveRequest(memory_mib=256, cpu_count=2)) == OVERCOMMIT.free_cpus


CASES = [
    # (what, view, request, code)
    ("odd vCPU count", STRICT, CarveRequest(256, cpu_count=3), "E933"),
    ("over 62 vCPUs", replace(STRICT, parent_vcpus=80), CarveRequest(256, cpu_count=64), "E933"),
    ("parent would keep 1 vCPU", replace(STRICT, parent_vcpus=3), CarveRequest(256, cpu_count=2), "E937"),
    ("parent would keep 0", OVERCOMMIT, CarveRequest(256, cpu_count=4), "E937"),
    (
        "pool short of vCPUs",
        replace(STRICT, free_cpus=STRICT.free_cpus[:2]),
        CarveRequest(256, cpu_count=4),
        "E939",
    ),
    ("cpu id outside the pool", STRICT, CarveRequest(256, cpu_ids=(0, 1)), "E939"),
    ("cpu id twice", STRICT, CarveRequest(256, cpu_ids=(4, 4)), "E939"),
    ("half a core", STRICT, CarveRequest(256, cpu_ids=(4, 6)), "E940"),
    (
        "host CPU 0",
        replace(STRICT, free_cpus=(PoolCpu(4, 0), PoolCpu(5, 8))),
        CarveRequest(256, cpu_count=2),
        "E943",
    ),
    (
        "host CPU 0 under overcommit",
        replace(OVERCOMMIT, free_cpus=(PoolCpu(2, 0), PoolCpu(3, 1))),
        CarveRequest(256, cpu_count=2),
        "E943",
    ),
    (
        "two NUMA nodes",
        replace(
            STRICT,
            host_cpus=smt_host(8, nodes=2),
            free_cpus=(PoolCpu(4, 3), PoolCpu(5, 11), PoolCpu(6, 4), PoolCpu(7, 12)),
        ),
        CarveRequest(256, cpu_ids=(4, 5, 6, 7)),
        "E942",
    ),
    ("under 128 MiB", STRICT, CarveRequest(64, cpu_count=2), "E932"),
    ("under 4 x the image", STRICT, CarveRequest(128, cpu_count=2, eif_bytes=40 * MIB), "E932"),
    ("not whole pages", STRICT, CarveRequest(255, cpu_count=2), "E945"),
    ("over 512 MiB on 2 MiB pages", STRICT, CarveRequest(514, cpu_count=2), "E941"),
    ("parent under 512 MiB", replace(STRICT, parent_memory_mib=700), CarveRequest(256, cpu_count=2), "E938"),
    ("pool short of memory", replace(STRICT, free_memory_mib=128), CarveRequest(256, cpu_count=2), "E939"),
    ("third enclave", replace(STRICT, enclaves=2), CarveRequest(256, cpu_count=2), "E944"),
    ("limit of one", replace(STRICT, enclaves=1, max_enclaves=1), CarveRequest(256, cpu_count=2), "E944"),
]


@pytest.mark.parametrize(("view", "request_", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_broken_rule_has_its_code(view: PoolView, request_: CarveRequest, code: str) -> None:
    with pytest.raises(errors.EnclaveError) as caught:
        check_carve(view, request_)
    assert caught.value.code == code, caught.value


def test_1_gib_pages_allow_up_to_256_gib() -> None:
    big = replace(STRICT, page_kib=1 << 20, parent_memory_mib=600 * 1024, free_memory_mib=300 * 1024)
    check_carve(big, CarveRequest(256 * 1024, cpu_count=2))
    with pytest.raises(errors.EnclaveMemoryTooLarge):
        check_carve(big, CarveRequest(257 * 1024, cpu_count=2))
    with pytest.raises(errors.EnclaveMemoryAlignment):
        check_carve(big, CarveRequest(1536, cpu_count=2))
