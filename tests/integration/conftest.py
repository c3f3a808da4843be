"""Integration tests boot real guests under TCG (or KVM where the host allows)."""

from __future__ import annotations

import pytest

from harness import images


@pytest.fixture(scope="session")
def enclave_image() -> images.BuiltImage:
    return images.build("enclave")


@pytest.fixture(scope="session")
def parent_image() -> images.BuiltImage:
    return images.build("parent")


@pytest.fixture(scope="session")
def cvm_image() -> images.BuiltImage:
    return images.build("cvm")


@pytest.fixture(scope="session")
def libvirt_daemons() -> None:
    """libvirtd and virtlogd, started here (``-d``) when nothing runs them yet: a fresh machine, CI."""
    from harness.libvirt.daemon import ensure_daemons

    ensure_daemons()


@pytest.fixture(scope="module", params=["qemu", "libvirt"])
def vm_backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn (docs/libvirt.md): the representative guest tests run under both."""
    if request.param == "libvirt":
        request.getfixturevalue("libvirt_daemons")
    return str(request.param)
