"""A real swtpm for unit tests: a vTPM manufactured by the lab TPM manufacturer CA, its TPM commands on a
data socket (no VM), driven by the same code the guest runs (``teelab_guest.tpm_device.Tpm``)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from teelab_guest.tpm_device import Tpm

from harness.aio import die_with_parent
from harness.attest.tpm_ca import TpmAuthority
from harness.tee.vtpm import Vtpm


@contextmanager
def swtpm(authority: TpmAuthority, name: str = "unit") -> Iterator[Tpm]:
    """A started, manufactured TPM 2.0 whose commands go over a socket; everything is gone afterwards."""
    vtpm = Vtpm(name, authority=authority)
    process = None
    try:
        vtpm.state_dir.mkdir(parents=True)
        vtpm.manufacture()
        data = vtpm.folder / "data.sock"
        process = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={vtpm.state_dir}",
             "--server", f"type=unixio,path={data}", "--ctrl", f"type=unixio,path={vtpm.socket}",
             "--flags", "not-need-init,startup-clear"],
            preexec_fn=die_with_parent(),
        )  # fmt: skip
        with _connect(data, process) as sock:
            yield Tpm(lambda command: _transact(sock, command))
    finally:
        if process is not None:
            process.kill()
            process.wait()
        vtpm.close()


@contextmanager
def _connect(path: object, process: subprocess.Popen[bytes]) -> Iterator[socket.socket]:
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(str(path))
            break
        except OSError:
            sock.close()
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with sock:
        yield sock


def _transact(sock: socket.socket, command: bytes) -> bytes:
    sock.sendall(command)
    response = _read(sock, 6)
    return response + _read(sock, int.from_bytes(response[2:6], "big") - 6)


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("swtpm closed the data socket")
        data += chunk
    return data
