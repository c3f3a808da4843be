"""Stand-in lab hosts: OpenSSH servers on loopback ports of this machine, each with its own host key, for the
tests that reach lab hosts over SSH (teelab fleet, --host, the libvirt backend's qemu+ssh:// URIs)."""

from __future__ import annotations

import contextlib
import shlex
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
PRIVSEP = Path("/run/sshd")  # sshd's privilege separation directory


@dataclass
class StandIn:
    """One sshd: its port, its host key's public half and its process."""

    name: str
    port: int
    host_key: str
    process: subprocess.Popen[bytes]
    log: Path

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key.strip()}\n"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return Path(f"{path}.pub").read_text()


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"sshd on {port} did not listen")


@contextlib.contextmanager
def privsep_dir() -> Iterator[None]:
    """sshd's privilege separation directory, made for the test when the machine has none."""
    made = not PRIVSEP.exists()
    PRIVSEP.mkdir(mode=0o755, exist_ok=True)
    try:
        yield
    finally:
        if made:
            PRIVSEP.rmdir()


def start_sshd(
    folder: Path,
    name: str,
    authorized_keys: Path,
    *,
    extra_config: str = "",
    wrap: Callable[[str], list[str]] = shlex.split,
) -> StandIn:
    """An sshd for ``name`` on a free loopback port, with a fresh host key in ``folder``, root logins by the
    keys in ``authorized_keys`` only. ``wrap`` turns the sshd command line into the argv that runs it (an
    ``unshare`` around it, say)."""
    host_key = keygen(folder / f"{name}_key")
    port = free_port()
    config = folder / f"{name}.conf"
    config.write_text(textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {folder}/{name}_key
        PidFile {folder}/{name}.pid
        AuthorizedKeysFile {authorized_keys}
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        Subsystem sftp internal-sftp
        """) + extra_config)  # fmt: skip
    log_path = folder / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(wrap(f"{SSHD} -D -e -f {config}"), stderr=log, stdout=subprocess.DEVNULL)
    stand_in = StandIn(name, port, host_key, process, log_path)
    try:
        wait_listening(port)
    except AssertionError:
        stand_in.stop()
        raise
    return stand_in
