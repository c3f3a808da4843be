"""libvirt connection URIs: a local one (``qemu:///system``) is used as given; a ``qemu+ssh://`` one is taken
apart so the harness can reach the same host over SSH with the same key and the same pinned host keys.

libvirt's ssh transport runs the ``ssh`` binary, which reads ``~/.ssh/config`` and asks about unknown host
keys (libvirt's ``known_hosts=`` parameter applies to its libssh transports only). The harness therefore hands
libvirt its own ssh command (``command=``): the same binary with ``-F /dev/null`` and strict checking against
exactly the known_hosts file of the URI, so an unknown or changed host key fails closed, as it does for the
harness's paramiko session to that host.
"""

from __future__ import annotations

import getpass
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from harness.host.remote import FleetHost
from harness.libvirt.errors import RemoteUriRefused

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
LIBVIRT_PATHS = ("/system", "/session")
OWN_PARAMS = ("keyfile", "known_hosts", "no_tty", "no_verify", "command")


@dataclass(frozen=True)
class RemoteUri:
    """A ``qemu+ssh://`` URI taken apart: where libvirtd is, how SSH reaches it, the host keys it must have.
    ``params`` are the URI's other parameters, passed to libvirt unchanged."""

    uri: str
    user: str
    host: str
    port: int
    path: str
    keyfile: Path | None
    known_hosts: Path
    params: tuple[tuple[str, str], ...] = ()

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def libvirt_uri(self, ssh_command: Path) -> str:
        """The URI libvirt opens: the same host, with ``ssh_command`` (see ``ssh_wrapper``) as its ssh and no
        prompts (``no_tty=1``)."""
        query = [("keyfile", str(self.keyfile))] if self.keyfile else []
        query += [*self.params, ("no_tty", "1"), ("command", str(ssh_command))]
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = f"{quote(self.user, safe='')}@{host}:{self.port}"
        return urlunsplit(("qemu+ssh", netloc, self.path, urlencode(query, quote_via=quote, safe="/"), ""))

    def ssh_options(self) -> list[str]:
        """Options that make ``ssh`` check host keys against this URI's known_hosts alone and fail closed.
        They come first on the command line, where ssh's first value of an option wins."""
        options = [
            "-F", "/dev/null",  # no ~/.ssh/config: libvirt, the forwarder and paramiko reach the same host
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "UpdateHostKeys=no",
            "-o", "BatchMode=yes",
        ]  # fmt: skip
        if self.keyfile is not None:
            options += ["-o", "IdentitiesOnly=yes", "-i", str(self.keyfile)]
        return options

    def ssh_argv(self, ssh: str, *arguments: str) -> list[str]:
        """``ssh`` to this host with ``ssh_options`` and ``arguments`` (``-N -L ...``)."""
        return [ssh, *self.ssh_options(), *arguments, "-p", str(self.port), "-l", self.user, "--", self.host]

    def ssh_wrapper(self, ssh: str) -> str:
        """A script for libvirt's ``command=``: ``ssh`` with ``ssh_options`` before libvirt's arguments."""
        return f'#!/bin/sh\nexec {shlex.join([ssh, *self.ssh_options()])} "$@"\n'

    def fleet_host(self) -> FleetHost:
        """This host as ``harness.host.remote`` reaches it with paramiko."""
        variables = {"ansible_ssh_private_key_file": str(self.keyfile)} if self.keyfile else {}
        return FleetHost(self.host, self.host, self.port, self.user, variables=variables)


def parse_uri(uri: str | None) -> RemoteUri | None:
    """None for a local URI (no host: ``qemu:///system``, ``test:///default``); the parts of a ``qemu+ssh://``
    URI; ``RemoteUriRefused`` (E463) for anything else, before anything is opened."""
    if not uri:
        return None
    parts = urlsplit(uri)
    driver, _, transport = parts.scheme.partition("+")
    if not parts.netloc and transport in ("", "unix"):
        return None
    if transport != "ssh" or driver != "qemu":
        raise _refused(uri, f"the {transport or 'tls'} transport of {parts.scheme}:// is not supported here")
    try:
        port = parts.port or 22
    except ValueError:
        raise _refused(uri, "the port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise _refused(uri, "it names no host")
    if parts.password is not None:
        raise _refused(uri, "it holds a password; use a key (keyfile=) instead")
    path = parts.path or "/system"
    if path not in LIBVIRT_PATHS:
        raise _refused(uri, f"path {path!r} is neither /system nor /session")
    own, params = _split_params(uri, parts.query)
    keyfile = Path(own["keyfile"]).expanduser() if own.get("keyfile") else None
    if keyfile is not None and not keyfile.is_file():
        raise _refused(uri, f"keyfile {keyfile} is not a file")
    known_hosts = Path(own.get("known_hosts") or DEFAULT_KNOWN_HOSTS).expanduser()
    if any(ch.isspace() or ch == '"' for ch in str(known_hosts)):
        raise _refused(uri, f"known_hosts {known_hosts} holds a space or a quote, which ssh would split")
    user = unquote(parts.username) if parts.username else getpass.getuser()
    return RemoteUri(uri, user, parts.hostname, port, path, keyfile, known_hosts, params)


def _split_params(uri: str, query: str) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """The parameters the harness handles itself, and the others; refuses the ones that would defeat host
    key checking."""
    own: dict[str, str] = {}
    others = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "no_verify" and value not in ("", "0"):
            raise _refused(uri, "no_verify=1 would accept any host key")
        if name == "command":
            raise _refused(uri, "command= would replace the ssh that pins the host key")
        if name in OWN_PARAMS:
            own[name] = value
        else:
            others.append((name, value))
    return own, tuple(others)


def _refused(uri: str, why: str) -> RemoteUriRefused:
    return RemoteUriRefused(
        f"libvirt URI {uri!r} refused: {why}",
        hint="use qemu:///system, or qemu+ssh://user@host[:port]/system?keyfile=KEY&known_hosts=FILE with "
        "the host's key in FILE (default ~/.ssh/known_hosts), checked out of band",
        uri=uri,
    )
