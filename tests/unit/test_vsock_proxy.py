"""vsock-proxy: the allowlist subset parsed by hand (guests have no PyYAML), the allowlist decision (the
target resolved once, through a real DNS server on loopback in the rebinding test), and forwarding a stream to
an allowed TCP address (the host side, through a VM's hybrid socket)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
from teelab_guest.vsock_proxy import (
    AllowlistError,
    Resolver,
    TargetRefused,
    checked_addresses,
    parse_allowlist,
)

from harness.vsock.proxy import VsockProxy, open_listener

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
        '{"allowlist": 5}',
        # a key given twice is refused, not merged (the last value would win)
        "allowlist:\n- {address: 10.0.0.1, address: 127.0.0.1, port: 1}\n",
        '{"allowlist": [{"address": "127.0.0.1", "port": 1, "port": 2}]}',
        '{"allowlist": [], "allowlist": [{"address": "127.0.0.1", "port": 1}]}',
    ],
)
def test_allowlist_outside_the_subset_is_refused(text: str) -> None:
    with pytest.raises(AllowlistError):
        parse_allowlist(text)


class LoopbackDns:
    """A DNS server on loopback UDP that answers A queries for ``name`` with ``answers`` in turn (the last one
    from then on), as an attacker's server rebinding a name does; other names are NXDOMAIN."""

    def __init__(self, name: str, answers: list[str]) -> None:
        self.name = dns.name.from_text(name)
        self.answers = answers
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                wire, peer = self.sock.recvfrom(512)
            except OSError:
                return
            query = dns.message.from_wire(wire)
            response = dns.message.make_response(query)
            question = query.question[0]
            if question.name == self.name and question.rdtype == dns.rdatatype.A:
                address = self.answers[min(self.queries, len(self.answers) - 1)]
                self.queries += 1
                response.answer.append(dns.rrset.from_text(question.name, 0, "IN", "A", address))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def resolver(self) -> Resolver:
        """A resolver asking this server (no cache), in the shape the proxy takes."""
        client = dns.resolver.Resolver(configure=False)
        client.nameservers = ["127.0.0.1"]
        client.port = self.port
        client.lifetime = 5

        def resolve(host: str) -> list[str]:
            try:
                return [answer.address for answer in client.resolve(host, "A")]
            except dns.exception.DNSException:
                return []

        return resolve

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def rebinding_dns() -> Iterator[LoopbackDns]:
    """``kms.rebind.test`` resolves to 127.0.0.1 once, then to 127.0.0.2."""
    server = LoopbackDns("kms.rebind.test.", ["127.0.0.1", "127.0.0.2"])
    yield server
    server.close()


def test_port_must_match_then_name_or_resolved_address() -> None:
    table = {"kms.lab": ["10.0.0.5"], "other.lab": ["10.0.0.6"], "both.lab": ["10.0.0.6", "10.0.0.5"]}
    resolve: Resolver = lambda host: table.get(host, [])  # noqa: E731
    allowlist = [("kms.lab", 443)]
    assert checked_addresses(allowlist, "kms.lab", 443, resolve) == ["10.0.0.5"]
    # an address the allowed name resolves to, or a name resolving to one: only the addresses that passed
    assert checked_addresses(allowlist, "10.0.0.5", 443, resolve) == ["10.0.0.5"]
    assert checked_addresses(allowlist, "both.lab", 443, resolve) == ["10.0.0.5"]
    for host, port, reason in [
        ("kms.lab", 80, "no allowlist entry has port 80"),
        ("other.lab", 443, "not on the allowlist"),
        ("nowhere.lab", 443, "does not resolve"),
    ]:
        with pytest.raises(TargetRefused, match=reason):
            checked_addresses(allowlist, host, port, resolve)


def test_a_vsock_target_passes_only_when_the_allowlist_names_it() -> None:
    """A parent passes its enclaves' KMS connections on to the host as ``vsock:2``: no lookup, exact entry."""
    nothing: Resolver = lambda host: []  # noqa: E731
    assert checked_addresses([("vsock:2", 8000)], "vsock:2", 8000, nothing) == ["vsock:2"]
    assert checked_addresses([("vsock:2", 8000)], "vsock:02", 8000, nothing) == ["vsock:2"]
    for allowlist, host, reason in [
        ([("vsock:2", 8000)], "vsock:3", "not on the allowlist"),
        ([("kms.lab", 8000)], "vsock:2", "not on the allowlist"),
        ([("vsock:2", 8000)], "10.0.0.5", "not on the allowlist"),
        ([("vsock:2", 8000)], "vsock:two", "is not vsock:CID"),
        ([("vsock:2", 8000)], "vsock:-1", "is not vsock:CID"),
    ]:
        with pytest.raises(TargetRefused, match=reason):
            checked_addresses(allowlist, host, 8000, nothing)


def test_a_name_is_checked_through_a_real_dns_server(rebinding_dns: LoopbackDns) -> None:
    resolve = rebinding_dns.resolver()
    assert checked_addresses([("127.0.0.1", 443)], "kms.rebind.test", 443, resolve) == ["127.0.0.1"]
    with pytest.raises(TargetRefused, match=r"127\.0\.0\.2"):  # the second answer is off the list
        checked_addresses([("127.0.0.1", 443)], "kms.rebind.test", 443, resolve)


def _echo_server(host: str = "127.0.0.1", port: int = 0) -> tuple[socket.socket, int, list[str]]:
    """A TCP server answering each stream in upper case; the list collects what each connection sent."""
    server = socket.create_server((host, port))
    received: list[str] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                seen = b""
                while data := conn.recv(65536):
                    seen += data
                    conn.sendall(data.upper())
                received.append(seen.decode())

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1], received


