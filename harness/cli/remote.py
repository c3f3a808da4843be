"""``teelab --host [USER@]HOST[:PORT] COMMAND ...``: the same command run on a lab host over SSH (paramiko,
the host key from known_hosts only), its output and exit status brought back."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.errors import UsageError
from harness.host.remote import FleetHost, RemoteHost, teelab_command

_TARGET = re.compile(r"(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[A-Za-z0-9.:_-]+?)(?::(?P<port>\d{1,5}))?")
LOCAL_OPTIONS = ("--host", "--known-hosts")  # what stays here; everything else goes to the host


def parse_target(text: str) -> FleetHost:
    """``user@host:port`` (user root and port 22 when left out)."""
    match = _TARGET.fullmatch(text)
    if match is None or not 0 < int(match["port"] or 22) < 65536:
        raise UsageError(f"--host {text!r} is not [USER@]HOST[:PORT]", hint="e.g. --host root@lab-genoa-01")
    variables = {"teelab_command": os.environ.get("TEELAB_REMOTE_TEELAB", "teelab")}
    if os.environ.get("TEELAB_SSH_KEY"):
        variables["ansible_ssh_private_key_file"] = os.environ["TEELAB_SSH_KEY"]
    return FleetHost(match["host"], match["host"], int(match["port"] or 22), match["user"] or "root",
                     variables=variables)  # fmt: skip


def remote_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without the options that only mean something here (``--host X``, ``--known-hosts F``)."""
    words, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in LOCAL_OPTIONS:
            skip = True
        elif not word.startswith(tuple(f"{o}=" for o in LOCAL_OPTIONS)):
            words.append(word)
    return words


def run_on_host(target: str, known_hosts: Path | None, argv: Sequence[str]) -> int:
    """Run ``teelab ARGV`` on the host; print what it printed; return its exit status."""
    host = parse_target(target)
    with RemoteHost(host, known_hosts=known_hosts) as remote:
        done = remote.run(teelab_command(host, *remote_argv(argv)), timeout=7200)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode
