"""The host-side vsock API: backend choice, the devices each backend puts in a VMSpec (golden argv), CIDs
from the host ledger, routing groups, connect/listen through the switch, vhost-device-vsock as the switch."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu_hosts import tcg_host

from harness.aio import EventLoopThread
from harness.cli.vsock import parse_vm
from harness.errors import ConfigError
from harness.host.ledger import Ledger
from harness.qemu import ChardevSocket, MemoryBackendMemfd, VMSpec, build_argv
from harness.vsock import backend_choice, external
from harness.vsock.errors import (
    CidUnavailable,
    VsockBackendUnavailable,
    VsockConfigError,
    VsockConnectionRefused,
    VsockSwitchError,
    VsockUnknownPeer,
)
from harness.vsock.fake_guest import FakeFront, FakeGuest, GuestPump, echo
from harness.vsock.host import VsockHost
from harness.vsock.proxy import VsockProxy

QMP = ChardevSocket("qmp", fd=3)
CONSOLE = ChardevSocket("console", fd=4)


@pytest.fixture
def loop() -> Iterator[EventLoopThread]:
    thread = EventLoopThread("test-vsock-host")
    yield thread
    thread.close()


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger")


def make_host(ledger: Ledger, loop: EventLoopThread, tmp_path: Path, **options: object) -> VsockHost:
    runtime = tmp_path / f"rt{len(list(tmp_path.iterdir()))}"
    runtime.mkdir()
    host = options.pop("host", tcg_host())
    return VsockHost(host, ledger=ledger, loop=loop, runtime_dir=runtime, **options)  # type: ignore[arg-type]


# -- backend choice -------------------------------------------------------------------------------
def test_backend_comes_from_argument_then_environment_then_toml(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(backend_choice.ENV_BACKEND, raising=False)
    toml = tmp_path / "teelab.toml"
    toml.write_text('[vsock]\nbackend = "builtin"\n')
    monkeypatch.setenv("TEELAB_CONFIG", str(toml))
    assert backend_choice.configured_backend() == "builtin"
    monkeypatch.setenv(backend_choice.ENV_BACKEND, "kernel")
    assert backend_choice.configured_backend() == "kernel"
    assert backend_choice.configured_backend("auto") == "auto"
    monkeypatch.delenv(backend_choice.ENV_BACKEND)
    toml.write_text("")
    assert backend_choice.configured_backend() == "auto"
    with pytest.raises(ConfigError) as err:
        backend_choice.configured_backend("vmci")
    assert err.value.code == "E101"


def test_auto_takes_the_kernel_only_where_it_exists_and_only_for_vms_without_a_group() -> None:
    assert backend_choice.resolve(tcg_host(vhost_vsock=True), "auto", grouped=False) == "kernel"
    assert backend_choice.resolve(tcg_host(vhost_vsock=True), "auto", grouped=True) == "builtin"
    assert backend_choice.resolve(tcg_host(), "auto", grouped=False) == "builtin"


def test_impossible_backends_are_refused_with_codes(monkeypatch) -> None:
    with pytest.raises(VsockBackendUnavailable) as err:
        backend_choice.resolve(tcg_host(), "kernel", grouped=False)
    assert err.value.code == "E701" and "vhost-vsock" in err.value.message
    with pytest.raises(VsockConfigError):
        backend_choice.resolve(tcg_host(vhost_vsock=True), "kernel", grouped=True)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(VsockBackendUnavailable):
        backend_choice.resolve(tcg_host(), "vhost-device-vsock", grouped=False)


# -- devices in the VM's command line (golden) ---------------------------------------------------
def boot_files(tmp_path: Path) -> dict[str, Path]:
    files = {"kernel": tmp_path / "vmlinuz", "initrd": tmp_path / "initrd.img"}
    for path in files.values():
        path.write_bytes(b"\0")
    return files


def test_kernel_backend_argv(tmp_path: Path, ledger: Ledger, loop: EventLoopThread) -> None:
    host = tcg_host(vhost_vsock=True)
    with make_host(ledger, loop, tmp_path, host=host, backend="kernel") as vsock:
        att = vsock.attach("enclave", cid=16)
        spec = VMSpec("enclave", cmdline="console=ttyS0", devices=att.devices, **boot_files(tmp_path))
        argv = build_argv(spec, host, qmp=QMP, console=CONSOLE)
    assert att.backend == "kernel" and att.uds is None and not att.needs_shared_memory
    assert argv[argv.index("-device", argv.index("-no-reboot")) :][:2] == [
        "-device",
        "vhost-vsock-pci,id=vsock0,guest-cid=16",
    ]


def test_builtin_backend_argv(tmp_path: Path, ledger: Ledger, loop: EventLoopThread) -> None:
    host = tcg_host()
    with make_host(ledger, loop, tmp_path, host=host, backend="builtin") as vsock:
        att = vsock.attach("parent", group="lab1", cid=3)
        spec = VMSpec(
            "parent",
            cmdline="console=ttyS0",
            memory_mib=256,
            devices=att.devices,
            memory=MemoryBackendMemfd("ram0", 256, share=True),
            **boot_files(tmp_path),
        )
        argv = build_argv(spec, host, qmp=QMP, console=CONSOLE)
        tail = argv[argv.index("-no-reboot") + 1 :]
        assert f"socket,id=vsock0-chr,path={vsock.runtime_dir}/parent.vhost" in tail
        assert "vhost-user-vsock-pci,id=vsock0,chardev=vsock0-chr" in tail
        assert "memory-backend-memfd,id=ram0,size=256M,share=true" in argv
        assert att.needs_shared_memory and att.uds == vsock.runtime_dir / "parent.vsock"


# -- CIDs -----------------------------------------------------------------------------------------
def test_concurrent_labs_get_different_cids_from_the_ledger(
    tmp_path: Path, ledger: Ledger, loop: EventLoopThread
) -> None:
    one = make_host(ledger, loop, tmp_path, backend="builtin")
    two = make_host(ledger, loop, tmp_path, backend="builtin")
    cids = [one.attach(f"a{i}").cid for i in range(3)] + [two.attach(f"b{i}").cid for i in range(3)]
    assert len(set(cids)) == 6 and all(c >= 16 for c in cids)
    held = {c.value for c in ledger.claims("cid")}
    assert set(cids) <= held
    one.close()
    two.close()
    assert not ledger.claims("cid")


def test_explicit_kernel_cids_are_host_wide(tmp_path: Path, ledger: Ledger, loop: EventLoopThread) -> None:
    host = tcg_host(vhost_vsock=True)
    with (
        make_host(ledger, loop, tmp_path, host=host, backend="kernel") as one,
        make_host(ledger, loop, tmp_path, host=host, backend="kernel") as two,
    ):
        one.attach("x", cid=40)
        with pytest.raises(CidUnavailable) as err:
            two.attach("y", cid=40)
        assert err.value.code == "E703"
        assert "y" not in two.attachments


def test_cids_are_scoped_per_routing_group(tmp_path: Path, ledger: Ledger, loop: EventLoopThread) -> None:
    with make_host(ledger, loop, tmp_path, backend="builtin") as vsock:
        vsock.attach("parent1", group="lab1", cid=3)
        vsock.attach("parent2", group="lab2", cid=3)  # every parent is CID 3 to its enclaves
        with pytest.raises(CidUnavailable):
            vsock.attach("enclave", group="lab1", cid=3)
        with pytest.raises(VsockUnknownPeer) as err:
            vsock.find(3)
        assert err.value.code == "E707"
        assert vsock.find(3, group="lab2").name == "parent2"
        assert not list(vsock.runtime_dir.glob("enclave.*"))  # the refused VM left no socket behind


@pytest.mark.parametrize("cid", [0, 1, 2, 2**32 - 1, 2**32])
def test_reserved_cids_are_refused(tmp_path: Path, ledger: Ledger, loop: EventLoopThread, cid: int) -> None:
    with make_host(ledger, loop, tmp_path, backend="builtin") as vsock, pytest.raises(VsockConfigError):
        vsock.attach("vm", cid=cid)


def test_close_leaves_nothing_behind(tmp_path: Path, ledger: Ledger, loop: EventLoopThread) -> None:
    vsock = VsockHost(tcg_host(), backend="builtin", ledger=ledger, loop=loop)
    vsock.attach("vm", group="g")
    listener = vsock.listen(9000)
    runtime = vsock.runtime_dir
    assert (runtime / "vm.vsock_9000").exists()
    vsock.close()
    assert listener.closed and not runtime.exists() and not ledger.claims()


def test_a_host_port_already_listened_on_is_refused_not_taken_over(
    tmp_path: Path, ledger: Ledger, loop: EventLoopThread
) -> None:
    with make_host(ledger, loop, tmp_path, backend="builtin") as vsock:
        vsock.attach("vm", group="g")
        first = vsock.listen(9000)
        with pytest.raises(VsockSwitchError) as err:
            vsock.listen(9000)
        assert err.value.code == "E708"
        guest = socket.socket(socket.AF_UNIX)
        guest.connect(str(vsock.runtime_dir / "vm.vsock_9000"))  # still the first listener's socket
        conn, _cid = first.accept(timeout=5)
        conn.close()
        guest.close()


def test_an_attach_whose_listener_path_is_taken_is_undone(
    tmp_path: Path, ledger: Ledger, loop: EventLoopThread
) -> None:
    with make_host(ledger, loop, tmp_path, backend="builtin") as vsock:
        vsock.listen(9000)
        squatter = socket.socket(socket.AF_UNIX)  # another program serves the VM's port-9000 path
        squatter.bind(str(vsock.runtime_dir / "vm.vsock_9000"))
        squatter.listen()
        try:
            with pytest.raises(VsockSwitchError):
                vsock.attach("vm")
            assert "vm" not in vsock.attachments and not ledger.claims("cid")
            assert not (vsock.runtime_dir / "vm.vhost").exists()
        finally:
            squatter.close()


def test_a_listener_that_cannot_bind_raises_a_coded_error(
    tmp_path: Path, ledger: Ledger, loop: EventLoopThread
) -> None:
    with make_host(ledger, loop, tmp_path, backend="builtin") as vsock:
        vsock.attach("vm", group="g")
        for entry in vsock.runtime_dir.iterdir():
            entry.unlink()
        vsock.runtime_dir.rmdir()
        with pytest.raises(VsockSwitchError) as err:
            vsock.listen(9000)
        assert err.value.code == "E708" and not vsock._listeners


def test_a_proxy_stops_when_its_listener_is_closed_under_it(
    tmp_path: Path, ledger: Ledger, loop: EventLoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    vsock = make_host(ledger, loop, tmp_path, backend="builtin")
    vsock.attach("vm", group="g")
    proxy = VsockProxy(vsock.listen(8000), ("127.0.0.1", 9))
    try:
        time.sleep(0.3)  # the proxy thread waits in accept()
        vsock.close()  # the lab's vsock goes first and closes the proxy's listener
        proxy._thread.join(5)
        assert not proxy._thread.is_alive()  # it ended, instead of spinning on a closed listener
        assert escaped == []  # and quietly, not by an exception out of the thread
    finally:
        proxy.close()


# -- streams through the switch -------------------------------------------------------------------
def test_connect_and_listen_through_the_builtin_switch(
    tmp_path: Path, ledger: Ledger, loop: EventLoopThread
) -> None:
    with make_host(ledger, loop, tmp_path, backend="builtin") as vsock:
        listener = vsock.listen(7000)  # before the VM exists: it is added when the VM attaches
        att = vsock.attach("vm", group="g")
        guest = FakeGuest(att.cid, memfd=True, ram_kib=4096)
        front = FakeFront(guest, str(vsock.runtime_dir / "vm.vhost"))
        front.start()
        pump = GuestPump(guest)
        pump.behaviours.append(echo)
        with pump.lock:
            guest.listen(5000)
        try:
            sock = vsock.connect(att.cid, 5000)
            sock.sendall(b"hello")
            assert sock.recv(5) == b"hello"
            with pytest.raises(VsockConnectionRefused):
                vsock.connect(att.cid, 5001, timeout=60)
            with pump.lock:
                conn = guest.connect(2, 7000)
            host_side, peer = listener.accept(timeout=10)
            assert peer == att.cid
            with pump.lock:
                guest.write(conn, b"from the guest")
            assert host_side.recv(100) == b"from the guest"
            assert vsock.stats()["vms"]["vm"]["host_connections"] == 2

            def listen_late() -> None:
                with pump.lock:
                    guest.listen(5001)

            threading.Timer(0.3, listen_late).start()
            vsock.connect(att.cid, 5001, wait=30).close()  # refusals retried until the guest listens
        finally:
            pump.stop()
            front.close()
            guest.close_ram()


def test_vhost_device_vsock_can_stand_in(
    tmp_path: Path, ledger: Ledger, loop: EventLoopThread, monkeypatch
) -> None:
    """The external backend runs whatever 'vhost-device-vsock' is on PATH with rust-vmm's --vm syntax; here
    that is `teelab vsock serve`, which takes the same syntax."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "vhost-device-vsock"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m harness.cli vsock serve "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    waited_in: set[str] = set()  # threads that waited for the daemon's sockets
    sleep = time.sleep

    def noting_sleep(seconds: float) -> None:
        waited_in.add(threading.current_thread().name)
        sleep(seconds)

    monkeypatch.setattr(external.time, "sleep", noting_sleep)
    with make_host(ledger, loop, tmp_path, backend="vhost-device-vsock") as vsock:
        att = vsock.attach("vm", group="g", cid=5)
        assert att.backend == "vhost-device-vsock"
        assert waited_in and "test-vsock-host" not in waited_in  # the loop thread stays free meanwhile
        guest = FakeGuest(5, memfd=True, ram_kib=4096)
        front = FakeFront(guest, str(vsock.runtime_dir / "vm.vhost"))
        assert front.start()["cid"] == 5
        pump = GuestPump(guest)
        pump.behaviours.append(echo)
        with pump.lock:
            guest.listen(5000)
        try:
            sock = vsock.connect(5, 5000)
            sock.sendall(b"swap")
            assert sock.recv(4) == b"swap"
        finally:
            pump.stop()
            front.close()
            guest.close_ram()
        process = vsock._daemons["g"].process
        vhost_socket = vsock.runtime_dir / "vm.vhost"
        assert process is not None and process.poll() is None and vhost_socket.exists()
    assert process.poll() is not None
    assert not vhost_socket.exists()


