"""vsock-proxy: the allowlist subset parsed by hand (guests have no PyYAML), the allowlist decision, and
forwarding a stream to an allowed TCP address (the host side, through a VM's hybrid socket)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from teelab_guest.vsock_proxy import AllowlistError, allowed, parse_allowlist

NITRO_STYLE = """\
allowlist:
- {address: kms.us-east-1.amazonaws.com, port: 443}
- {address: kms-fips.us-east-1.amazonaws.com, port: 443}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (NITRO_STYLE, [("kms.us-east-1.amazonaws.com", 443), ("kms-fips.us-east-1.amazonaws.com", 443)]),
        (
            "# the lab KMS\nallowlist:\n  - address: 127.0.0.1   # loopback\n    port: 8000\n"
            "  - address: 'kms.lab'\n    port: \"9443\"\n",
            [("127.0.0.1", 8000), ("kms.lab", 9443)],
        ),
        (
            'allowlist: [{address: a.example, port: 1}, {address: "b#c", port: 2}]\n',
            [("a.example", 1), ("b#c", 2)],
        ),
        ("allowlist: []\n", []),
        ("---\nallowlist:\n", []),
        ('{"allowlist": [{"address": "10.0.0.1", "port": 8000}]}', [("10.0.0.1", 8000)]),
    ],
)
def test_allowlist_subset_parses(text: str, expected: list[tuple[str, int]]) -> None:
    assert parse_allowlist(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "allowlist:\n- {address: x}\n",  # no port
        "allowlist:\n- {address: x, port: 443, extra: 1}\n",
        "allowlist:\n- {address: x, port: 70000}\n",
        "allowlist:\n- {address: x, port: https}\n",
        "other: 1\nallowlist: []\n",
        "allowlist:\n- address: x\n  address: y\n  port: 1\n",
        "allowlist:\n- {address: 'x, port: 1}\n",
        "allowlist:\n- !!python/object {}\n",
        "- {address: x, port: 1}\n",
        '{"allowlist": [{"address": "x"}]}',
        '{"allowlist": [], "more": 1}',
    ],
)
def test_allowlist_outside_the_subset_is_refused(text: str) -> None:
    with pytest.raises(AllowlistError):
        parse_allowlist(text)


def test_port_must_match_then_name_or_resolved_address() -> None:
    table = {"kms.lab": {"10.0.0.5"}, "10.0.0.5": {"10.0.0.5"}, "other.lab": {"10.0.0.6"}}
    resolve = lambda host: table.get(host, set())  # noqa: E731
    allowlist = [("kms.lab", 443)]
    assert allowed(allowlist, "kms.lab", 443, resolve)
    assert allowed(allowlist, "10.0.0.5", 443, resolve)  # an address the allowed name resolves to
    assert not allowed(allowlist, "kms.lab", 80, resolve)  # the port must match
    assert not allowed(allowlist, "other.lab", 443, resolve)


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_host_proxy_forwards_guest_connections_to_an_allowed_address(tmp_path: Path) -> None:
    server, port = _echo_server()
    config = tmp_path / "allow.yaml"
    config.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {port}}}\n")
    uds = tmp_path / "vm.vsock"
    proxy = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "vsock", "proxy", "--config", str(config), "--uds", str(uds),
         "8000", "127.0.0.1", str(port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert '"proxy": 8000' in (proxy.stdout.readline() if proxy.stdout else "")
        path = tmp_path / "vm.vsock_8000"  # where the switch sends a guest's connection to CID 2 port 8000
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        guest = socket.socket(socket.AF_UNIX)
        guest.connect(str(path))
        guest.sendall(b"decrypt please")
        guest.shutdown(socket.SHUT_WR)
        assert guest.recv(100) == b"DECRYPT PLEASE"
    finally:
        proxy.terminate()
        proxy.wait(10)
        server.close()
    assert not (tmp_path / "vm.vsock_8000").exists()


def test_proxy_refuses_a_target_outside_the_allowlist(tmp_path: Path) -> None:
    config = tmp_path / "allow.yaml"
    config.write_text(NITRO_STYLE)
    run = subprocess.run(
        [sys.executable, "-m", "harness.cli", "vsock", "proxy", "--config", str(config), "--uds",
         str(tmp_path / "vm.vsock"), "8000", "127.0.0.1", "443"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "E721" in run.stderr
    assert not list(tmp_path.glob("vm.vsock*"))


def test_proxy_refuses_a_port_another_listener_serves(tmp_path: Path) -> None:
    config = tmp_path / "allow.yaml"
    config.write_text("allowlist:\n- {address: 127.0.0.1, port: 9}\n")
    busy = socket.socket(socket.AF_UNIX)
    busy.bind(str(tmp_path / "vm.vsock_8000"))
    busy.listen()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "harness.cli", "vsock", "proxy", "--config", str(config), "--uds",
             str(tmp_path / "vm.vsock"), "8000", "127.0.0.1", "9"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        busy.close()
    assert run.returncode == 1 and "E708" in run.stderr and "Traceback" not in run.stderr
    assert (tmp_path / "vm.vsock_8000").exists()  # left to the listener that serves it


def test_guest_proxy_refuses_a_bad_allowlist(tmp_path: Path) -> None:
    config = tmp_path / "allow.yaml"
    config.write_text("allowlist:\n- {address: x, port: nope}\n")
    run = subprocess.run(
        [sys.executable, "-m", "teelab_guest.vsock_proxy", "--config", str(config), "8000", "x", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "bad allowlist" in run.stderr
