"""Starting libvirt's daemons where nothing else runs them (a fresh machine, a CI container): virtlogd
(QEMU's logs under libvirt) and libvirtd, each with ``-d`` when nothing answers on its socket.

A socket file alone proves nothing: a container image or a killed daemon leaves one behind that refuses
every connection, so a daemon counts as running only when a connection to its socket is accepted."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from harness.host.probe import socket_answers
from harness.libvirt.errors import LibvirtUnavailable

RUN_DIR = Path("/run/libvirt")
DAEMONS = (("virtlogd", "virtlogd-sock"), ("libvirtd", "libvirt-sock"))


def ensure_daemons(run_dir: Path = RUN_DIR, timeout: float = 15.0) -> list[str]:
    """Start each daemon nothing answers for (removing a stale socket first); returns the names started.
    E461 if one is not installed or does not answer within ``timeout`` seconds."""
    started = []
    for daemon, sock in DAEMONS:
        path = run_dir / sock
        if socket_answers(path):
            continue
        binary = shutil.which(daemon) or shutil.which(daemon, path="/usr/sbin:/sbin")
        if binary is None:
            raise LibvirtUnavailable(
                f"{daemon} is not installed",
                hint="install libvirt-daemon-system (ansible/host-packages.txt lists it): make test does",
                daemon=daemon,
            )
        path.unlink(missing_ok=True)  # left by a daemon that died: it would only refuse
        done = subprocess.run([binary, "-d"], check=False, timeout=timeout, capture_output=True, text=True)
        deadline = time.monotonic() + timeout
        while not socket_answers(path):
            if time.monotonic() > deadline:
                raise LibvirtUnavailable(
                    f"{daemon} -d did not answer on {path} within {timeout:g} s "
                    f"(exit {done.returncode}: {done.stderr.strip()[-300:] or 'no message'})",
                    hint=f"run {daemon} in the foreground to see why (needs root)",
                    daemon=daemon,
                )
            time.sleep(0.05)
        started.append(daemon)
    return started