def test_serve_reads_vhost_device_vsock_vm_specs() -> None:
    ep = parse_vm("guest-cid=4,socket=/run/vm4.vhost,uds-path=/run/vm4.vsock,groups=group1")
    assert (ep.cid, ep.group, str(ep.vhost_socket), str(ep.uds)) == (
        4,
        "group1",
        "/run/vm4.vhost",
        "/run/vm4.vsock",
    )
    assert parse_vm("guest-cid=5,socket=a,uds-path=b").group == "default"
    for bad in (
        "guest-cid=x,socket=a,uds-path=b",
        "socket=a,uds-path=b",
        "guest-cid=4,socket=a,uds-path=b,groups=a+b",
        "guest-cid=4,socket=a,uds-path=b,tx-buffer-size=1",
    ):
        with pytest.raises(VsockConfigError):
            parse_vm(bad)


def test_a_path_too_long_is_refused_before_anything_starts(
    ledger: Ledger, loop: EventLoopThread, tmp_path: Path
) -> None:
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    with VsockHost(tcg_host(), backend="builtin", ledger=ledger, loop=loop, runtime_dir=deep) as vsock:
        with pytest.raises(Exception) as err:
            vsock.attach("a-rather-long-vm-name")
        assert err.value.code == "E706"  # type: ignore[attr-defined]
        assert not list(deep.iterdir()) and not ledger.claims()


