"""Confidential VMs through the Lab: TEE and vsock attached, the host's vsock-proxy, and cleanup."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator

import pytest

from harness.lab import Lab
from harness.vsock.errors import ProxyTargetRefused

pytestmark = pytest.mark.vm

GUEST_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.connect((2, int(sys.argv[1])))
s.sendall(b"ping from the cvm")
s.shutdown(socket.SHUT_WR)
print(s.recv(100).decode())
"""


class Upper(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read().upper())


@pytest.fixture
def tcp_upper() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Upper)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address  # type: ignore[misc]
    server.shutdown()
    server.server_close()


def test_a_cvm_reaches_a_host_service_through_the_vsock_proxy(cvm_image, tcp_upper, vm_backend: str) -> None:
    with Lab(backend=vm_backend) as lab:
        boot = lab.boot_cvm(cvm_image, name="cvm-proxy", vcpus=1)
        assert boot.role == "cvm"
        runtime = lab.vsock.runtime_dir
        with lab.vsock_proxy(7001, tcp_upper) as proxy:
            out = boot.agent.exec(["python3", "-c", GUEST_CONNECT, "7001"], check=True, timeout=60)
            assert out.text.strip() == "PING FROM THE CVM"
            assert proxy.forwarded == 1
            refused = boot.agent.exec(["python3", "-c", GUEST_CONNECT, "7002"], timeout=60)
            assert refused.returncode != 0 and b"ConnectionResetError" in refused.stderr
        lab.stop(boot.machine)
        assert "cvm-proxy" not in lab.vsock.attachments
    assert not runtime.exists(), "the lab's vsock sockets outlived it"


def test_the_proxy_refuses_a_target_off_its_allowlist() -> None:
    with Lab() as lab:
        vsock = lab.vsock.attach("proxy-check")  # a VM the listener would open a socket for
        with (
            pytest.raises(ProxyTargetRefused) as refused,
            lab.vsock_proxy(7003, ("127.0.0.1", 9), [("127.0.0.1", 8000)]),
        ):
            pass
        assert refused.value.code.startswith("E7")
        assert vsock.uds is not None and not list(vsock.uds.parent.glob("*_7003")), (
            "the listener outlived the refusal"
        )


def test_plan_cvm_carries_the_measurement_its_evidence_will_have(cvm_image) -> None:
    with Lab() as lab:
        one = lab.plan_cvm(cvm_image, name="plan-a")
        other = lab.plan_cvm(cvm_image, name="plan-b", cmdline_extra="x=1")
        assert one.measurement_hex() and len(one.measurement_hex()) == 96
        assert one.measurement_hex() != other.measurement_hex()
        assert any(d.qemu_type == "vhost-user-vsock-pci" for d in one.spec.devices)
        assert one.spec.memory is not None and one.spec.memory.shared
