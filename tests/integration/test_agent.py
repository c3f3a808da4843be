"""The guest agent: commands run inside a booted guest, with their status, output, timeouts and errors."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import time

import pytest

from harness.agent import AgentError, AgentTimeout, GuestCommandFailed
from harness.lab import GuestBoot, Lab

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def guest(enclave_image, vm_backend: str) -> GuestBoot:
    with Lab(backend=vm_backend) as lab:
        yield lab.boot(lab.spec_for_image(enclave_image, name="agent"))


def test_exec_returns_status_stdout_and_stderr(guest: GuestBoot) -> None:
    result = guest.agent.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (result.returncode, result.stdout, result.stderr) == (7, b"out\n", b"err\n")


def test_stdin_and_env_reach_the_command(guest: GuestBoot) -> None:
    result = guest.agent.exec(["sh", "-c", 'tr a-z A-Z; echo "$GREETING"'], stdin=b"hello\n",
                              env={"GREETING": "hi"})  # fmt: skip
    assert result.stdout == b"HELLO\nhi\n"


def test_a_large_stdin_arrives_whole_and_in_time(guest: GuestBoot) -> None:
    data = os.urandom(24 << 20)  # a 32 MiB request line once in base64
    started = time.monotonic()
    result = guest.agent.exec(["sha256sum"], stdin=data, timeout=60, check=True)
    assert result.text.split()[0] == hashlib.sha256(data).hexdigest()
    assert time.monotonic() - started < 30


def test_guest_python_has_its_libraries_and_guest_init(guest: GuestBoot) -> None:
    code = (
        "import cryptography, cbor2, asn1crypto, teelab_guest.protocol as p\n"
        "print(cryptography.__version__, p.AGENT_PORT)"
    )
    assert guest.agent.python(code).text.split() == ["38.0.4", "org.teelab.agent.0"]


def test_guest_init_loaded_the_vsock_and_virtio_modules(guest: GuestBoot) -> None:
    modules = guest.agent.exec(["cat", "/proc/modules"], check=True).text
    for name in ("vmw_vsock_virtio_transport", "virtio_console", "virtio_pci", "button"):
        assert f"{name} " in modules
    assert guest.agent.exec(["ls", "/dev/virtio-ports"], check=True).text.split() == ["org.teelab.agent.0"]


def test_many_commands_run_at_once(guest: GuestBoot) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: guest.agent.exec(["echo", str(i)]), range(16)))
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(16)]


def test_failures_are_coded_errors(guest: GuestBoot) -> None:
    with pytest.raises(GuestCommandFailed) as failed:
        guest.agent.exec(["false"], check=True)
    assert failed.value.code == "E602" and failed.value.evidence["returncode"] == 1
    with pytest.raises(AgentTimeout) as slow:
        guest.agent.exec(["sleep", "5"], timeout=0.5)
    assert slow.value.code == "E601"
    with pytest.raises(AgentError, match="cannot run"):
        guest.agent.exec(["/no/such/program"])
    assert guest.agent.ping() > 0  # still serving after all that


def test_poweroff_through_the_agent_ends_the_machine(lab: Lab, enclave_image) -> None:
    boot = lab.boot(lab.spec_for_image(enclave_image, name="agent-off"))
    boot.agent.poweroff()
    assert boot.machine.wait_for_console("TEELAB-POWEROFF", timeout=20)
    info = boot.machine.shutdown(powerdown_timeout=10)
    assert info.returncode == 0 and info.stage in ("exited", "powerdown")


def test_a_background_job_runs_while_the_host_works_and_reports_its_result(guest: GuestBoot) -> None:
    job = guest.agent.start(["sh", "-c", 'read line; echo "{\\"got\\": \\"$line\\"}"'], stdin=b"hello\n")
    assert job.json(timeout=60) == {"got": "hello"}
    failing = guest.agent.start(["false"])
    with pytest.raises(GuestCommandFailed):
        failing.result(timeout=60)
