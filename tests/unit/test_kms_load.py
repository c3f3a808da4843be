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
from harness.kms.admission import FD_RESERVE, Limits, connection_cap


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


TRICKLED = {
    "declared length": b"Content-Length: 100\r\n\r\n{",
    "chunked": b"Transfer-Encoding: chunked\r\n\r\n64\r\n{",
}


@pytest.mark.parametrize("kms", [Limits(request_timeout=0.5)], indirect=True)
@pytest.mark.parametrize("framing", TRICKLED, ids=list(TRICKLED))
def test_a_body_that_trickles_in_is_closed_at_the_deadline(kms: KmsServer, framing: str) -> None:
    head = b"POST / HTTP/1.1\r\nHost: kms\r\nX-Amz-Target: TrentService.GenerateRandom\r\n"
    sock = half_open(kms, head + TRICKLED[framing])
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
    "kms", [Limits(max_connections=4, request_timeout=30, eviction_grace=1.0)], indirect=True
)
def test_half_open_connections_churn_their_own_pool_and_a_full_delivered_pool_answers_503(
    kms: KmsServer,
) -> None:
    """Cap 4: two fresh places (no whole head yet), two delivered ones."""
    assert kms.admission is not None
    keep_alive = http.client.HTTPConnection(*address(kms), timeout=5)
    assert anonymous_request(keep_alive) == 400  # delivered, now idle
    first, second = half_open(kms), half_open(kms)
    third = half_open(kms)  # the fresh pool is full: the oldest fresh one goes, whatever its age
    assert closed_within(first, 2)
    newcomer = http.client.HTTPConnection(*address(kms), timeout=5)
    assert anonymous_request(newcomer) == 400  # pushed second out, delivered its request
    assert closed_within(second, 2)
    assert len(kms.admission.by_handler) == 2  # the half-open connections got no aiohttp handler
    # the delivered pool is full, both within their grace: a whole request is answered 503
    refused = socket.create_connection(address(kms))
    refused.sendall(b"POST / HTTP/1.1\r\nHost: kms\r\nContent-Length: 0\r\n\r\n")
    refused.settimeout(5)
    answer = refused.recv(4096)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["__type"] == "ServiceUnavailableException"
    time.sleep(1.2)  # past the grace, the oldest idle one makes room
    late = http.client.HTTPConnection(*address(kms), timeout=5)
    assert anonymous_request(late) == 400
    assert anonymous_request(newcomer) == 400  # the younger idle connection was kept
    assert closed_within(keep_alive.sock, 2)
    assert still_open(third)
    assert kms.admission.stats() == {
        "fresh": 1,
        "delivered": 2,
        "peak": 4,
        "cap": 4,
        "evicted_fresh": 2,
        "evicted_idle": 1,
        "refused": 1,
    }


def test_the_cap_leaves_descriptors_for_the_store_when_the_limit_is_low() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        assert connection_cap(Limits()) == 512 - FD_RESERVE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


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
    if hard != resource.RLIM_INFINITY and hard < 2 * 1100 + FD_RESERVE:
        pytest.skip("the hard descriptor limit leaves no room for a fresh pool above 1,100 connections")
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
