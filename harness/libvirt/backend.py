"""Choosing the VM backend: ``qemu`` (the harness forks QEMU itself) or ``libvirt`` (libvirtd runs it).

The choice is the caller's (``Lab(backend=...)``, ``teelab --backend``), else ``TEELAB_BACKEND``, else
``[lab] backend`` in teelab.toml, else ``qemu``. The libvirt backend's connection is chosen the same way:
``Lab(uri=...)`` (``teelab --libvirt-uri``), else ``TEELAB_LIBVIRT_URI``, else ``[libvirt] uri``, else the
probe's (``qemu:///system``); a ``qemu+ssh://`` URI runs the domains on a lab host
(``harness.libvirt.remote``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, cast

from harness import config
from harness.errors import ConfigError
from harness.host.model import HostInfo
from harness.libvirt.machine import LibvirtMachine
from harness.libvirt.uri import parse_uri
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


def libvirt_uri(requested: str | None = None) -> str | None:
    """The libvirt URI in force (None: the probe's, ``qemu:///system``); E463 for one the backend refuses."""
    value = config.setting("libvirt", "uri", requested=requested or None)
    if value is None or value == "":
        return None
    parse_uri(str(value))
    return str(value)


def new_machine(
    backend: Backend, spec: VMSpec, host: HostInfo, *, artifacts: Path | None = None, uri: str | None = None
) -> Machine:
    """A not yet launched machine for ``spec`` under ``backend`` (``uri``: libvirt's connection)."""
    if backend == "libvirt":
        return LibvirtMachine(spec, host, artifacts=artifacts, uri=uri)
    return Machine(spec, host, artifacts=artifacts)
