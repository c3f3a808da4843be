"""The same guests under ``-accel kvm`` on a KVM host (marker ``kvm``; skipped elsewhere with the reason, and
the nightly's guard fails the kvm job if they all skip): boot to ready and power off, the guest agent, vsock
both ways, and launch/stop cycles that leave no QEMU process behind."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
from dataclasses import replace

import pytest
from processes import qemu_pids
from teelab_guest.vsock_peer import pattern_sha256

from harness import images
from harness.lab import Lab
from harness.qemu.objects import MemoryBackendMemfd
from harness.qemu.spec import VMSpec

pytestmark = [pytest.mark.vm, pytest.mark.kvm]
PEER = ["python3", "-m", "teelab_guest.vsock_peer"]
MIB = 1 << 20


def kvm_spec(lab: Lab, image: images.BuiltImage, name: str, **options: object) -> VMSpec:
    """``spec_for_image`` with KVM asked for explicitly: validation refuses it on a host without KVM."""
    return replace(lab.spec_for_image(image, name=name, **options), accel="kvm")  # type: ignore[arg-type]


def test_guest_boots_under_kvm_and_powers_off(lab: Lab, enclave_image) -> None:
    boot = lab.boot(kvm_spec(lab, enclave_image, "kvm-boot"))
    argv = boot.machine.argv
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"
    assert boot.machine.qmp("query-kvm") == {"enabled": True, "present": True}
    assert boot.role == "enclave"
    info = boot.machine.shutdown()
    assert (info.stage, info.returncode) == ("powerdown", 0), boot.machine.console_text()[-500:]


def test_agent_runs_commands_in_a_kvm_guest(lab: Lab, enclave_image) -> None:
    boot = lab.boot(kvm_spec(lab, enclave_image, "kvm-agent"))
    assert boot.agent is not None
    cpuinfo = boot.agent.exec(["cat", "/proc/cpuinfo"], check=True).text
    assert "hypervisor" in cpuinfo
    data = os.urandom(4 * MIB)
    result = boot.agent.exec(["sha256sum"], stdin=data, timeout=30, check=True)
    assert result.text.split()[0] == hashlib.sha256(data).hexdigest()


def test_vsock_both_ways_with_a_kvm_guest(lab: Lab, enclave_image) -> None:
    name = f"kvm-vsock-{os.getpid()}"
    attachment = lab.vsock.attach(name, cid=16)
    spec = kvm_spec(
        lab,
        enclave_image,
        name,
        memory_mib=384,
        memory=MemoryBackendMemfd("ram0", 384, share=True),
        devices=attachment.devices,
    )
    boot = lab.boot(spec, closers=[lambda: lab.vsock.detach(name)])
    assert boot.agent is not None
    echo = boot.agent.start([*PEER, "echo", "--port", "5000"], timeout=120)
    sock = lab.vsock.connect(16, 5000, wait=60)
    data = os.urandom(MIB)
    sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
    sender.start()
    got = bytearray()
    while chunk := sock.recv(65536):
        got += chunk
    sender.join()
    assert got == data and echo.json()["peers"] == [2]
    with lab.vsock.listen(7000, vm=name) as listener:
        source = boot.agent.start(
            [*PEER, "source", "--cid", "2", "--port", "7000", "--bytes", str(MIB), "--hash"]
        )
        conn, cid = listener.accept(timeout=60)
        digest = hashlib.sha256()
        while chunk := conn.recv(1 << 16):
            digest.update(chunk)
        conn.sendall(b'{"ok": true}\n')
        conn.close()
    assert cid == 16 and source.json()["sha256"] == digest.hexdigest() == pattern_sha256(MIB)


def test_kvm_launch_and_stop_cycles_leave_no_qemu_behind(enclave_image) -> None:
    tag = f"kvm-leftover-{os.getpid()}"
    with Lab() as lab:
        for cycle in range(6):
            spec = kvm_spec(lab, enclave_image, f"{tag}-{cycle}", memory_mib=256)
            if cycle % 3 == 0:
                assert lab.boot(spec).machine.shutdown().stage == "powerdown"
            elif cycle % 3 == 1:
                assert lab.launch(spec).shutdown(powerdown_timeout=0).stage == "quit"
            else:
                machine = lab.launch(spec)
                os.kill(machine.pid, signal.SIGKILL)  # type: ignore[arg-type]
                assert machine.shutdown(powerdown_timeout=1).returncode == -signal.SIGKILL
    assert qemu_pids(tag) == set()
