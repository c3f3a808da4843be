"""Choosing the VM backend: ``qemu`` (the harness forks QEMU itself) or ``libvirt`` (libvirtd runs it).

The choice is the caller's (``Lab(backend=...)``, ``teelab --backend``), else ``TEELAB_BACKEND``, else
``[lab] backend`` in teelab.toml, else ``qemu``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, cast

from harness import config
from harness.errors import ConfigError
from harness.host.model import HostInfo
from harness.libvirt.machine import LibvirtMachine
from harness.qemu.machine import Machine
from harness.qemu.spec import VMSpec

Backend = Literal["qemu", "libvirt"]
BACKENDS: tuple[Backend, ...] = ("qemu", "libvirt")
ENV_BACKEND = "TEELAB_BACKEND"


def vm_backend(requested: str | None = None) -> Backend:
    """The backend in force; a ``ConfigError`` (E101) names a value that is neither."""
    value = requested or os.environ.get(ENV_BACKEND) or config.setting("lab", "backend", "qemu")
    if value not in BACKENDS:
        raise ConfigError(
            f"VM backend {value!r} is not one of {', '.join(BACKENDS)}",
            hint=f"pass --backend qemu|libvirt, or set {ENV_BACKEND} or [lab] backend in teelab.toml",
            value=value,
        )
    return cast(Backend, value)


def new_machine(backend: Backend, spec: VMSpec, host: HostInfo, *, artifacts: Path | None = None) -> Machine:
    """A not yet launched machine for ``spec`` under ``backend``."""
    if backend == "libvirt":
        return LibvirtMachine(spec, host, artifacts=artifacts)
    return Machine(spec, host, artifacts=artifacts)
