"""virtio-serial ports by name. There is no udev in teelab guests, so /dev/virtio-ports/<name> links are made
here from /sys/class/virtio-ports/*/name."""

from __future__ import annotations

import contextlib
import os
import time

SYS_PORTS = "/sys/class/virtio-ports"
DEV_PORTS = "/dev/virtio-ports"


def link_ports(sys_dir: str = SYS_PORTS, dev_dir: str = DEV_PORTS) -> dict[str, str]:
    """Make /dev/virtio-ports/<name> -> /dev/vportNpM for every named port; returns name -> device."""
    found = {}
    try:
        entries = os.listdir(sys_dir)
    except OSError:
        return found
    os.makedirs(dev_dir, exist_ok=True)
    for entry in entries:
        try:
            with open(os.path.join(sys_dir, entry, "name")) as name_file:
                name = name_file.read().strip()
        except OSError:
            continue
        if not name:
            continue
        device = os.path.join("/dev", entry)
        link = os.path.join(dev_dir, name)
        with contextlib.suppress(FileExistsError):  # another thread may link it first
            os.symlink(device, link)
        found[name] = device
    return found


def wait_for_port(name: str, timeout: float = 10.0) -> str:
    """The path of port ``name`` once it exists; FileNotFoundError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    link = os.path.join(DEV_PORTS, name)
    while True:
        if name in link_ports() and os.path.exists(link):
            return link
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"virtio-serial port {name} did not appear in {timeout:g} s")
        time.sleep(0.02)
