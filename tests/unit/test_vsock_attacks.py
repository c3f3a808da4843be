"""The switch in its own process, as ``teelab vsock serve`` runs it, under each attack of the vsock review,
one after the other in one run: a hostile guest or front end in one group, an honest pair of VMs in another.

Bar, per attack: the switch's own memory (resident, less the guest RAM it maps) stays within twice its idle
figure plus the caps the attack runs into, and the honest pair's transfer time within three times its idle
time. The figures are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.vsock import device, hybrid, vhost_user
from harness.vsock.device import TX_QUEUE
from harness.vsock.fake_guest import FakeFront, FakeGuest, GuestConn, GuestPump
from harness.vsock.hybrid import listener_path
from harness.vsock.packet import HEADER, OP_REQUEST, TYPE_STREAM, Header

MIB = 1 << 20
HONEST_BYTES = 16 * MIB
FD_LIMIT = 1024  # the switch's descriptor limit, soft and hard, as on a host that cannot raise it
# name: (cid, group, RAM in KiB); x1 has honest1's CID in another group
VMS = {
    "honest1": (3, "honest", 4096),
    "honest2": (4, "honest", 4096),
    "x1": (3, "hostile", 16384),
    "x2": (5, "hostile", 4096),
    "x3": (6, "hostile", 4096),
    "x4": (8, "hostile", 4096),
    "x5": (10, "hostile", 4096),
    "front": (7, "fronts", 1024),  # front ends that misbehave
    "late": (9, "late", 1024),  # a VM set up while an attack goes on
}


def own_memory(pid: int) -> int:
    """Resident bytes of ``pid`` less the shared memory it maps (the guests' RAM)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return sum(fields.values())


@dataclass
class Vm:
    name: str
    guest: FakeGuest
    front: FakeFront
    pump: GuestPump
    vhost: Path
    uds: Path


@dataclass
class Run:
    """The switch process, its VMs, and the honest pair's connection."""

    process: subprocess.Popen[str]
    dir: Path
    vms: dict[str, Vm] = field(default_factory=dict)
    honest: GuestConn | None = None
    received: list[int] = field(default_factory=lambda: [0])
    figures: list[str] = field(default_factory=list)

    def honest_time(self, tries: int = 3) -> float:
        """The best of ``tries`` transfers of HONEST_BYTES from honest1 to honest2."""
        sender = self.vms["honest1"]
        best = float("inf")
        for _ in range(tries):
            want = self.received[0] + HONEST_BYTES
            started = time.monotonic()
            with sender.pump.lock:
                sender.guest.write(self.honest, bytes(HONEST_BYTES))  # type: ignore[arg-type]
            self.vms["honest2"].pump.wait(lambda want=want: self.received[0] >= want, timeout=60)
            best = min(best, time.monotonic() - started)
        return best

    def alive(self) -> bool:
        return self.process.poll() is None


def _sink(received: list[int]) -> Callable[[FakeGuest], None]:
    def sink(guest: FakeGuest) -> None:
        for conn in guest.accepted:
            received[0] += len(guest.read(conn))

    return sink


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    folder = tmp_path_factory.mktemp("attacks")
    specs = []
    for name, (cid, group, _) in VMS.items():
        specs += ["--vm", f"guest-cid={cid},socket={folder}/{name}.vhost,uds-path={folder}/{name}.vsock,"
                  f"groups={group},name={name}"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "vsock", "serve", *specs],
        stdout=subprocess.PIPE,
        stderr=(folder / "switch.log").open("w"),
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT)),
    )
    r = Run(process, folder)
    try:
        assert process.stdout is not None and "serving" in process.stdout.readline()
        for name, (cid, _, ram_kib) in VMS.items():
            if name in ("front", "late"):
                continue
            guest = FakeGuest(cid, memfd=True, ram_kib=ram_kib, queue_size=256 if name == "x1" else 128)
            front = FakeFront(guest, str(folder / f"{name}.vhost"))
            front.start()
            r.vms[name] = Vm(
                name, guest, front, GuestPump(guest), folder / f"{name}.vhost", folder / f"{name}.vsock"
            )
        receiver = r.vms["honest2"]
        with receiver.pump.lock:
            receiver.guest.listen(9000)
        receiver.pump.behaviours.append(_sink(r.received))
        with r.vms["honest1"].pump.lock:
            r.honest = r.vms["honest1"].guest.connect(4, 9000)
        r.vms["honest1"].pump.wait(lambda: r.honest.state == "established")  # type: ignore[union-attr]
        yield r
    finally:
        for vm in r.vms.values():
            vm.pump.stop()
        process.terminate()
        process.wait(10)
        for vm in r.vms.values():
            vm.front.close()
            vm.guest.close_ram()
        print("\n".join(["", "vsock switch under attack:", *r.figures]))


