"""vsock-proxy: forward vsock connections on a local port to a TCP address that an allowlist names.

    python3 -m teelab_guest.vsock_proxy [--config FILE] <local_port> <remote_addr> <remote_port>

As AWS's vsock-proxy: the allowlist is YAML ``allowlist: [{address: HOST, port: N}, ...]``; the port must
match, then the host name or one of the addresses it resolves to. The target is resolved once, when it is
checked, and every connection goes to the addresses that passed, never to the name again (a name that later
resolves elsewhere cannot lead off the list). A target ``vsock:CID`` forwards to that CID over vsock instead
of TCP (a parent passing its enclaves on to the host, CID 2); it passes only when the allowlist names it
exactly (``address: "vsock:2"``). Guests have no PyYAML, so this module
parses the small subset the format needs by hand (block or flow list items, flow or block mappings, quoted
or plain scalars, comments) and also takes JSON; the harness uses this same parser, so the two cannot drift.
Stdlib only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
import threading
from collections.abc import Callable, Sequence

DEFAULT_CONFIG = "/etc/teelab/vsock-proxy.yaml"
KEYS = ("address", "port")
CHUNK = 256 * 1024


Resolver = Callable[[str], list[str]]


class AllowlistError(ValueError):
    """The allowlist text is not in the supported subset; the message names the line."""


class TargetRefused(ValueError):
    """The target is not on the allowlist (or does not resolve); the message says which rule failed."""


# -- the allowlist --------------------------------------------------------------------------------
def parse_allowlist(text: str) -> list[tuple[str, int]]:
    """``[(address, port), ...]`` from YAML (the subset above) or JSON text."""
    if text.lstrip().startswith("{"):
        import json

        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except ValueError as exc:  # AllowlistError from the hook is a ValueError too
            raise AllowlistError(f"not valid JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) - {"allowlist"}:
            raise AllowlistError("the JSON must be an object with only an 'allowlist' key")
        items = data.get("allowlist")
        if not isinstance(items, list | None):
            raise AllowlistError(f"'allowlist' must be a list, not {type(items).__name__}")
        return [_entry(item, f"item {i + 1}") for i, item in enumerate(items or [])]
    return [_entry(item, where) for item, where in _yaml_items(text)]


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object's pairs as a dict; a key given twice is refused (json.loads would keep the last)."""
    data: dict[str, object] = {}
    for key, value in pairs:
        if key in data:
            raise AllowlistError(f"{key!r} given twice in one object")
        data[key] = value
    return data


def _entry(item: object, where: str) -> tuple[str, int]:
    if not isinstance(item, dict):
        raise AllowlistError(f"{where}: an allowlist entry must be a mapping with address and port")
    unknown = sorted(set(item) - set(KEYS))
    if unknown or set(item) != set(KEYS):
        raise AllowlistError(f"{where}: an entry needs exactly 'address' and 'port' (got {sorted(item)})")
    address, port = item["address"], item["port"]
    if isinstance(port, str) and port.isascii() and port.isdigit():
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise AllowlistError(f"{where}: port {port!r} is not a TCP port number")
    if not isinstance(address, str) or not address:
        raise AllowlistError(f"{where}: address must be a host name or an IP address")
    return address, port


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str, where: str) -> object:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if not text:
        raise AllowlistError(f"{where}: empty value")
    if text.isascii() and text.isdigit():  # '²' is a digit to isdigit() but not to int()
        return int(text)
    if text[0] in "[{&*!|>%@`":
        raise AllowlistError(f"{where}: {text!r} is outside the supported YAML subset")
    return text


def _split_flow(text: str, where: str) -> list[str]:
    parts, quote, start = [], "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == ",":
            parts.append(text[start:i])
            start = i + 1
    if quote:
        raise AllowlistError(f"{where}: unterminated quote")
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _pair(text: str, where: str) -> tuple[str, object]:
    key, sep, value = text.partition(":")
    if not sep or not key.strip():
        raise AllowlistError(f"{where}: expected 'key: value', got {text.strip()!r}")
    return key.strip().strip("'\""), _scalar(value, where)