def test_listen_with_kernel_backend_uses_af_vsock(
    tmp_path: Path, ledger: Ledger, loop: EventLoopThread
) -> None:
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK in this Python")
    with make_host(ledger, loop, tmp_path, host=tcg_host(vhost_vsock=True), backend="kernel") as vsock:
        try:
            listener = vsock.listen(9123)
        except OSError as exc:  # no vsock transport in this host kernel
            pytest.skip(f"host kernel has no vsock transport: {exc}")
        assert listener._sockets[""][0].family == socket.AF_VSOCK
        listener.close()


def test_a_vm_attached_without_host_ports_is_served_by_no_host_listener(
    tmp_path: Path, ledger: Ledger, loop: EventLoopThread
) -> None:
    with make_host(ledger, loop, tmp_path, backend="builtin") as vsock:
        vsock.attach("parent", group="g", cid=3)
        vsock.attach("enclave", group="g", host_ports=False)  # an enclave reaches its parent, not the host
        before = vsock.listen(9000)
        named = vsock.listen(9001, vm="enclave")
        vsock.attach("late", group="g", host_ports=False)
        assert (vsock.runtime_dir / "parent.vsock_9000").exists()
        for path in ("enclave.vsock_9000", "enclave.vsock_9001", "late.vsock_9000"):
            assert not (vsock.runtime_dir / path).exists()  # a guest connecting there gets a reset
        before.close()
        named.close()
