"""The guest's vsock peers' shared pieces, which the bench uses on the host side too: draining a stream and
timing round trips to an echo peer."""

from __future__ import annotations

import hashlib
import socket
import threading

import pytest
from teelab_guest.vsock_peer import Pattern, drain, pattern_sha256, round_trips


def test_drain_reads_to_eof_and_hashes_what_it_read() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        Pattern().send(theirs.sendall, 200_000)
        theirs.shutdown(socket.SHUT_WR)
        digest = hashlib.sha256()
        total, seconds = drain(ours, digest)
    assert total == 200_000 and seconds >= 0 and digest.hexdigest() == pattern_sha256(200_000)


def test_drain_stops_at_its_limit_on_a_stream_that_stays_open() -> None:
    ours, theirs = socket.socketpair()  # a virtio-serial port never ends its stream
    with ours, theirs:
        theirs.sendall(b"x" * 5000)
        assert drain(ours, limit=5000)[0] == 5000


def test_round_trips_time_each_echo() -> None:
    ours, theirs = socket.socketpair()

    def echo() -> None:
        while data := theirs.recv(64):
            theirs.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    with ours, theirs:
        samples = round_trips(ours, b"r" * 64, 20)
        ours.shutdown(socket.SHUT_WR)
        thread.join(5)
    assert len(samples) == 20 and all(ms >= 0 for ms in samples)


def test_round_trips_stop_when_the_echo_peer_closes() -> None:
    ours, theirs = socket.socketpair()

    def echo_twice_then_close() -> None:
        for _ in range(2):
            theirs.sendall(theirs.recv(3))
        theirs.close()

    thread = threading.Thread(target=echo_twice_then_close, daemon=True)
    thread.start()
    with ours, pytest.raises(ConnectionError):  # EOF (or a broken pipe), where it used to spin on b""
        round_trips(ours, b"abc", 5)
    thread.join(5)
