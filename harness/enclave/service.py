"""The host end of ``teelab-enclave``: a parent's requests on host port 9102 (from that parent's VM only),
one per connection, answered in nitro-cli's JSON. The image travels in the request; a refusal carries its
code. ``console`` streams a debug enclave's console and is refused (E948) for a production one."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

from teelab_guest import pool_wire

from harness.enclave import errors
from harness.enclave.carver import Enclave, ParentVm
from harness.enclave.describe import describe_eif
from harness.errors import LabError

log = logging.getLogger(__name__)

MIB = 1 << 20
CHUNK = MIB
MAX_SESSIONS = 8  # a parent's concurrent requests; more are closed unanswered


class EnclaveApi:
    """Serves one parent's ``teelab-enclave`` requests until ``close()``."""

    def __init__(self, parent: ParentVm) -> None:
        self.parent = parent
        self._listener = parent.vsock.listen(pool_wire.ENCLAVE_API_PORT, vm=parent.name)
        self._closed = False
        self._sessions = threading.BoundedSemaphore(MAX_SESSIONS)
        self._thread = threading.Thread(target=self._accept, name=f"enclave-api-{parent.name}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _cid = self._listener.accept(timeout=0.5)
            except (TimeoutError, OSError, LabError):
                continue
            if not self._sessions.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn, _released(self._sessions):
            try:
                conn.settimeout(600)
                request = pool_wire.read_frame(conn)
                verb = request.get("verb")
                if verb == "console":
                    self._console(conn, request)
                    return
                answer = {"ok": True, "result": self.handle(request, conn)}
            except LabError as exc:
                answer = {"ok": False, "code": exc.code, "error": exc.message, "hint": exc.hint}
            except (ValueError, TypeError) as exc:
                answer = {"ok": False, "code": errors.EnclaveUnknown.code, "error": f"bad request: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall(pool_wire.encode(answer))

    def handle(self, request: dict[str, Any], conn: socket.socket) -> Any:
        """One verb; the image (run-enclave, describe-eif) is read from ``conn`` after the request line."""
        verb = request.get("verb")
        if verb == "describe-enclaves":
            return self.parent.describe()
        if verb == "terminate-enclave":
            if request.get("all"):
                return [self.parent.terminate(e) for e in list(self.parent.enclaves.values())]
            enclave = self.parent.find(_text(request.get("enclave_id")), _text(request.get("enclave_name")))
            return self.parent.terminate(enclave)
        if verb in ("run-enclave", "describe-eif"):
            # an image needs 4 x its size in enclave memory: none larger than a quarter of the pool can run
            fd = _receive_image(conn, request.get("eif_size"), self.parent.layout.pool.memory_mib * MIB // 4)
            try:
                path = f"/proc/self/fd/{fd}"
                if verb == "describe-eif":
                    return describe_eif(path)
                enclave = self.parent.carve(
                    path,
                    memory_mib=_int(request, "memory"),
                    cpu_count=request.get("cpu_count"),  # type: ignore[arg-type]
                    cpu_ids=tuple(request["cpu_ids"]) if request.get("cpu_ids") else None,
                    cid=request.get("enclave_cid"),  # type: ignore[arg-type]
                    name=_text(request.get("enclave_name")),
                    debug=bool(request.get("debug_mode")),
                )
                return _run_result(enclave)
            finally:
                os.close(fd)
        raise errors.EnclaveUnknown(
            f"unknown verb {verb!r}", hint=f"one of {', '.join((*pool_wire.VERBS, 'describe-eif'))}"
        )

    def _console(self, conn: socket.socket, request: dict[str, Any]) -> None:
        enclave = self.parent.find(_text(request.get("enclave_id")), _text(request.get("enclave_name")))
        if not enclave.debug:
            raise errors.ConsoleRefused(
                f"enclave {enclave.enclave_id} runs in production mode: it has no console",
                hint="run it with --debug-mode to read its console",
            )
        conn.sendall(pool_wire.encode({"ok": True, "result": {"EnclaveID": enclave.enclave_id}}))
        sent = 0
        while True:
            text = enclave.machine.console_text().encode()
            if len(text) > sent:
                try:
                    conn.sendall(text[sent:])
                except OSError:  # the reader went away: the stream ends, the enclave runs on
                    return
                sent = len(text)
            if not enclave.machine.running or self._closed:
                return
            time.sleep(0.1)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._thread.join(timeout=2)


@contextlib.contextmanager
def _released(semaphore: threading.BoundedSemaphore) -> Any:
    try:
        yield
    finally:
        semaphore.release()


def _receive_image(conn: socket.socket, size: object, limit: int) -> int:
    """The image's bytes (at most ``limit``) from ``conn`` into a memfd (its descriptor)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= limit:
        raise errors.EifInputInvalid(
            f"eif_size {size!r}: an image of this parent's pool is 1 to {limit:,} bytes",
            hint="an enclave needs 4 x its image in memory: shrink the image or grow the pool",
        )
    fd = os.memfd_create("teelab-eif", os.MFD_CLOEXEC)
    try:
        left = size
        while left:
            chunk = conn.recv(min(CHUNK, left))
            if not chunk:
                raise errors.EifTruncated(f"the image ended {left} bytes short", hint="send the whole file")
            os.write(fd, chunk)
            left -= len(chunk)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _run_result(enclave: Enclave) -> dict[str, Any]:
    """nitro-cli run-enclave's answer."""
    return {
        "EnclaveName": enclave.name,
        "EnclaveID": enclave.enclave_id,
        "ProcessID": enclave.machine.pid,
        "EnclaveCID": enclave.cid,
        "NumberOfCPUs": len(enclave.cpus),
        "CPUIDs": [c.vcpu for c in enclave.cpus],
        "MemoryMiB": enclave.memory_mib,
    }


def _int(request: dict[str, Any], key: str) -> int:
    value = request.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
