"""The KMS under hostile load: half-open connections meet a deadline and a cap; honest clients finish."""

from __future__ import annotations

import http.client
import json
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.bench.kms import PARTIAL_HEAD, bench_kms_hostile
from harness.kms import KmsServer, Listen
from harness.kms.admission import Limits


def address(server: KmsServer) -> tuple[str, int]:
    host, port = server.endpoint.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def half_open(server: KmsServer, head: bytes = PARTIAL_HEAD) -> socket.socket:
    sock = socket.create_connection(address(server))
    sock.sendall(head)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` without answering."""
    sock.settimeout(seconds)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False


@pytest.fixture
def kms(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[KmsServer]:
    with KmsServer.start(tmp_path / "kms", Listen(limits=request.param)) as server:
        yield server


def anonymous_request(conn: http.client.HTTPConnection) -> int:
    """A complete request (refused: anonymous GenerateRandom) on a keep-alive connection; its status."""
    conn.request(
        "POST",
        "/",
        body=b"{}",
        headers={"X-Amz-Target": "TrentService.GenerateRandom", "Content-Type": "application/x-amz-json-1.1"},
    )
    response = conn.getresponse()
    response.read()
    return response.status


@pytest.mark.parametrize("kms", [Limits(request_timeout=0.5)], indirect=True)
def test_a_partial_request_head_is_closed_at_the_deadline(kms: KmsServer) -> None:
    started = time.monotonic()
    assert closed_within(half_open(kms), 5)
    assert time.monotonic() - started < 3
    assert kms.admission is not None and kms.admission.counts["timed_out"] >= 1


@pytest.mark.parametrize("kms", [Limits(request_timeout=0.5)], indirect=True)
def test_a_body_that_trickles_in_is_closed_at_the_deadline(kms: KmsServer) -> None:
    head = (
        b"POST / HTTP/1.1\r\nHost: kms\r\nX-Amz-Target: TrentService.GenerateRandom\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    sock = half_open(kms, head)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and still_open(sock):
        sock.setblocking(True)
        try:
            sock.sendall(b" ")  # one byte every 0.1 s keeps aiohttp's own timers quiet
        except OSError:
            break
        time.sleep(0.1)
    assert not still_open(sock)


@pytest.mark.parametrize("kms", [Limits()], indirect=True)
def test_a_head_that_never_ends_is_closed_once_too_large(kms: KmsServer) -> None:
    sock = half_open(kms, b"POST / HTTP/1.1\r\nX-Filler: " + b"a" * 20000)
    assert closed_within(sock, 5)
    assert kms.admission is not None and kms.admission.counts["head_too_large"] == 1


@pytest.mark.parametrize(
    "kms", [Limits(max_connections=3, request_timeout=30, eviction_grace=1.0)], indirect=True
)
def test_at_the_cap_connections_that_never_sent_a_request_go_first_then_503(kms: KmsServer) -> None:
    assert kms.admission is not None
    keep_alive = http.client.HTTPConnection(*address(kms), timeout=5)
    assert anonymous_request(keep_alive) == 400  # delivered a request: an idle keep-alive connection now
    first, second = half_open(kms), half_open(kms)
    time.sleep(1.2)  # past the eviction grace
    third = half_open(kms)  # takes the place of the oldest that never sent a request
    assert closed_within(first, 2)
    fourth = half_open(kms)
    assert closed_within(second, 2)
    assert anonymous_request(keep_alive) == 400  # the older keep-alive connection was kept
    # third and fourth are within their grace, keep_alive has just been answered: nobody can go
    refused = socket.create_connection(address(kms))
    refused.settimeout(5)
    answer = refused.recv(4096)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["__type"] == "ServiceUnavailableException"
    assert still_open(third) and still_open(fourth)
    assert len(kms.admission.by_handler) == 1  # half-open connections got no aiohttp handler
    assert kms.admission.stats() == {
        "open": 3,
        "peak": 3,
        "cap": 3,
        "evicted": 2,
        "refused": 1,
    }


def test_the_server_raises_its_descriptor_limit(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip("the hard descriptor limit leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        with KmsServer.start(tmp_path / "kms"):
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 1024
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_honest_clients_finish_every_request_beside_a_thousand_half_open_connections() -> None:
    """The KMS subprocess starts with the usual soft limit of 1,024 descriptors: too few for the attack."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, soft), hard))
    try:
        calm, attacked = bench_kms_hostile(
            mode="decrypt", clients=100, attackers=1000, rate=100, seconds=3, rounds=1
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for result in (calm, attacked):
        assert result.errors == 0 and len(result.samples) == 300
    assert attacked.extra["attacker"]["opened"] >= 1000
