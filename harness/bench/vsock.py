"""``teelab bench vsock``: vsock throughput (host->guest, guest->host, guest<->guest, MB/s) and round-trip
latency (p50, p99), with the same guest->host transfer over virtio-serial as a baseline in the same run.

Throughput is bytes over the receiver's time from the first byte to the last; 1 MB = 10**6 bytes.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from teelab_guest.vsock_peer import Pattern, drain, round_trips

from harness import images
from harness.bench.result import Bar, BenchResult
from harness.lab import GuestBoot, Lab
from harness.qemu.chardevs import ChardevChannel
from harness.qemu.devices import VirtioSerialPort
from harness.qemu.objects import MemoryBackendMemfd
from harness.vsock.host import VsockHost

SERIAL_PORT = "org.teelab.bench.0"
SERIAL_CHANNEL = "bench"
# The bars of docs/status.md (vsock), under TCG on a 2-vCPU host.
TCG_BARS = (
    Bar("guest_to_host_mb_s", ">=", 25.0),
    Bar("guest_to_guest_mb_s", ">=", 15.0),
    Bar("rtt_p50_ms", "<=", 2.0),
    Bar("vsock_over_serial", ">=", 0.5),
)
PEER = ["python3", "-m", "teelab_guest.vsock_peer"]


@dataclass
class VsockBenchResult(BenchResult):
    """Named figures (``measured``) and the host<->guest round trips in ms (``rtt_ms``)."""

    measured: dict[str, float] = field(default_factory=dict)
    rtt_ms: list[float] = field(default_factory=list)

    @property
    def figures(self) -> dict[str, float]:
        figures = dict(self.measured)
        if self.rtt_ms:
            ordered = sorted(self.rtt_ms)
            figures["rtt_p50_ms"] = round(statistics.median(ordered), 3)
            figures["rtt_p99_ms"] = round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)
        return figures

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["rtt_count"] = len(self.rtt_ms)
        return data


def _mb_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 2) if seconds > 0 else 0.0


def bench_vsock(
    lab: Lab,
    *,
    image_name: str = "enclave",
    size_mib: int = 64,
    rtt_count: int = 500,
    backend: str = "builtin",
    vcpus: int = 2,
    memory_mib: int = 512,
    on_step: Callable[[str, str], None] | None = None,
) -> VsockBenchResult:
    """Boot two guests in one routing group and measure; ``on_step(name, value)`` reports progress."""
    size = size_mib << 20
    result = VsockBenchResult(
        name="vsock",
        unit="MB/s, ms",
        params={"image": image_name, "bytes": size, "rtt_count": rtt_count, "backend": backend,
                "vcpus": vcpus, "accel": lab.host.accel},
    )  # fmt: skip
    if lab.host.accel == "tcg":
        result.bars.extend(TCG_BARS)
    step = on_step or (lambda _name, _value: None)
    with VsockHost(lab.host, backend=backend) as vsock:
        a, b = _boot_pair(lab, vsock, images.build(image_name), vcpus, memory_mib, step)
        result.extra["backend_used"] = vsock.attachments[a.machine.spec.name].backend
        measured = result.measured
        measured["guest_to_host_mb_s"] = _guest_to_host(vsock, a, size)
        step("guest -> host", f"{measured['guest_to_host_mb_s']} MB/s")
        measured["serial_guest_to_host_mb_s"] = _serial_guest_to_host(a, size)
        measured["vsock_over_serial"] = round(
            measured["guest_to_host_mb_s"] / measured["serial_guest_to_host_mb_s"], 2
        )
        step("virtio-serial", f"{measured['serial_guest_to_host_mb_s']} MB/s")
        measured["host_to_guest_mb_s"] = _host_to_guest(vsock, a, size)
        step("host -> guest", f"{measured['host_to_guest_mb_s']} MB/s")
        measured["guest_to_guest_mb_s"] = _guest_to_guest(a, b, size)
        step("guest -> guest", f"{measured['guest_to_guest_mb_s']} MB/s")
        result.rtt_ms.extend(_host_round_trips(vsock, a, rtt_count))
        step("host <-> guest rtt", f"p50 {result.figures['rtt_p50_ms']} ms")
        measured["guest_rtt_p50_ms"], measured["guest_rtt_p99_ms"] = _guest_round_trips(a, b, rtt_count)
        step("guest <-> guest rtt", f"p50 {measured['guest_rtt_p50_ms']} ms")
        result.extra["switch"] = {"drops": vsock.stats().get("drops", {})}
        for guest in (a, b):
            lab.stop(guest.machine)
    return result


def _boot_pair(
    lab: Lab,
    vsock: VsockHost,
    image: images.BuiltImage,
    vcpus: int,
    memory_mib: int,
    step: Callable[[str, str], None],
) -> tuple[GuestBoot, GuestBoot]:
    """Guests a (CID 3, with a virtio-serial port for the baseline) and b (CID 16) in one routing group."""
    group = f"bench{os.getpid()}"
    # Attach both before booting either: vhost-device-vsock takes a group's VMs when it starts.
    attachments = {
        name: vsock.attach(f"bench-{name}-{os.getpid()}", group=group, cid=cid)
        for name, cid in (("a", 3), ("b", 16))
    }
    guests = {}
    for name, attachment in attachments.items():
        devices = list(attachment.devices)
        if name == "a":
            devices.append(
                VirtioSerialPort("bench0", name=SERIAL_PORT, chardev=ChardevChannel(SERIAL_CHANNEL))
            )
        memory = MemoryBackendMemfd("ram0", memory_mib, share=True)
        spec = lab.spec_for_image(
            image, name=attachment.name, vcpus=vcpus, memory_mib=memory_mib, memory=memory, devices=devices
        )
        guests[name] = lab.boot(spec)
        assert guests[name].agent is not None
        step(f"boot {name}", f"{guests[name].seconds:.2f} s")
    return guests["a"], guests["b"]


def _guest_to_host(vsock: VsockHost, guest: GuestBoot, size: int) -> float:
    assert guest.agent is not None
    with vsock.listen(7000, vm=guest.machine.spec.name) as listener:
        sender = guest.agent.start(
            [*PEER, "source", "--cid", "2", "--port", "7000", "--bytes", str(size)], timeout=600
        )
        conn, _cid = listener.accept(timeout=120)
        with conn:
            total, seconds = drain(conn)
            conn.sendall(json.dumps({"bytes": total, "seconds": seconds}).encode() + b"\n")
        sender.json()
    return _mb_s(total, seconds)


def _serial_guest_to_host(guest: GuestBoot, size: int) -> float:
    """The same transfer as ``_guest_to_host`` over virtio-serial: the baseline."""
    assert guest.agent is not None
    with guest.machine.channel(SERIAL_CHANNEL) as channel:
        channel.setblocking(True)
        writer = guest.agent.start(
            [*PEER, "serial-source", "--name", SERIAL_PORT, "--bytes", str(size)], timeout=600
        )
        total, seconds = drain(channel, limit=size)
        writer.json()
    return _mb_s(total, seconds)


def _host_to_guest(vsock: VsockHost, guest: GuestBoot, size: int) -> float:
    assert guest.agent is not None
    sink = guest.agent.start([*PEER, "sink", "--port", "7001"], timeout=600)
    with vsock.connect(3, 7001, timeout=60, wait=60) as conn:
        Pattern().send(conn.sendall, size)
        conn.shutdown(socket.SHUT_WR)
        drain(conn)
    report = sink.json()
    return _mb_s(report["bytes"], report["seconds"])


def _guest_to_guest(a: GuestBoot, b: GuestBoot, size: int) -> float:
    assert a.agent is not None and b.agent is not None
    sink = a.agent.start([*PEER, "sink", "--port", "7002"], timeout=600)
    b.agent.exec(
        [*PEER, "source", "--cid", "3", "--port", "7002", "--bytes", str(size)], timeout=600, check=True
    )
    report = sink.json()
    return _mb_s(report["bytes"], report["seconds"])


def _host_round_trips(vsock: VsockHost, guest: GuestBoot, count: int) -> list[float]:
    assert guest.agent is not None
    echo = guest.agent.start([*PEER, "echo", "--port", "7003"], timeout=600)
    with vsock.connect(3, 7003, timeout=60, wait=60) as conn:
        rtts = round_trips(conn, b"r" * 64, count)
    echo.json()
    return rtts


def _guest_round_trips(a: GuestBoot, b: GuestBoot, count: int) -> tuple[float, float]:
    """p50 and p99 in ms of b's round trips to an echo in a."""
    assert a.agent is not None and b.agent is not None
    echo = a.agent.start([*PEER, "echo", "--port", "7004"], timeout=600)
    pings = b.agent.exec(
        [*PEER, "pingpong", "--cid", "3", "--port", "7004", "--count", str(count)], timeout=600, check=True
    )
    echo.json()
    report = json.loads(pings.stdout)
    return round(report["p50_ms"], 3), round(report["p99_ms"], 3)
