"""pytest plugin for lab test suites: hardware markers that skip with a reason, and fixtures that boot
guests and always tear them down.

Markers: ``kvm``, ``snp``, ``tdx``, ``vhost_vsock`` (skip unless the host has it), ``root`` (skip unless
root), ``vm`` (boots guests), ``slow``. Fixtures: ``lab_host``, ``lab``, ``lab_image``, ``boot_guest``,
``kms``, ``cvm``, ``parent`` and ``enclave``; docs/testing.md shows them at work.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import pytest

from harness.host import capability
from harness.host.model import HostInfo

HARDWARE_MARKERS = {
    "kvm": "needs a KVM host whose CPU exposes vmx or svm",
    "snp": "needs an AMD SEV-SNP host with QEMU >= 9.1",
    "tdx": "needs an Intel TDX host with QEMU >= 10.1",
    "sgx": "needs an Intel SGX host (flexible launch control, /dev/sgx_vepc, EPC) with QEMU >= 7.0",
    "vhost_vsock": "needs /dev/vhost-vsock",
    "root": "needs root (hugepages, hugetlbfs mounts)",
}
OTHER_MARKERS = {"vm": "boots QEMU guests", "slow": "takes more than a few seconds"}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in {**HARDWARE_MARKERS, **OTHER_MARKERS}.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def missing_hardware(marker: str, host: HostInfo) -> str | None:
    """Why this host cannot run tests marked ``marker``, or None when it can."""
    if marker == "root":
        return None if os.geteuid() == 0 else "needs root"
    group = "vhost-vsock" if marker == "vhost_vsock" else marker
    return "; ".join(capability.missing(group, host)) or None  # type: ignore[arg-type]


@functools.cache
def _host() -> HostInfo:
    """The probed host, once per process (only when a test needs it)."""
    from harness.host.probe import probe

    return probe()


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in HARDWARE_MARKERS:
        if item.get_closest_marker(marker) is not None:
            reason = missing_hardware(marker, _host())
            if reason:
                pytest.skip(f"[{marker}] {reason}")


@pytest.fixture(scope="session")
def lab_host() -> HostInfo:
    """The probed host (once per session)."""
    return _host()


@pytest.fixture
def lab(lab_host: HostInfo) -> Iterator[object]:
    """A ``Lab`` whose machines are stopped after the test, whatever happened."""
    from harness.lab import Lab

    with Lab(lab_host) as session:
        yield session


@pytest.fixture(scope="session")
def lab_image() -> Callable[[str], object]:
    """Build (or take from the cache) a guest image by recipe name."""
    from harness import images

    return images.build


@pytest.fixture
def boot_guest(lab: object) -> Callable[..., object]:
    """Boot an image to guest-init's readiness line: ``boot_guest("enclave", vcpus=2)``. An image whose role
    is ``cvm`` boots as a confidential VM (the ``cvm`` fixture), since its guest code asks for evidence."""
    from harness import images

    def boot(image: str, **options: object) -> object:
        if images.build(image).role == "cvm":
            return lab.boot_cvm(image, **options)  # type: ignore[attr-defined]
        return lab.boot_image(image, **options)  # type: ignore[attr-defined]

    return boot


@pytest.fixture
def kms(lab: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., object]]:
    """Start a lab KMS: ``server = kms()`` gives a running ``KmsServer`` (``.endpoint``, ``.kms_dir``,
    ``.credentials("operator")``, ``.create_key(policy)``) in TLS with a CA of its own (``harness.kms.tls``:
    ``ca_pin``, ``ca_certificate_pem``, ``client_context``), trusting the lab root; with ``vsock_port`` (8000
    by default) the lab's guests reach it at CID 2 on that port through the host's vsock-proxy. Stopped
    after the test."""
    from harness.attest import default_lab_dir
    from harness.kms import KmsServer, Listen

    with contextlib.ExitStack() as stack:

        def start(*, vsock_port: int | None = 8000, tls: bool = True) -> object:
            kms_dir = tmp_path_factory.mktemp("kms")
            listen = Listen(port=0, tls=tls)
            server = stack.enter_context(KmsServer.start(kms_dir, listen, lab_dir=default_lab_dir()))
            if vsock_port is not None:
                host, port = server.endpoint.split("://", 1)[1].rsplit(":", 1)
                stack.enter_context(lab.vsock_proxy(vsock_port, (host, int(port))))  # type: ignore[attr-defined]
            return server

        yield start


@pytest.fixture
def cvm(lab: object) -> Callable[..., object]:
    """Boot a confidential VM: ``cvm("cvm", kind="snp", name="guest1")`` gives a booted guest (``.agent``,
    ``.machine``) with SEV-SNP or TDX, real where the host has it and emulated byte-exactly elsewhere, and a
    vsock device; options are ``Lab.plan_cvm``'s (``cmdline_extra``, ``vcpus``, ``memory_mib``, ``mode``)."""

    def boot(image: str = "cvm", **options: object) -> object:
        return lab.boot_cvm(image, **options)  # type: ignore[attr-defined]

    return boot


@pytest.fixture
def parent(lab: object) -> Callable[..., object]:
    """Boot a parent with an enclave pool: ``parent(pool=EnclavePool(memory_mib=256, cpu_count=2),
    name="parent")`` gives a ``ParentVm`` (``.carve``, ``.describe``, ``.terminate``, ``.boot.agent``);
    options are ``Lab.boot_parent``'s. CPUs, hugepages and CIDs come from the host ledger; everything ends
    with the test."""

    def boot(image: str = "parent", **options: object) -> object:
        return lab.boot_parent(image, **options)  # type: ignore[attr-defined]

    return boot


@pytest.fixture
def enclave(parent: Callable[..., object]) -> Callable[..., object]:
    """Carve an enclave: ``enclave("hello", memory_mib=256, cpu_count=2, debug=False)`` builds the enclave
    recipe (or takes an EIF path), carves it out of ``of=`` (a ``ParentVm``; by default one parent booted for
    the test) and returns once its heartbeat came; options are ``ParentVm.carve``'s."""
    booted: list[object] = []

    def carve(
        image: str | os.PathLike[str], *, of: object = None, memory_mib: int = 256, **options: object
    ) -> object:
        from harness.enclave.recipes import build_enclave_image

        if of is None:
            if not booted:
                booted.append(parent())
            of = booted[0]
        path = image if os.path.isfile(image) else build_enclave_image(str(image)).path
        return of.carve(path, memory_mib=memory_mib, **options)  # type: ignore[attr-defined]

    return carve


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[object]:
    report = yield
    if report.failed and "lab" in getattr(item, "funcargs", {}):
        machines = getattr(item.funcargs["lab"], "launched", [])
        for machine in machines:
            report.sections.append(("teelab artifacts", str(machine.artifacts)))
    return report
