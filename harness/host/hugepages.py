"""Hugepage pools and hugetlbfs mounts: reserve pages and mount a filesystem for them (both need root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from harness.host.errors import HugepageReserveFailed, HugetlbfsMountFailed, NeedsRoot
from harness.host.model import size_text
from harness.host.probe import hugepage_pools, hugetlbfs_mounts

MOUNT_BASE = Path("/run/teelab")


def pool_knob(page_kib: int, node: int | None = None) -> Path:
    """The sysfs file whose value is the size of the pool of ``page_kib`` pages (on ``node``)."""
    if node is None:
        return Path(f"/sys/kernel/mm/hugepages/hugepages-{page_kib}kB/nr_hugepages")
    return Path(f"/sys/devices/system/node/node{node}/hugepages/hugepages-{page_kib}kB/nr_hugepages")


def free_pages(page_kib: int, node: int | None = None, root: Path = Path("/")) -> int:
    pools = [p for p in hugepage_pools(root) if p.size_kib == page_kib and (node is None or p.node == node)]
    return sum(p.free for p in pools)


def ensure_pool(page_kib: int, pages: int, node: int | None = None) -> int:
    """Grow the pool until ``pages`` pages of ``page_kib`` are free (on ``node``); returns the free count."""
    free = free_pages(page_kib, node)
    if free >= pages:
        return free
    knob = pool_knob(page_kib, node)
    if os.geteuid() != 0:
        raise NeedsRoot(
            f"{pages} hugepages of {page_kib} KiB wanted, {free} free, and only root can reserve more",
            hint=f"as root: echo $(( $(cat {knob}) + {pages - free} )) > {knob}",
        )
    try:
        knob.write_text(str(int(knob.read_text()) + pages - free))
    except OSError as exc:  # no pool of that size (or node), or the kernel refused the value
        raise HugepageReserveFailed(
            f"cannot grow the pool of {page_kib} KiB hugepages through {knob}: {exc.strerror}",
            hint=f"check that {knob} exists: the CPU and kernel must offer {page_kib} KiB pages",
            knob=str(knob),
        ) from exc
    free = free_pages(page_kib, node)
    if free < pages:
        raise HugepageReserveFailed(
            f"asked the kernel for {pages} free {page_kib} KiB hugepages, got {free}",
            hint="free memory, or reserve hugepages at boot with hugepages= on the kernel command line",
            knob=str(knob),
        )
    return free


def ensure_hugetlbfs(page_kib: int, mount_point: Path | None = None) -> Path:
    """A hugetlbfs mount of ``page_kib`` pages: an existing one, or a new one under /run/teelab."""
    for mount in hugetlbfs_mounts(Path("/")):
        if mount.pagesize_kib == page_kib and (mount_point is None or Path(mount.path) == mount_point):
            return Path(mount.path)
    size = size_text(page_kib)
    target = mount_point or MOUNT_BASE / f"hugepages-{size}"
    if os.geteuid() != 0:
        raise NeedsRoot(
            f"no hugetlbfs mount of {page_kib} KiB pages, and only root can mount one",
            hint=f"as root: mkdir -p {target} && mount -t hugetlbfs -o pagesize={size} none {target}",
        )
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "hugetlbfs", "-o", f"pagesize={size}", "none", str(target)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise HugetlbfsMountFailed(
            f"mount -t hugetlbfs on {target} failed: {done.stderr.strip()}",
            hint=f"check that /sys/kernel/mm/hugepages/hugepages-{page_kib}kB exists",
            target=str(target),
        )
    return target


def hugepage_files(mount: Path) -> list[Path]:
    """Files under a hugetlbfs mount: each holds hugepages until it is unlinked."""
    return sorted(p for p in Path(mount).rglob("*") if p.is_file())
