"""``teelab bench boot``: seconds from launch to guest-init's readiness line, over N boots."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from harness import images
from harness.bench.result import Bar, BenchResult
from harness.lab import Lab

# The bars of docs/status.md (boot to ready), under TCG on a 2-vCPU host.
BOOT_BARS = {"enclave": 3.0, "parent": 3.5}


def bench_boot(
    lab: Lab,
    image_name: str,
    runs: int,
    *,
    vcpus: int = 2,
    memory_mib: int = 512,
    on_sample: Callable[[int, float], None] | None = None,
) -> BenchResult:
    """Boot ``image_name`` ``runs`` times; each sample is launch -> readiness line, in seconds."""
    image = images.build(image_name)
    result = BenchResult(
        name="boot",
        unit="s",
        params={
            "image": image_name,
            "runs": runs,
            "vcpus": vcpus,
            "memory_mib": memory_mib,
            "accel": lab.host.accel,
            "initrd_bytes": image.initrd_bytes,
        },
    )
    if image_name in BOOT_BARS and lab.host.accel == "tcg":
        result.bars.append(Bar("median", "<=", BOOT_BARS[image_name]))
    guest_uptimes = []
    for index in range(runs):
        spec = lab.spec_for_image(
            image, name=f"bench-boot-{image_name}-{index}", vcpus=vcpus, memory_mib=memory_mib
        )
        boot = lab.boot(spec)
        lab.stop(boot.machine)
        result.samples.append(boot.seconds)
        guest_uptimes.append(boot.guest_uptime)
        if on_sample:
            on_sample(index, boot.seconds)
    result.extra["guest_uptime_median"] = round(statistics.median(guest_uptimes), 3)
    return result
