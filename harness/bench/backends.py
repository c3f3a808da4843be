"""``teelab bench boot --backend both``: boot to guest-init ready under libvirt against direct QEMU, side by
side in one run (boots alternate, so both see the same host load); the bar is libvirt <= 1.2 x QEMU."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from harness import images
from harness.bench.result import Bar, BenchResult
from harness.host.model import HostInfo
from harness.lab import Lab

RATIO_BAR = 1.2


def bench_backends(
    host: HostInfo,
    image_name: str,
    runs: int,
    *,
    vcpus: int = 2,
    memory_mib: int = 512,
    on_sample: Callable[[int, str, float], None] | None = None,
) -> BenchResult:
    """``runs`` pairs of boots (QEMU then libvirt, alternating which goes first); each sample is one pair's
    libvirt/QEMU ratio of launch -> readiness line."""
    image = images.build(image_name)
    result = BenchResult(
        name="boot-backends",
        unit="x",
        params={
            "image": image_name,
            "runs": runs,
            "vcpus": vcpus,
            "memory_mib": memory_mib,
            "accel": host.accel,
        },
    )
    result.bars.append(Bar("median", "<=", RATIO_BAR))
    seconds: dict[str, list[float]] = {"qemu": [], "libvirt": []}
    with Lab(host, backend="qemu") as qemu_lab, Lab(host, backend="libvirt") as libvirt_lab:
        labs = {"qemu": qemu_lab, "libvirt": libvirt_lab}
        for index in range(runs):
            order = ("qemu", "libvirt") if index % 2 == 0 else ("libvirt", "qemu")
            for backend in order:
                lab = labs[backend]
                spec = lab.spec_for_image(
                    image, name=f"bench-{backend}-{index}", vcpus=vcpus, memory_mib=memory_mib
                )
                boot = lab.boot(spec)
                lab.stop(boot.machine)
                seconds[backend].append(boot.seconds)
                if on_sample:
                    on_sample(index, backend, boot.seconds)
            result.samples.append(round(seconds["libvirt"][-1] / seconds["qemu"][-1], 3))
    for backend, values in seconds.items():
        result.extra[f"{backend}_median_s"] = round(statistics.median(values), 3)
    result.extra["ratio_of_medians"] = round(
        result.extra["libvirt_median_s"] / result.extra["qemu_median_s"], 3
    )
    return result
