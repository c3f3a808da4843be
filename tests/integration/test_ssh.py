"""SSH into a parent guest: a virtio-net NIC on QEMU's user network with a forwarded loopback port, dropbear
started through the agent, paramiko accepting only the host key the guest reported over its agent."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.attest import LAB, Policy, default_lab_dir
from harness.lab import GuestBoot, Lab
from harness.qemu.devices import VirtioNetUser
from harness.ssh import (
    GUEST_HOST_KEY,
    NIC_ID,
    GuestSsh,
    SshHostKeyChanged,
    SshHostKeyNotAttested,
    SshUnavailable,
    attested_host_key,
    client_key,
    free_port,
    host_key_from_line,
    start_sshd,
)

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def parent(parent_image, vm_backend: str) -> Iterator[tuple[Lab, GuestBoot]]:
    with Lab(backend=vm_backend) as lab:
        yield lab, lab.boot(lab.spec_for_image(parent_image, name="ssh-parent", ssh=True))


def test_exec_and_file_copy_over_ssh_with_the_pinned_key(parent, tmp_path: Path) -> None:
    lab, boot = parent
    ssh = lab.ssh(boot.machine)
    done = ssh.exec(["sh", "-c", "id -u; echo err >&2; exit 3"])
    assert (done.returncode, done.text, done.stderr) == (3, "0\n", b"err\n")
    payload = bytes(range(256)) * 4096
    (tmp_path / "up").write_bytes(payload)
    ssh.put(tmp_path / "up", "/tmp/copied")
    ssh.get("/tmp/copied", tmp_path / "down")
    assert (tmp_path / "down").read_bytes() == payload
    digest = boot.agent.exec(["sha256sum", "/tmp/copied"]).text.split()[0]  # the guest holds those bytes
    assert digest == hashlib.sha256(payload).hexdigest()
    assert lab.ssh(boot.machine) is ssh


def test_a_changed_host_key_is_refused_with_e641(parent) -> None:
    lab, boot = parent
    pinned = lab.ssh(boot.machine).host_key
    key, authorized = client_key()
    boot.agent.exec(
        ["sh", "-c", f"kill $(cat /run/teelab-ssh/dropbear.pid); rm {GUEST_HOST_KEY}"], check=True
    )
    new = start_sshd(boot.agent, authorized)  # a new host key, as a swapped machine would have
    assert new.asbytes() != pinned.asbytes()
    port = lab.ssh(boot.machine).host_port
    with pytest.raises(SshHostKeyChanged) as caught:
        GuestSsh(port, pinned, key).connect()
    assert caught.value.code == "E641" and caught.value.evidence["pinned"] == pinned.fingerprint
    session = GuestSsh(port, new, key).connect()  # the key the guest reports now is accepted
    assert session.exec("echo ok").text == "ok\n"
    session.close()


def test_enclaves_never_get_a_nic(enclave_image) -> None:
    with Lab() as lab, pytest.raises(SshUnavailable) as caught:
        lab.spec_for_image(enclave_image, ssh=True)
    assert caught.value.code == "E642"


def test_ssh_into_an_attested_cvm_pins_the_key_its_evidence_binds(cvm_image) -> None:
    with Lab() as lab:
        plan = lab.plan_cvm(cvm_image, name="ssh-cvm", vcpus=1, devices=(VirtioNetUser(NIC_ID, free_port()),))
        boot = lab.boot_planned(plan)
        measurement = plan.measurement_hex()
        assert measurement is not None
        policy = Policy(roots=(LAB,), measurement=bytes.fromhex(measurement), lab_dir=default_lab_dir())
        ssh = lab.ssh(boot.machine, policy)
        assert ssh.exec("cat /proc/cmdline").text.strip().endswith("teelab.role=cvm")
        assert ssh.host_key.asbytes() == start_sshd_key(boot)
        wrong = Policy(roots=(LAB,), measurement=bytes(48), lab_dir=default_lab_dir())
        with pytest.raises(SshHostKeyNotAttested) as caught:
            attested_host_key(boot.agent, wrong)  # another boot's measurement: the key is not pinned
        assert caught.value.code == "E643" and "measurement" in " ".join(caught.value.evidence["reasons"])


def start_sshd_key(boot: GuestBoot) -> bytes:
    """The host key as dropbear serves it (read over the agent), for comparison."""
    line = boot.agent.exec(["dropbearkey", "-y", "-f", GUEST_HOST_KEY], check=True).text
    return host_key_from_line(next(w for w in line.splitlines() if w.startswith("ssh-ed25519 "))).asbytes()
