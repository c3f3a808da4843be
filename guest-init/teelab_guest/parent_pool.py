"""Role parent: the pool service. It takes the host's orders to offline and online the pool's vCPUs (the
guest's side of a carve), says what the parent has (online CPUs, MemTotal), and catches the enclaves'
heartbeats on port 9000 so the host learns when an enclave is up. Only the host (CID 2) may give orders."""

from __future__ import annotations

import os
import socket
import threading
import time

from teelab_guest import pool_wire

SYS_CPU = "/sys/devices/system/cpu"


class Heartbeats:
    """CIDs whose heartbeat came, and waiters for the ones still due."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._changed = threading.Condition()

    def arm(self, cid: int) -> None:
        with self._changed:
            self._seen.discard(cid)

    def beat(self, cid: int) -> None:
        with self._changed:
            self._seen.add(cid)
            self._changed.notify_all()

    def wait(self, cid: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: cid in self._seen, timeout)


def set_online(cpu: int, online: bool, timeout: float = 10.0) -> None:
    """Write the CPU's online file (waiting for a hot-added CPU's folder to appear)."""
    path = f"{SYS_CPU}/cpu{int(cpu)}/online"
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise FileNotFoundError(path)
        time.sleep(0.05)
    with open(path) as current:
        if current.read().strip() == ("1" if online else "0"):
            return
    with open(path, "w") as knob:
        knob.write("1" if online else "0")


def status() -> dict[str, object]:
    with open(f"{SYS_CPU}/online") as online, open("/proc/meminfo") as meminfo:
        cpus = online.read().strip()
        total = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    return {"online": cpus, "mem_total_kib": total}


def serve_heartbeats(beats: Heartbeats, port: int = pool_wire.HEARTBEAT_PORT) -> None:
    listener = _listen(port)
    while True:
        conn, (cid, _port) = listener.accept()
        with conn:
            conn.settimeout(5)
            try:
                if conn.recv(1) == pool_wire.HEARTBEAT:
                    conn.sendall(pool_wire.HEARTBEAT)
                    beats.beat(cid)
            except OSError:
                continue


def serve_orders(beats: Heartbeats, port: int = pool_wire.POOL_PORT) -> None:
    listener = _listen(port)
    while True:
        conn, (cid, _port) = listener.accept()
        if cid != pool_wire.HOST_CID:  # an enclave or a sibling: never
            conn.close()
            continue
        threading.Thread(target=_order_session, args=(conn, beats), daemon=True).start()


def _order_session(conn: socket.socket, beats: Heartbeats) -> None:
    with conn:
        while True:
            try:
                order = pool_wire.read_frame(conn)
            except (ValueError, OSError):
                return
            try:
                conn.sendall(pool_wire.encode(_obey(order, beats, conn)))
            except OSError:
                return


def _obey(order: dict[str, object], beats: Heartbeats, conn: socket.socket) -> dict[str, object]:
    op = order.get("op")
    try:
        if op in ("offline", "online"):
            for cpu in order.get("cpus", []):  # type: ignore[attr-defined]
                set_online(int(cpu), op == "online")
            return {"ok": True, **status()}
        if op == "status":
            return {"ok": True, **status()}
        if op == "heartbeat":
            cid = int(order["cid"])  # type: ignore[call-overload]
            beats.arm(cid)
            conn.sendall(pool_wire.encode({"ok": True, "armed": True}))
            arrived = beats.wait(cid, float(order.get("timeout", 120)))  # type: ignore[arg-type]
            return {"ok": arrived, "cid": cid} if arrived else {"ok": False, "error": "no heartbeat"}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {"ok": False, "error": f"{op}: {exc}"}
    return {"ok": False, "error": f"unknown op {op!r}"}


def _listen(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen(16)
    return listener


COMMAND = "/usr/bin/teelab-enclave"
COMMAND_SCRIPT = '#!/bin/sh\nexec python3 -m teelab_guest.teelab_enclave "$@"\n'


def start() -> None:
    """Serve heartbeats and the host's orders in threads (nothing when the guest has no vsock); install
    the ``teelab-enclave`` command."""
    if not os.path.exists("/dev/vsock"):
        return
    try:
        with open(COMMAND, "x") as script:
            script.write(COMMAND_SCRIPT)
        os.chmod(COMMAND, 0o755)
    except OSError:
        pass  # there already, or a read-only root
    beats = Heartbeats()
    for target in (serve_heartbeats, serve_orders):
        threading.Thread(target=target, args=(beats,), name=target.__name__, daemon=True).start()


def send_heartbeat(timeout: float = 30.0) -> bool:
    """The enclave's side: 0xB7 to the parent's port 9000, retried until the parent echoes it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect((pool_wire.PARENT_CID, pool_wire.HEARTBEAT_PORT))
                sock.sendall(pool_wire.HEARTBEAT)
                if sock.recv(1) == pool_wire.HEARTBEAT:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False