def _flow_mapping(text: str, where: str) -> dict[str, object]:
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise AllowlistError(f"{where}: expected a '{{address: ..., port: ...}}' mapping")
    mapping: dict[str, object] = {}
    for part in _split_flow(text[1:-1], where):
        key, value = _pair(part, where)
        if key in mapping:
            raise AllowlistError(f"{where}: {key!r} given twice in one entry")
        mapping[key] = value
    return mapping


def _yaml_items(text: str) -> list[tuple[dict[str, object], str]]:
    reader = _YamlAllowlist()
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if line.strip() and line.strip() not in ("---", "..."):
            reader.line(line, f"line {number}")
    if not reader.seen_key:
        raise AllowlistError("no 'allowlist:' key")
    return reader.items


class _YamlAllowlist:
    """The YAML subset an allowlist file is written in, read line by line into (entry, where) items."""

    def __init__(self) -> None:
        self.items: list[tuple[dict[str, object], str]] = []
        self.seen_key = False
        self.current: dict[str, object] | None = None  # the block entry lines may still add to
        self.item_indent = -1

    def line(self, line: str, where: str) -> None:
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if indent == 0 and not body.startswith("-"):
            self._top_level(body, where)
        elif not self.seen_key:
            raise AllowlistError(f"{where}: list items before 'allowlist:'")
        elif body.startswith("-"):
            self.item_indent = indent
            self._item(body[1:].strip(), where)
        elif self.current is not None and indent > self.item_indent:
            key, value = _pair(body, where)
            if key in self.current:
                raise AllowlistError(f"{where}: {key!r} given twice in one entry")
            self.current[key] = value
        else:
            raise AllowlistError(f"{where}: cannot read {body!r}")

    def _top_level(self, body: str, where: str) -> None:
        key, sep, rest = body.partition(":")
        if key.strip() != "allowlist" or not sep:
            raise AllowlistError(f"{where}: only an 'allowlist:' key is allowed at the top level")
        if self.seen_key:
            raise AllowlistError(f"{where}: 'allowlist' given twice")
        self.seen_key = True
        rest = rest.strip()
        if rest.startswith("[") and rest.endswith("]"):
            chunks = _split_flow_items(rest[1:-1].strip(), where)
            self.items.extend((_flow_mapping(chunk, where), where) for chunk in chunks)
        elif rest:
            raise AllowlistError(f"{where}: 'allowlist:' must be followed by a list")

    def _item(self, rest: str, where: str) -> None:
        if rest.startswith("{"):
            self.current = None
            self.items.append((_flow_mapping(rest, where), where))
            return
        if rest:
            key, value = _pair(rest, where)
            self.current = {key: value}
        else:
            self.current = {}
        self.items.append((self.current, where))


def _split_flow_items(text: str, where: str) -> list[str]:
    """The ``{...}`` items of a flow sequence ``[{...}, {...}]``."""
    items, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0 and start is not None:
                items.append(text[start : i + 1])
                start = None
            if depth < 0:
                raise AllowlistError(f"{where}: unbalanced braces")
    if depth:
        raise AllowlistError(f"{where}: unbalanced braces")
    return items


def load_allowlist(path: str) -> list[tuple[str, int]]:
    """The allowlist in the file at ``path``; OSError if it cannot be read, AllowlistError if it is bad."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AllowlistError(f"not UTF-8 text (byte {exc.start})") from None
    return parse_allowlist(text)


# -- the target -----------------------------------------------------------------------------------
def system_addresses(host: str) -> list[str]:
    """The addresses ``host`` resolves to through the system's resolver (getaddrinfo), in its order."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def vsock_cid(address: str) -> int | None:
    """The CID of a ``vsock:CID`` target, None for a host name or an IP address."""
    kind, _, cid = address.partition(":")
    if kind != "vsock":
        return None
    if not (cid.isascii() and cid.isdigit()) or not 0 < int(cid) < 2**32 - 1:
        raise TargetRefused(f"{address!r} is not vsock:CID")
    return int(cid)


