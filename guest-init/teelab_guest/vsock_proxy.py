"""vsock-proxy: forward vsock connections on a local port to a TCP address that an allowlist names.

    python3 -m teelab_guest.vsock_proxy [--config FILE] <local_port> <remote_addr> <remote_port>

As AWS's vsock-proxy: the allowlist is YAML ``allowlist: [{address: HOST, port: N}, ...]``; the port must
match, then the host name or one of the addresses it resolves to. Guests have no PyYAML, so this module
parses the small subset the format needs by hand (block or flow list items, flow or block mappings, quoted
or plain scalars, comments) and also takes JSON; the harness uses this same parser, so the two cannot drift.
Stdlib only.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading

DEFAULT_CONFIG = "/etc/teelab/vsock-proxy.yaml"
KEYS = ("address", "port")
CHUNK = 256 * 1024


class AllowlistError(ValueError):
    """The allowlist text is not in the supported subset; the message names the line."""


# -- the allowlist --------------------------------------------------------------------------------
def parse_allowlist(text: str) -> list[tuple[str, int]]:
    """``[(address, port), ...]`` from YAML (the subset above) or JSON text."""
    if text.lstrip().startswith("{"):
        import json

        try:
            data = json.loads(text)
        except ValueError as exc:
            raise AllowlistError(f"not valid JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) - {"allowlist"}:
            raise AllowlistError("the JSON must be an object with only an 'allowlist' key")
        return [_entry(item, f"item {i + 1}") for i, item in enumerate(data.get("allowlist") or [])]
    return [_entry(item, where) for item, where in _yaml_items(text)]


def _entry(item: object, where: str) -> tuple[str, int]:
    if not isinstance(item, dict):
        raise AllowlistError(f"{where}: an allowlist entry must be a mapping with address and port")
    unknown = sorted(set(item) - set(KEYS))
    if unknown or set(item) != set(KEYS):
        raise AllowlistError(f"{where}: an entry needs exactly 'address' and 'port' (got {sorted(item)})")
    address, port = item["address"], item["port"]
    if isinstance(port, str) and port.isdigit():
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
    if text.isdigit():
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
    return dict(_pair(part, where) for part in _split_flow(text[1:-1], where))


def _yaml_items(text: str) -> list[tuple[dict[str, object], str]]:
    lines = [(n + 1, _strip_comment(raw)) for n, raw in enumerate(text.splitlines())]
    lines = [(n, line) for n, line in lines if line.strip() and line.strip() not in ("---", "...")]
    items: list[tuple[dict[str, object], str]] = []
    seen_key = False
    current: dict[str, object] | None = None
    item_indent = -1
    for number, line in lines:
        where = f"line {number}"
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if indent == 0 and not body.startswith("-"):
            key, sep, rest = body.partition(":")
            if key.strip() != "allowlist" or not sep:
                raise AllowlistError(f"{where}: only an 'allowlist:' key is allowed at the top level")
            if seen_key:
                raise AllowlistError(f"{where}: 'allowlist' given twice")
            seen_key = True
            rest = rest.strip()
            if rest.startswith("[") and rest.endswith("]"):
                inner = rest[1:-1].strip()
                chunks = _split_flow_items(inner, where)
                items.extend((_flow_mapping(chunk, where), where) for chunk in chunks)
            elif rest:
                raise AllowlistError(f"{where}: 'allowlist:' must be followed by a list")
            continue
        if not seen_key:
            raise AllowlistError(f"{where}: list items before 'allowlist:'")
        if body.startswith("-"):
            rest = body[1:].strip()
            item_indent = indent
            if rest.startswith("{"):
                current = None
                items.append((_flow_mapping(rest, where), where))
            elif rest:
                key, value = _pair(rest, where)
                current = {key: value}
                items.append((current, where))
            else:
                current = {}
                items.append((current, where))
        elif current is not None and indent > item_indent:
            key, value = _pair(body, where)
            if key in current:
                raise AllowlistError(f"{where}: {key!r} given twice in one entry")
            current[key] = value
        else:
            raise AllowlistError(f"{where}: cannot read {body!r}")
    if not seen_key:
        raise AllowlistError("no 'allowlist:' key")
    return items


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
    with open(path, encoding="utf-8") as f:
        return parse_allowlist(f.read())


def _addresses(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()


def allowed(allowlist: list[tuple[str, int]], address: str, port: int, resolve=_addresses) -> bool:
    """Whether ``address:port`` may be reached: a matching port, then the name or one of its addresses."""
    entries = [host for host, p in allowlist if p == port]
    if address in entries:
        return True
    wanted = resolve(address) or {address}
    return any(wanted & resolve(host) for host in entries)


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


def forward(client: socket.socket, remote: tuple[str, int], timeout: float = 10.0) -> None:
    """Join ``client`` to a new TCP connection to ``remote`` until both directions end."""
    try:
        upstream = socket.create_connection(remote, timeout=timeout)
    except OSError as exc:
        print(f"vsock-proxy: cannot reach {remote[0]}:{remote[1]}: {exc}", file=sys.stderr, flush=True)
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def serve(listener: socket.socket, remote: tuple[str, int], stop: threading.Event | None = None) -> None:
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
        threading.Thread(target=forward, args=(client, remote), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="vsock-proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"allowlist file (default {DEFAULT_CONFIG})")
    parser.add_argument("local_port", type=int, help="vsock port to listen on")
    parser.add_argument("remote_addr", help="host name or IP address to forward to")
    parser.add_argument("remote_port", type=int, help="TCP port to forward to")
    args = parser.parse_args(argv)
    try:
        allowlist = load_allowlist(args.config)
    except (OSError, AllowlistError) as exc:
        print(f"vsock-proxy: bad allowlist {args.config}: {exc}", file=sys.stderr)
        return 2
    if not allowed(allowlist, args.remote_addr, args.remote_port):
        print(
            f"vsock-proxy: {args.remote_addr}:{args.remote_port} is not in the allowlist {args.config}",
            file=sys.stderr,
        )
        return 2
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, args.local_port))
    listener.listen(128)
    print(f"vsock-proxy: port {args.local_port} -> {args.remote_addr}:{args.remote_port}", flush=True)
    serve(listener, (args.remote_addr, args.remote_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
