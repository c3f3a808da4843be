"""The switch's bounds against a hostile guest or front end, one finding each: every test here failed
before its fix (see docs/vsock.md, "A hostile guest" and "A hostile front end")."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

from harness.vsock.device import TX_QUEUE
from harness.vsock.fake_guest import FakeGuest
from harness.vsock.packet import HEADER, OP_REQUEST, TYPE_STREAM, Header
from harness.vsock.switch import Switch


def _run(loop: asyncio.AbstractEventLoop, rounds: int = 4) -> None:
    for _ in range(rounds):
        loop.run_until_complete(asyncio.sleep(0))


def test_a_split_tx_header_copies_only_the_header(tmp_path: Path) -> None:
    """A tx chain whose first descriptor is under 44 bytes, followed by descriptors spanning all of guest
    RAM: the switch gathers the 44 header bytes, not every readable byte of the chain."""
    loop = asyncio.new_event_loop()
    try:
        switch = Switch(loop)
        guest = FakeGuest(5, ram_kib=16384, queue_size=64)
        device = switch.attach("vm5", 5, "g", tmp_path / "vm5.vsock")
        guest.attach(device)
        base = guest.size - 4096
        HEADER.pack_into(guest.ram, base, *Header(5, 7, 1, 2, 0, TYPE_STREAM, OP_REQUEST, 0, 0, 0))
        whole = (0, guest.size, False)
        guest.tx.add([(base, 1, False), (base + 1, 4095, False), *[whole] * 30])
        tracemalloc.start()
        try:
            device.kick(TX_QUEUE)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"{peak} bytes allocated to read one header"
        assert device.stats["tx_packets"] == 1 and device.stats["unreachable"] == 1  # the header was read
    finally:
        loop.close()
