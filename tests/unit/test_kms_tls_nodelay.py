"""Kept KMS connections are not stalled by Nagle's algorithm: http.client writes a request's head and body
apart, and without TCP_NODELAY the body waits for the server's delayed ACK of the head (40 ms on Linux), on
the client's own TCP socket and on the vsock-proxy's socket to the KMS alike."""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from teelab_guest import vsock_proxy
from teelab_guest.kms_client import KmsClient, Transport, pinned_context

from harness.kms import KmsServer, Listen
from harness.kms.tls import ca_certificate_pem, ca_pin


@pytest.fixture(scope="module", params=["plain", "tls"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsServer]:
    listen = Listen(tls=request.param == "tls")
    with KmsServer.start(tmp_path_factory.mktemp(request.param), listen) as kms:
        yield kms


def signed_client(server: KmsServer) -> KmsClient:
    creds = server.credentials("nodelay")
    tls = None
    if server.endpoint.startswith("https://"):
        tls = pinned_context(ca_certificate_pem(server.kms_dir), ca_pin(server.kms_dir))
    transport = Transport.endpoint(server.endpoint, tls=tls)
    return KmsClient(transport, access_key=creds.access_key, secret=creds.secret)


def test_the_client_sets_tcp_nodelay(server: KmsServer) -> None:
    with signed_client(server) as client:
        client.generate_random(8)
        sock = client._conn.sock  # type: ignore[union-attr]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_round_trips_on_a_kept_connection_are_not_held_for_a_delayed_ack(server: KmsServer) -> None:
    with signed_client(server) as client:
        key = server.create_key(None)
        blob = client.encrypt(key.id, b"secret")
        times = []
        for _ in range(12):
            started = time.perf_counter()
            client.decrypt(blob)
            times.append(time.perf_counter() - started)
    assert statistics.median(times) < 0.030, times  # a Nagle stall is 40 ms each


def test_the_vsock_proxy_relays_to_the_kms_without_nagle() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        upstream = vsock_proxy.connect(["127.0.0.1"], listener.getsockname()[1], timeout=5)
        with upstream:
            assert upstream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


class CountingSocket(socket.socket):
    """A real TCP socket that counts the writes made on it."""

    writes = 0

    def sendall(self, data: Any, flags: int = 0) -> None:
        self.writes += 1
        super().sendall(data, flags)


def test_a_request_goes_out_in_one_write(tmp_path: Path) -> None:
    server = KmsServer.start(tmp_path / "kms", Listen())
    port = int(server.endpoint.rsplit(":", 1)[1])
    sockets: list[CountingSocket] = []

    def connect() -> socket.socket:
        sock = CountingSocket(socket.AF_INET, socket.SOCK_STREAM)
        sock.connect(("127.0.0.1", port))
        sockets.append(sock)
        return sock

    creds = server.credentials("writes")
    with server, KmsClient(Transport(connect), access_key=creds.access_key, secret=creds.secret) as client:
        client.generate_random(8)
        client.generate_random(8)
    assert [s.writes for s in sockets] == [2]  # one connection, one write per request
