"""The libvirt backend end to end: artifacts, transient domains, AUTODESTROY, vCPU pinning through libvirt,
refusals before anything starts, and 50 launch-and-stop cycles that leave no domain, QEMU process, socket,
log or temp entry behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import alive, qemu_pids

from harness import paths
from harness.lab import Lab
from harness.libvirt import LibvirtMachine, LibvirtUnsupported
from harness.libvirt.machine import QEMU_LOGS
from harness.qemu.devices import X86Cpu

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("libvirt_daemons")]

TAG = "lv-leftover"
CYCLES = 50
HARNESS_SCRIPT = textwrap.dedent(
    """
    import sys
    from harness import images
    from harness.lab import Lab
    lab = Lab(backend="libvirt")
    machine = lab.launch(lab.spec_for_image(images.build("enclave"), name=sys.argv[1], memory_mib=256))
    print(machine.pid, machine.domain_name, flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def conn() -> Iterator[Any]:
    import libvirt

    connection = libvirt.open("qemu:///system")
    yield connection
    connection.close()


def domains(conn: Any, word: str) -> set[str]:
    """Every domain libvirtd knows (running or only defined) with ``word`` in its name."""
    return {d.name() for d in conn.listAllDomains() if word in d.name()}


@pytest.fixture
def lab(lab_host) -> Iterator[Lab]:
    with Lab(lab_host, backend="libvirt") as session:
        yield session


def test_artifacts_hold_the_domain_xml_beside_run_sh_and_the_real_qemu_argv(
    lab: Lab, enclave_image, conn
) -> None:
    boot = lab.boot(lab.spec_for_image(enclave_image, name="lv-artifacts"))
    machine = boot.machine
    assert isinstance(machine, LibvirtMachine)
    assert domains(conn, machine.domain_name) == {machine.domain_name}
    assert not conn.lookupByName(machine.domain_name).isPersistent(), "the domain should be transient"
    lab.stop(machine)
    folder = machine.artifacts
    assert (folder / "domain.xml").read_text() == machine.xml and "<kernel>" in machine.xml
    assert "virsh" in (folder / "run.sh").read_text() and (folder / "run.xml").exists()
    argv = json.loads((folder / "argv.json").read_text())
    assert "qemu-system" in argv[0] and machine.domain_name in " ".join(argv)
    assert json.loads((folder / "exit.json").read_text()) == {
        "stage": "powerdown", "returncode": 0, "reason": "shutdown"
    }  # fmt: skip
    assert (folder / "qemu.log").exists() and not (QEMU_LOGS / f"{machine.domain_name}.log").exists()
    assert domains(conn, machine.domain_name) == set()


def test_vcpus_are_pinned_through_libvirt(lab: Lab, enclave_image) -> None:
    boot = lab.boot(lab.spec_for_image(enclave_image, name="lv-pin"))
    assert boot.machine.pin_vcpus([1, 0]) == {0: 1, 1: 0}
    threads = boot.machine.vcpu_threads()
    assert {i: os.sched_getaffinity(tid) for i, tid in threads.items()} == {0: {1}, 1: {0}}


def test_a_carve_parent_is_refused_before_anything_exists(lab: Lab, enclave_image) -> None:
    spec = lab.spec_for_image(enclave_image, name="lv-refused", devices=(X86Cpu("cpu9", socket_id=2),))
    runs = set(paths.runs_dir().glob("*lv-refused*"))
    with pytest.raises(LibvirtUnsupported) as caught:
        lab.launch(spec)
    assert caught.value.code == "E360"
    assert set(paths.runs_dir().glob("*lv-refused*")) == runs


@pytest.mark.slow
def test_fifty_cycles_leave_nothing_behind(lab_host, enclave_image, conn, tmp_path: Path) -> None:
    """Ended every way: powerdown, graceful destroy, QEMU SIGKILLed, the harness SIGKILLed (AUTODESTROY),
    and a domain QEMU refuses (its vhost-user backend is missing)."""
    from harness.qemu.chardevs import ChardevSocket
    from harness.qemu.devices import VhostUserVsockPci
    from harness.qemu.objects import MemoryBackendMemfd

    private = tmp_path / "tmp"
    private.mkdir()
    before = set(os.listdir(private))
    logs_before = set(QEMU_LOGS.glob(f"teelab-{TAG}*"))
    ends: dict[str, int] = {}
    old_tempdir = tempfile.tempdir
    tempfile.tempdir = str(private)
    try:
        with Lab(lab_host, backend="libvirt") as lab:
            for cycle in range(CYCLES):
                name = f"{TAG}-{cycle}"
                how = ("powerdown", "quit", "sigkill-qemu", "kill-harness", "refused")[cycle % 5]
                ends[how] = ends.get(how, 0) + 1
                if how == "kill-harness":
                    harness = subprocess.Popen(
                        [sys.executable, "-c", HARNESS_SCRIPT, name], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(private)},
                    )  # fmt: skip
                    pid, domain = harness.stdout.readline().split()  # type: ignore[union-attr]
                    harness.kill()
                    harness.wait()
                    assert wait_until(lambda p=pid, d=domain: not alive(int(p)) and not domains(conn, d)), (
                        f"cycle {cycle}: domain {domain} outlived its harness"
                    )
                    continue
                spec = lab.spec_for_image(enclave_image, name=name, memory_mib=256)
                if how == "powerdown":
                    assert lab.boot(spec).machine.shutdown().stage == "powerdown"
                elif how == "quit":
                    assert lab.launch(spec).shutdown(powerdown_timeout=0).stage == "quit"
                elif how == "sigkill-qemu":
                    machine = lab.launch(spec)
                    os.kill(machine.pid, signal.SIGKILL)  # type: ignore[arg-type]
                    machine.shutdown(powerdown_timeout=1)
                    assert machine.stop_reason in {"crashed", "failed", "destroyed"}, machine.stop_reason  # type: ignore[attr-defined]
                else:
                    missing = VhostUserVsockPci(
                        "vsock0", ChardevSocket("vsock0-chr", path=private / "none.sock")
                    )
                    refused = lab.spec_for_image(
                        enclave_image, name=name, memory_mib=256,
                        memory=MemoryBackendMemfd("ram0", 256), devices=(missing,),
                    )  # fmt: skip
                    with pytest.raises(Exception) as caught:
                        lab.launch(refused)
                    assert getattr(caught.value, "code", None) == "E462"
    finally:
        tempfile.tempdir = old_tempdir
    assert ends == dict.fromkeys(("powerdown", "quit", "sigkill-qemu", "kill-harness", "refused"), 10)
    assert wait_until(lambda: not qemu_pids(TAG) and not domains(conn, TAG)), (
        qemu_pids(TAG),
        domains(conn, TAG),
    )
    assert set(os.listdir(private)) == before, "run dirs or sockets were left in the temp dir"
    assert set(QEMU_LOGS.glob(f"teelab-{TAG}*")) - logs_before == set(), "libvirt kept QEMU logs"


def wait_until(condition: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_an_enclave_image_boots_with_its_security_module(lab: Lab) -> None:
    from harness.enclave.recipes import build_enclave_image

    boot = lab.boot_enclave(build_enclave_image("hello").path, name="lv-enclave", vcpus=2)
    assert boot.role == "enclave" and boot.agent is not None
    line = boot.agent.exec(["/app/run", "ab" * 32], check=True, timeout=60).text
    assert line.startswith("TEELAB-APP-DOCUMENT nonce=" + "ab" * 32)


def test_a_cvm_gets_its_vtpm_through_the_external_tpm_backend(lab: Lab, cvm_image) -> None:
    boot = lab.boot_cvm(cvm_image, name="lv-vtpm", vcpus=1, vtpm="ephemeral")
    assert boot.agent is not None
    assert boot.agent.exec(["cat", "/sys/class/tpm/tpm0/tpm_version_major"], check=True).text == "2\n"
    assert '<backend type="external">' in boot.machine.xml  # type: ignore[attr-defined]
