"""``teelab bench eif``, ``nsm`` and ``enclave``: describing an enclave image, the security module's answers,
and an enclave's boot to its first attestation document."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from teelab_guest import nsm_wire

from harness.bench.result import Bar, BenchResult
from harness.enclave import build_eif, read_eif
from harness.enclave.nsm import SecurityModule
from harness.host import runtime

if TYPE_CHECKING:
    from harness.enclave.pool import ParentLayout
    from harness.lab import Lab

EIF_DESCRIBE_BAR_S = 1.0  # describe (read, CRC, PCRs) of an image with a 40 MiB ramdisk, 2-vCPU host
NSM_ATTESTATION_BAR_MS = 20.0  # one Attestation request signed by the lab CA
ENCLAVE_FIRST_DOCUMENT_BAR_S = 6.0  # boot_enclave -> /app/run's document on the console, TCG, 2 vCPUs


def bench_eif(ramdisk_mib: int, runs: int) -> BenchResult:
    """Samples: seconds to describe the image; extra: build seconds and describe throughput."""
    result = BenchResult(
        "eif", "s", {"ramdisk_mib": ramdisk_mib, "runs": runs, "kernel_mib": 8, "bootstrap_mib": 2}
    )
    if ramdisk_mib >= 40:
        result.bars.append(Bar("median", "<=", EIF_DESCRIBE_BAR_S))
    builds = []
    with runtime.scratch_dir("bench-eif") as tmp:
        root = Path(tmp)
        for name, mib in (("bzImage", 8), ("init.cpio", 2), ("app.cpio", ramdisk_mib)):
            with open(root / name, "wb") as out:
                for _ in range(mib):
                    out.write(os.urandom(1 << 20))
        for _ in range(runs):
            start = time.perf_counter()
            image = build_eif(
                root / "app.eif",
                kernel=root / "bzImage",
                cmdline="console=ttyS0",
                ramdisks=[root / "init.cpio", root / "app.cpio"],
            )
            builds.append(time.perf_counter() - start)
            start = time.perf_counter()
            read_eif(root / "app.eif")
            result.samples.append(time.perf_counter() - start)
        size_mib = image.size / (1 << 20)
    result.extra["image_mib"] = round(size_mib, 1)
    result.extra["build_median_s"] = round(statistics.median(builds), 3)
    result.extra["describe_mib_per_s"] = round(size_mib / statistics.median(result.samples))
    return result


def bench_nsm(requests: int) -> BenchResult:
    """Samples: milliseconds per Attestation request (lab CA signature included); extra: ExtendPCR and
    DescribePCR microseconds."""
    from harness.attest import LabAuthority

    result = BenchResult(
        "nsm", "ms", {"requests": requests}, bars=[Bar("median", "<=", NSM_ATTESTATION_BAR_MS)]
    )
    with runtime.scratch_dir("bench-nsm") as tmp:
        authority = LabAuthority.load_or_create(Path(tmp) / "lab-ca")
        module = SecurityModule(
            {0: bytes(48)}, debug=False, issue_document=authority.attestation_document, module_id="bench"
        )
        attestation = nsm_wire.attestation(nonce=os.urandom(32), public_key=os.urandom(300))
        for kind, request, sink in (
            ("extend", nsm_wire.extend_pcr(16, b"x" * 64), []),
            ("describe", nsm_wire.describe_pcr(0), []),
            ("attestation", attestation, result.samples),
        ):
            for _ in range(requests):
                start = time.perf_counter()
                response = module.handle(request)
                sink.append((time.perf_counter() - start) * (1e3 if kind == "attestation" else 1e6))
            nsm_wire.decode_response(response)  # raises if the last answer was an error
            if kind != "attestation":
                result.extra[f"{kind}_pcr_median_us"] = round(statistics.median(sink), 1)
    return result


def bench_enclave(runs: int) -> BenchResult:
    """Samples: seconds from ``Lab.boot_enclave`` of the hello image to its boot-time attestation document;
    extra: the plan (read, copy into memfds, measure), boot-to-readiness and app medians."""
    from harness.enclave.plan import plan_enclave, wait_for_app
    from harness.enclave.recipes import build_enclave_image
    from harness.lab import Lab

    built = build_enclave_image("hello")
    with Lab() as lab:
        result = BenchResult(
            "enclave",
            "s",
            {"image": "hello", "runs": runs, "accel": lab.host.accel, "eif_bytes": built.eif_bytes},
        )
        if lab.host.accel == "tcg":
            result.bars.append(Bar("median", "<=", ENCLAVE_FIRST_DOCUMENT_BAR_S))
        plans, boots, apps = [], [], []
        for index in range(runs):
            start = time.perf_counter()
            with plan_enclave(built.path, host=lab.host):
                plans.append(time.perf_counter() - start)
            start = time.perf_counter()
            boot = lab.boot_enclave(built.path, agent=False, name=f"bench-enclave-{index}")
            ready = time.perf_counter()
            wait_for_app(boot.machine)
            result.samples.append(time.perf_counter() - start)
            boots.append(boot.seconds)
            apps.append(time.perf_counter() - ready)
            lab.stop(boot.machine)
    for name, values in (("plan", plans), ("boot", boots), ("app", apps)):
        result.extra[f"{name}_median_s"] = round(statistics.median(values), 3)
    return result


CARVE_RATIO_BAR = 1.25  # carved enclave to heartbeat / the same image booted standalone to readiness


def bench_carve(runs: int) -> BenchResult:
    """Samples: carve-to-heartbeat over standalone-boot-to-readiness of the hello image, per run, both with
    2 vCPUs pinned to the pool's host CPUs and 256 MiB of preallocated hugepages, the parent running beside;
    extra: the carve, heartbeat (launch to heartbeat), give-back and standalone medians."""
    from harness.enclave.recipes import build_enclave_image
    from harness.lab import Lab

    built = build_enclave_image("hello")
    with Lab() as lab:
        parent = lab.boot_parent(name="bench-parent")
        result = BenchResult(
            "carve",
            "ratio",
            {"image": "hello", "runs": runs, "accel": lab.host.accel, "mapping": parent.layout.reason},
            bars=[Bar("median", "<=", CARVE_RATIO_BAR)],
        )
        host_cpus = [parent.layout.vcpu_host[v] for v in parent.layout.pool_vcpus]
        carves, beats, backs, standalone = [], [], [], []
        for index in range(runs):
            enclave = parent.carve(built.path, memory_mib=256, cpu_count=2)
            carves.append(enclave.carve_seconds)
            beats.append(enclave.heartbeat_seconds)
            start = time.perf_counter()
            parent.terminate(enclave)
            backs.append(time.perf_counter() - start)
            standalone.append(_standalone_boot(lab, built.path, host_cpus, parent.layout, index))
            result.samples.append(carves[-1] / standalone[-1])
    for name, values in (
        ("carve", carves),
        ("heartbeat", beats),
        ("give_back", backs),
        ("standalone", standalone),
    ):
        result.extra[f"{name}_median_s"] = round(statistics.median(values), 3)
    return result


def _standalone_boot(lab: Lab, eif: Path, host_cpus: list[int], layout: ParentLayout, index: int) -> float:
    """Seconds from planning ``eif`` to its readiness line, booted alone on the same CPUs and page size."""
    from dataclasses import replace

    from harness.enclave.carver import enclave_spec
    from harness.enclave.plan import plan_enclave
    from harness.host.hugepages import ensure_pool
    from harness.host.probe import hugepage_pools
    from harness.lab import READY_PATTERN
    from harness.qemu.machine import Machine

    page_kib = layout.pool.page_kib
    ensure_pool(page_kib, 256 * 1024 // page_kib)
    host = replace(lab.host, hugepages=hugepage_pools(Path("/")))
    start = time.perf_counter()
    with plan_enclave(
        eif, host=host, vcpus=2, memory_mib=256, agent=False, name=f"bench-alone-{index}"
    ) as plan:
        spec = enclave_spec(plan.spec, 256, page_kib, (), layout.node)
        with Machine(spec, host) as machine:
            machine.launch()
            plan.release_files()
            plan.serve(machine)
            for vcpu, tid in machine.vcpu_threads().items():
                os.sched_setaffinity(tid, {host_cpus[vcpu % len(host_cpus)]})
            machine.wait_for_console(READY_PATTERN, 120)
            seconds = time.perf_counter() - start
            machine.kill()
    return seconds
