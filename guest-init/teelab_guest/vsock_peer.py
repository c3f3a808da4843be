"""Guest-side peers for vsock tests and benchmarks: echo, sink, source, two-way exchange, ping-pong, and the
same bulk transfer over a virtio-serial port as a baseline. Each prints one JSON line of results.

    python3 -m teelab_guest.vsock_peer echo --port 5000 --connections 64
    python3 -m teelab_guest.vsock_peer source --cid 2 --port 7000 --bytes 67108864

The data generator and the result format are shared with the harness (stdlib only), so both ends agree.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import sys
import threading
import time

CHUNK = 64 * 1024
SEED = b"teelab vsock"


class Pattern:
    """Reproducible bulk data: 64 KiB blocks, each distinct (a counter in its first 8 bytes)."""

    def __init__(self, seed: bytes = SEED) -> None:
        self.block = bytearray(hashlib.sha256(seed).digest() * (CHUNK // 32))
        self.view = memoryview(self.block)

    def send(self, write, total: int, digest=None) -> None:
        """Call ``write(view)`` with ``total`` bytes of the pattern, block by block."""
        index = 0
        left = total
        while left > 0:
            self.block[:8] = index.to_bytes(8, "little")
            n = min(CHUNK, left)
            part = self.view[:n]
            if digest is not None:
                digest.update(part)
            write(part)
            left -= n
            index += 1


def pattern_sha256(total: int, seed: bytes = SEED) -> str:
    digest = hashlib.sha256()
    Pattern(seed).send(lambda _part: None, total, digest)
    return digest.hexdigest()


def _emit(result: dict) -> None:
    print(json.dumps(result, sort_keys=True), flush=True)


def _vsock() -> socket.socket:
    return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)


def _listen(port: int, backlog: int = 128) -> socket.socket:
    sock = _vsock()
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(backlog)
    return sock


def connect(cid: int, port: int, wait: float = 30.0) -> socket.socket:
    """Connect, retrying while the peer is not listening yet (a reset), for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        sock = _vsock()
        try:
            sock.connect((cid, port))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ECONNRESET, errno.ECONNREFUSED) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def drain(sock: socket.socket, digest=None, limit: int | None = None) -> tuple[int, float]:
    """Read to EOF (or ``limit`` bytes); returns (bytes, seconds from the first byte to the last)."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    first = None
    while limit is None or total < limit:
        n = sock.recv_into(buf)
        if not n:
            break
        if first is None:
            first = time.monotonic()
        total += n
        if digest is not None:
            digest.update(view[:n])
    return total, (time.monotonic() - first) if first else 0.0


def round_trips(sock: socket.socket, message: bytes, count: int) -> list[float]:
    """Send ``message`` to an echo peer and read it back, ``count`` times; each round trip in ms."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        sock.sendall(message)
        got = 0
        while got < len(message):
            part = sock.recv(len(message) - got)
            if not part:
                raise ConnectionError(f"the echo peer closed after {len(samples)} round trips")
            got += len(part)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


# -- commands -------------------------------------------------------------------------------------
def cmd_echo(args) -> dict:
    """Echo every connection; end after ``connections`` of them have closed."""
    listener = _listen(args.port)
    done = threading.Semaphore(0)

    def serve(conn: socket.socket) -> None:
        try:
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()
            done.release()

    peers = set()
    for _ in range(args.connections):
        conn, addr = listener.accept()
        peers.add(addr[0])
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    for _ in range(args.connections):
        done.acquire()
    return {"connections": args.connections, "peers": sorted(peers)}


def cmd_sink(args) -> dict:
    """Accept one connection, read it to EOF, answer with what was received."""
    listener = _listen(args.port)
    conn, addr = listener.accept()
    digest = hashlib.sha256() if args.hash else None
    total, seconds = drain(conn, digest)
    result = {"bytes": total, "seconds": seconds, "peer": addr[0]}
    if digest is not None:
        result["sha256"] = digest.hexdigest()
    conn.sendall(json.dumps(result).encode() + b"\n")
    conn.close()
    return result