@pytest.fixture(scope="module")
def idle(run: Run) -> tuple[float, int]:
    """The honest pair's transfer time and the switch's own memory before any attack."""
    run.honest_time(tries=1)  # warm up: the switch maps and touches the pair's rings and buffers
    seconds = run.honest_time(tries=3)
    memory = own_memory(run.process.pid)
    run.figures.append(
        f"  idle: honest pair {seconds:.3f} s for {HONEST_BYTES // MIB} MiB, switch {memory / MIB:.1f} MiB"
    )
    return seconds, memory


class Peak:
    """Samples the switch's own memory in the background; ``peak`` is the largest figure."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = own_memory(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, own_memory(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@contextlib.contextmanager
def attack(run: Run, idle: tuple[float, int], name: str, caps: int) -> Iterator[None]:
    """Run the body as the attack, then time the honest pair while it goes on and check the bar."""
    peak = Peak(run.process.pid)
    yield
    seconds = run.honest_time()
    memory = peak.stop()
    idle_seconds, idle_memory = idle
    run.figures.append(
        f"  {name}: honest pair {seconds:.3f} s ({seconds / idle_seconds:.1f} x idle), switch peak "
        f"{memory / MIB:.1f} MiB (bar {(2 * idle_memory + caps) / MIB:.1f} MiB)"
    )
    assert run.alive(), f"{name}: the switch died"
    assert memory <= 2 * idle_memory + caps, f"{name}: the switch grew to {memory / MIB:.1f} MiB"
    assert seconds <= 3 * idle_seconds, f"{name}: the honest pair took {seconds:.3f} s"


@contextlib.contextmanager
def background(work: Callable[[threading.Event], None]) -> Iterator[None]:
    """Run ``work(stop)`` in a thread for the duration of the block."""
    stop = threading.Event()
    thread = threading.Thread(target=work, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def _flooder(path: Path, message: bytes) -> Callable[[threading.Event], None]:
    chunk = message * (MIB // len(message))

    def flood(stop: threading.Event) -> None:
        with socket.socket(socket.AF_UNIX) as sock, contextlib.suppress(OSError):
            sock.connect(str(path))
            while not stop.is_set():
                sock.sendall(chunk)

    return flood


def set_up_late_vm(run: Run) -> None:
    """A VM of another group sets up its vsock (the whole vhost-user sequence; FakeFront waits at most 5 s
    for each reply), then goes."""
    guest = FakeGuest(9, memfd=True, ram_kib=1024)
    front = FakeFront(guest, str(run.dir / "late.vhost"))
    try:
        assert front.start()["cid"] == 9
    finally:
        front.close()
        guest.close_ram()


def test_split_tx_headers_over_all_of_guest_ram(run: Run, idle: tuple[float, int]) -> None:
    x1 = run.vms["x1"]
    guest = x1.guest
    base = guest.size - 4096
    whole = (0, guest.size, False)

    def post(stop: threading.Event) -> None:
        while not stop.is_set():
            with x1.pump.lock:
                HEADER.pack_into(guest.ram, base, *Header(3, 9, 1, 2, 0, TYPE_STREAM, OP_REQUEST, 0, 0, 0))
                while len(guest.tx.free) >= 63:
                    guest.tx.add([(base, 1, False), (base + 1, 4095, False), *[whole] * 61])
                guest.front.kick(TX_QUEUE)  # type: ignore[union-attr]
                guest.tx.take_used()
            time.sleep(0.002)

    with attack(run, idle, "tx header split over 63 descriptors of 16 MiB", caps=0), background(post):
        time.sleep(0.5)


def test_a_front_end_that_truncates_its_memory(run: Run, idle: tuple[float, int]) -> None:
    with attack(run, idle, "front end truncating its memfd", caps=0):
        guest = FakeGuest(7, memfd=True, ram_kib=1024, seal=False)
        front = FakeFront(guest, str(run.dir / "front.vhost"))
        with contextlib.suppress(OSError, AssertionError):
            front.start()  # the unsealed table is refused; the rings cannot start without one
        os.ftruncate(guest.fd, 0)  # type: ignore[arg-type]
        front.kick(TX_QUEUE)
        front.close()
        guest.close_ram()
        sealed = FakeGuest(7, memfd=True, ram_kib=1024)
        with pytest.raises(PermissionError):  # what QEMU hands over cannot shrink
            os.ftruncate(sealed.fd, 0)  # type: ignore[arg-type]
        sealed.close_ram()


def test_a_front_end_that_never_reads_replies(run: Run, idle: tuple[float, int]) -> None:
    ask = vhost_user.HEADER.pack(vhost_user.GET_FEATURES, vhost_user.FLAG_VERSION, 0)
    with (
        attack(run, idle, "front end never reading replies", caps=vhost_user.MAX_PENDING_REPLY),
        background(_flooder(run.dir / "front.vhost", ask)),
    ):
        time.sleep(0.5)


def test_a_front_end_that_floods_messages(run: Run, idle: tuple[float, int]) -> None:
    owner = vhost_user.HEADER.pack(vhost_user.SET_OWNER, vhost_user.FLAG_VERSION, 0)
    with (
        attack(run, idle, "front end flooding messages", caps=0),
        background(_flooder(run.dir / "front.vhost", owner)),
    ):
        time.sleep(0.5)
        set_up_late_vm(run)


def test_host_sockets_that_never_read(run: Run, idle: tuple[float, int]) -> None:
    x4 = run.vms["x4"]
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(listener_path(x4.uds, 7000)))
    listener.listen(512)  # accepts nothing, reads nothing
    try:
        with attack(run, idle, "400 host connections whose sockets never read", caps=hybrid.MAX_HOST_BUFFER):
            with x4.pump.lock:
                conns = [x4.guest.connect(2, 7000) for _ in range(400)]
            x4.pump.wait(lambda: all(c.state != "connecting" for c in conns), timeout=30)
            with x4.pump.lock:
                for conn in conns:
                    if conn.state == "established":  # a full window each, past what the kernel holds
                        x4.guest.write(conn, bytes(hybrid.HOST_BUF_ALLOC))
            x4.pump.wait(lambda: all(not c.outgoing or c.reset for c in conns), timeout=30)
    finally:
        listener.close()


def test_a_guest_opening_host_connections_by_the_thousand(run: Run, idle: tuple[float, int]) -> None:
    x2 = run.vms["x2"]
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(listener_path(x2.uds, 7001)))
    listener.listen(4096)
    try:
        with attack(run, idle, f"1,200 host connections with a {FD_LIMIT}-descriptor limit", caps=0):
            with x2.pump.lock:
                conns = [x2.guest.connect(2, 7001) for _ in range(1200)]
            x2.pump.wait(lambda: all(c.state != "connecting" for c in conns), timeout=30)
            x2.pump.stop()  # its connections stay open; the fake guest's own rounds over them would only
            # take the test process's time from the honest pair
            opened = sum(c.state == "established" for c in conns)
            assert opened <= (FD_LIMIT - hybrid.FD_RESERVE) // len(VMS)
            set_up_late_vm(run)
    finally:
        listener.close()


def test_a_sibling_filling_a_receivers_backlog(run: Run, idle: tuple[float, int]) -> None:
    x5, x3 = run.vms["x5"], run.vms["x3"]
    with x3.pump.lock:
        x3.guest.listen(100)
    with x5.pump.lock:
        conns = [x5.guest.connect(6, 100) for _ in range(200)]
    x5.pump.wait(lambda: all(c.state != "connecting" for c in conns), timeout=30)
    caps = device.MAX_BACKLOG_BYTES // device.SENDER_SHARE
    with attack(run, idle, "a sibling filling a receiver's backlog", caps=caps):
        x3.pump.stop()  # the receiver stops reading: its rx ring, then its backlog, fill
        with x5.pump.lock:
            for conn in conns:
                x5.guest.write(conn, bytes(64 * 1024))  # 12.5 MiB: more than a sender's share
        x5.pump.wait(lambda: all(not c.outgoing or c.reset for c in conns), timeout=30)
