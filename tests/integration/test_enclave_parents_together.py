"""Two parents booting at once in two processes (pytest-xdist's workers) both get their hugepages: the
hugepage lock is held until a parent's pool region is plugged, which its guest does after boot, so the other
process cannot count those pages as free. Before, with the host's pool short of two parents, the second's
QEMU could not map its RAM (ENOMEM)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.enclave.pool import hugepage_lock
from harness.host.hugepages import free_pages, pool_knob
from harness.host.ledger import Ledger

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.root]
PAGE_KIB = 2048
PARENT_PAGES = (512 + 256) // 2  # boot RAM and the default pool, in 2 MiB pages

BOOT_ONE = """
import sys
from harness.lab import Lab
with Lab() as lab:
    parent = lab.boot_parent(name=sys.argv[1])
    print("online", parent.order({"op": "status"})["online"], flush=True)
"""


def test_two_parents_booting_at_once_each_get_their_hugepages() -> None:
    knob = pool_knob(PAGE_KIB)
    with hugepage_lock(Ledger()):  # leave room for one parent only: the second must grow the pool
        knob.write_text(str(int(knob.read_text()) - free_pages(PAGE_KIB) + PARENT_PAGES))
    assert free_pages(PAGE_KIB) == PARENT_PAGES
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", BOOT_ONE, f"together-{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0 and b"online" in out, err.decode(errors="replace")[-2000:]