def cmd_source(args) -> dict:
    """Send ``bytes`` of the pattern, half-close, and report the sink's answer."""
    sock = connect(args.cid, args.port, args.wait)
    digest = hashlib.sha256() if args.hash else None
    started = time.monotonic()
    Pattern().send(sock.sendall, args.bytes, digest)
    sock.shutdown(socket.SHUT_WR)
    sent = time.monotonic() - started
    reply = b""
    while not reply.endswith(b"\n"):
        part = sock.recv(4096)
        if not part:
            break
        reply += part
    sock.close()
    result = {"bytes": args.bytes, "seconds": sent, "peer_result": json.loads(reply) if reply else None}
    if digest is not None:
        result["sha256"] = digest.hexdigest()
    return result


def cmd_exchange(args) -> dict:
    """Send ``bytes`` and receive the peer's stream at the same time; hash both directions."""
    if args.listen is not None:
        listener = _listen(args.listen)
        sock, _ = listener.accept()
    else:
        sock = connect(args.cid, args.port, args.wait)
    sent = hashlib.sha256()
    received = hashlib.sha256()
    started = time.monotonic()

    def send() -> None:
        Pattern(args.seed.encode()).send(sock.sendall, args.bytes, sent)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    total, _ = drain(sock, received)
    sender.join()
    sock.close()
    return {
        "sent_bytes": args.bytes,
        "sent_sha256": sent.hexdigest(),
        "received_bytes": total,
        "received_sha256": received.hexdigest(),
        "seconds": time.monotonic() - started,
    }


def cmd_pingpong(args) -> dict:
    """Round trips of ``size`` bytes to an echo peer; latencies in milliseconds."""
    sock = connect(args.cid, args.port, args.wait)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, args.size)
    samples = sorted(round_trips(sock, b"p" * args.size, args.count))
    sock.close()
    return {
        "count": args.count,
        "p50_ms": samples[len(samples) // 2],
        "p99_ms": samples[min(len(samples) - 1, int(0.99 * len(samples)))],
        "samples_ms": samples,
    }


def cmd_refused(args) -> dict:
    """Connect to a port nobody listens on: how it fails and how fast."""
    sock = _vsock()
    sock.settimeout(args.timeout)
    started = time.monotonic()
    try:
        sock.connect((args.cid, args.port))
        outcome = "connected"
    except TimeoutError:
        outcome = "timeout"
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    sock.close()
    return {"outcome": outcome, "seconds": time.monotonic() - started}


def cmd_serial_source(args) -> dict:
    """Write ``bytes`` of the pattern to /dev/virtio-ports/<name> (the virtio-serial baseline)."""
    fd = os.open(f"/dev/virtio-ports/{args.name}", os.O_WRONLY)
    started = time.monotonic()

    def write(part) -> None:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]

    Pattern().send(write, args.bytes)
    os.close(fd)
    return {"bytes": args.bytes, "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="vsock_peer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("echo")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=1)
    p.set_defaults(func=cmd_echo)
    p = sub.add_parser("sink")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--hash", action="store_true")
    p.set_defaults(func=cmd_sink)
    for name, func in (("source", cmd_source), ("pingpong", cmd_pingpong)):
        p = sub.add_parser(name)
        p.add_argument("--cid", type=int, required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--wait", type=float, default=30.0, help="seconds to retry while the peer is not up")
        p.set_defaults(func=func)
    sub.choices["source"].add_argument("--bytes", type=int, required=True)
    sub.choices["source"].add_argument("--hash", action="store_true")
    sub.choices["pingpong"].add_argument("--count", type=int, default=200)
    sub.choices["pingpong"].add_argument("--size", type=int, default=64)
    p = sub.add_parser("exchange")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--listen", type=int, metavar="PORT")
    group.add_argument("--cid", type=int)
    p.add_argument("--port", type=int)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--seed", default=SEED.decode())
    p.add_argument("--wait", type=float, default=30.0)
    p.set_defaults(func=cmd_exchange)
    p = sub.add_parser("refused")
    p.add_argument("--cid", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_refused)
    p = sub.add_parser("serial-source")
    p.add_argument("--name", required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.set_defaults(func=cmd_serial_source)
    args = parser.parse_args(argv)
    _emit(args.func(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