def _through_hybrid(path: Path, payload: bytes) -> bytes:
    """What a guest gets back for ``payload`` sent to the host port whose hybrid listener is ``path``."""
    with socket.socket(socket.AF_UNIX) as guest:
        guest.settimeout(10)
        guest.connect(str(path))
        guest.sendall(payload)
        guest.shutdown(socket.SHUT_WR)
        return guest.recv(100)


def test_a_rebound_name_is_reached_only_at_the_address_that_was_checked(
    tmp_path: Path, rebinding_dns: LoopbackDns
) -> None:
    allowed_server, port, allowed_got = _echo_server("127.0.0.1")
    forbidden_server, _, forbidden_got = _echo_server("127.0.0.2", port)  # where the name rebinds to
    resolve = rebinding_dns.resolver()
    try:
        with VsockProxy(
            open_listener(8000, [tmp_path / "vm.vsock"]),
            ("kms.rebind.test", port),
            [("127.0.0.1", port)],
            resolve=resolve,
        ) as proxy:
            for n in range(3):
                answer = _through_hybrid(tmp_path / "vm.vsock_8000", f"call {n}".encode())
                assert answer == f"CALL {n}".encode()
            assert proxy.addresses == ["127.0.0.1"] and proxy.forwarded == 3
        deadline = time.monotonic() + 10  # the server notes a stream once it has seen its end
        while len(allowed_got) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(allowed_got) == ["call 0", "call 1", "call 2"] and forbidden_got == []
        assert rebinding_dns.queries == 1  # resolved once, at the check
        assert resolve("kms.rebind.test") == ["127.0.0.2"]  # what a lookup per connection would have found
    finally:
        allowed_server.close()
        forbidden_server.close()
    assert not (tmp_path / "vm.vsock_8000").exists()


def test_host_proxy_forwards_guest_connections_to_an_allowed_address(tmp_path: Path) -> None:
    server, port, _ = _echo_server()
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
        assert _through_hybrid(path, b"decrypt please") == b"DECRYPT PLEASE"
    finally:
        proxy.terminate()
        proxy.wait(10)
        server.close()
    assert not (tmp_path / "vm.vsock_8000").exists()


def test_a_proxy_stopped_as_soon_as_it_is_ready_removes_its_socket(tmp_path: Path) -> None:
    """SIGTERM right after the readiness line: the handler was in place before the listener existed."""
    config = tmp_path / "allow.yaml"
    config.write_text("allowlist:\n- {address: 127.0.0.1, port: 9}\n")
    for _ in range(3):
        proxy = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "vsock", "proxy", "--config", str(config),
             "--uds", str(tmp_path / "vm.vsock"), "8000", "127.0.0.1", "9"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proxy.stdout is not None and '"proxy": 8000' in proxy.stdout.readline()
        proxy.terminate()
        assert proxy.wait(10) == 0
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


@pytest.mark.parametrize("port", ["-5", str(2**32)])
def test_proxy_refuses_a_vsock_port_out_of_range(tmp_path: Path, port: str) -> None:
    config = tmp_path / "allow.yaml"
    config.write_text("allowlist:\n- {address: 127.0.0.1, port: 9}\n")
    run = subprocess.run(
        [sys.executable, "-m", "harness.cli", "vsock", "proxy", "--config", str(config), "--uds",
         str(tmp_path / "vm.vsock"), "--", port, "127.0.0.1", "9"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 2 and "E702" in run.stderr
    assert list(tmp_path.iterdir()) == [config]


def test_guest_proxy_refuses_a_bad_allowlist(tmp_path: Path) -> None:
    config = tmp_path / "allow.yaml"
    config.write_text("allowlist:\n- {address: x, port: nope}\n")
    run = subprocess.run(
        [sys.executable, "-m", "teelab_guest.vsock_proxy", "--config", str(config), "8000", "x", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "bad allowlist" in run.stderr


@pytest.mark.parametrize(
    "content",
    [
        b"allowlist:\n- {address: caf\xe9.lab, port: 1}\n",  # Latin-1, not UTF-8
        b"5\n",  # a JSON or YAML number
        b'{"allowlist": 5}\n',
        b"allowlist = 5\n",  # TOML
        b'{"allowlist": [{"address": "10.0.0.1", "port": 1}], "allowlist": []}\n',
        b"allowlist:\n- {address: 127.0.0.1, address: 10.0.0.1, port: 1}\n",
        "allowlist:\n- {address: 127.0.0.1, port: \u00b2}\n".encode(),  # a digit to isdigit(), not to int()
        "allowlist:\n- address: 127.0.0.1\n  port: '\u00b2'\n".encode(),
    ],
    ids=[
        "not-utf8",
        "number",
        "json-list-is-number",
        "toml",
        "json-duplicate-key",
        "yaml-duplicate-key",
        "superscript-port",
        "quoted-superscript-port",
    ],
)
def test_a_bad_allowlist_file_is_a_coded_error(
    tmp_path: Path, run: Callable[..., tuple[int, str, str]], content: bytes
) -> None:
    config = tmp_path / "allow.yaml"
    config.write_bytes(content)
    uds = str(tmp_path / "vm.vsock")
    status, _out, err = run("vsock", "proxy", "--config", str(config), "--uds", uds, "8000", "127.0.0.1", "1")
    assert status == 2 and "E720" in err
    assert list(tmp_path.iterdir()) == [config]


def test_guest_proxy_refuses_an_allowlist_that_is_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "allow.yaml"
    config.write_bytes(b"allowlist:\n- {address: caf\xe9.lab, port: 1}\n")
    run = subprocess.run(
        [sys.executable, "-m", "teelab_guest.vsock_proxy", "--config", str(config), "8000", "x", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "not UTF-8" in run.stderr and "Traceback" not in run.stderr