def _addresses(host: str, resolve: Resolver) -> list[str]:
    if host.startswith("vsock:"):
        return [f"vsock:{vsock_cid(host)}"]  # a vsock target is its own address: no lookup
    try:
        return [str(ipaddress.ip_address(host))]  # a literal is its own address: no lookup
    except ValueError:
        return resolve(host)


def checked_addresses(
    allowlist: list[tuple[str, int]], host: str, port: int, resolve: Resolver = system_addresses
) -> list[str]:
    """The addresses of ``host`` that ``port`` may be reached at: a matching port, then ``host`` by name
    (all its addresses) or those of its addresses that an allowed name resolves to. ``host`` is resolved
    once, here; connect only to what this returns. TargetRefused says why nothing passed."""
    names = [name for name, p in allowlist if p == port]
    if not names:
        raise TargetRefused(f"no allowlist entry has port {port}")
    addresses = _addresses(host, resolve)
    if not addresses:
        raise TargetRefused(f"{host} does not resolve to an address")
    if host in names:
        return addresses
    admitted = {address for name in names for address in _addresses(name, resolve)}
    passed = [address for address in addresses if address in admitted]
    if not passed:
        raise TargetRefused(f"{host} ({', '.join(addresses)}) is not on the allowlist for port {port}")
    return passed


# -- forwarding -----------------------------------------------------------------------------------
def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def connect(addresses: Sequence[str], port: int, timeout: float) -> socket.socket:
    """A connection to the first of ``addresses`` (IP addresses or ``vsock:CID``, not names) that answers on
    ``port``: TCP, or vsock for a ``vsock:CID``."""
    error: OSError = OSError(f"no address to connect to for port {port}")
    for address in addresses:
        cid = vsock_cid(address)
        if cid is not None:
            upstream = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            upstream.settimeout(timeout)
            try:
                upstream.connect((cid, port))
            except OSError as exc:
                upstream.close()
                error = exc
                continue
            return upstream
        try:
            upstream = socket.create_connection((address, port), timeout=timeout)
        except OSError as exc:
            error = exc
            continue
        # Relay each write at once: a client's request head and body arrive as two writes, and Nagle would
        # hold the second until the KMS's delayed ACK of the first (40 ms on Linux) on a kept connection.
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return upstream
    raise error


def forward(client: socket.socket, addresses: Sequence[str], port: int, timeout: float = 10.0) -> None:
    """Join ``client`` to a new TCP connection to ``port`` at one of ``addresses`` (those checked against the
    allowlist) until both directions end."""
    try:
        upstream = connect(addresses, port, timeout)
    except OSError as exc:
        print(f"vsock-proxy: cannot reach {addresses} port {port}: {exc}", file=sys.stderr, flush=True)
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def serve(
    listener: socket.socket, addresses: Sequence[str], port: int, stop: threading.Event | None = None
) -> None:
    """Accept on ``listener`` (any stream socket) and forward each connection in its own thread."""
    listener.settimeout(0.5)
    while stop is None or not stop.is_set():
        try:
            client, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            break
        client.settimeout(None)
        threading.Thread(target=forward, args=(client, addresses, port), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="vsock-proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"allowlist file (default {DEFAULT_CONFIG})")
    parser.add_argument("local_port", type=int, help="vsock port to listen on")
    parser.add_argument("remote_addr", help="host name, IP address or vsock:CID to forward to")
    parser.add_argument("remote_port", type=int, help="TCP (or vsock) port to forward to")
    args = parser.parse_args(argv)
    try:
        allowlist = load_allowlist(args.config)
    except (OSError, AllowlistError) as exc:
        print(f"vsock-proxy: bad allowlist {args.config}: {exc}", file=sys.stderr)
        return 2
    try:
        addresses = checked_addresses(allowlist, args.remote_addr, args.remote_port)
    except TargetRefused as exc:
        print(f"vsock-proxy: refused by the allowlist {args.config}: {exc}", file=sys.stderr)
        return 2
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, args.local_port))
    listener.listen(128)
    print(f"vsock-proxy: port {args.local_port} -> {args.remote_addr}:{args.remote_port}", flush=True)
    serve(listener, addresses, args.remote_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
