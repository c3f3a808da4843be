"""Starting libvirt's daemons where nothing else runs them (a fresh machine, a CI container): virtlogd
(QEMU's logs under libvirt) and libvirtd, each with ``-d`` when its socket is missing."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from harness.libvirt.errors import LibvirtUnavailable

RUN_DIR = Path("/run/libvirt")
DAEMONS = (("virtlogd", "virtlogd-sock"), ("libvirtd", "libvirt-sock"))


def ensure_daemons(run_dir: Path = RUN_DIR, timeout: float = 15.0) -> list[str]:
    """Start each daemon whose socket is missing; returns the names started. E461 if one cannot start."""
    started = []
    for daemon, sock in DAEMONS:
        if (run_dir / sock).exists():
            continue
        binary = shutil.which(daemon) or shutil.which(daemon, path="/usr/sbin:/sbin")
        if binary is None:
            raise LibvirtUnavailable(
                f"{daemon} is not installed",
                hint="install libvirt-daemon-system (ansible/host-packages.txt lists it): make test does",
                daemon=daemon,
            )
        subprocess.run([binary, "-d"], check=False, timeout=timeout, capture_output=True)
        deadline = time.monotonic() + timeout
        while not (run_dir / sock).exists():
            if time.monotonic() > deadline:
                raise LibvirtUnavailable(
                    f"{daemon} -d did not create {run_dir / sock} within {timeout:g} s",
                    hint=f"run {daemon} in the foreground to see why (needs root)",
                    daemon=daemon,
                )
            time.sleep(0.05)
        started.append(daemon)
    return started
