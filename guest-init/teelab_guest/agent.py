"""The guest agent: runs commands for the host over the ``org.teelab.agent.0`` virtio-serial port.

Each request is served in its own thread, so a slow command does not hold up the others; responses are written
whole, under a lock, one JSON line each.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from teelab_guest import protocol


class Agent:
    """Serves agent requests read from ``fd``; ``poweroff`` is called after answering a poweroff request."""

    def __init__(self, fd: int, poweroff: Callable[[], None], started: float) -> None:
        self.fd = fd
        self.poweroff = poweroff
        self.started = started
        self._write_lock = threading.Lock()

    def serve_forever(self) -> None:
        buffer = bytearray()  # grown in place and searched from the new chunk on: a long line costs O(n)
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:  # the host end is not connected: wait for it
                time.sleep(0.05)
                continue
            searched = len(buffer)
            buffer += chunk
            while (end := buffer.find(b"\n", searched)) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                searched = 0
                if line.strip():
                    threading.Thread(target=self._serve_line, args=(line,), daemon=True).start()
            if len(buffer) > protocol.MAX_AGENT_LINE:
                buffer.clear()
                self._send({"id": None, "ok": False, "error": "request line too long"})

    def _serve_line(self, line: bytes) -> None:
        request_id = None
        try:
            request = protocol.decode_frame(line)
            request_id = request.get("id")
            reply = self.handle(request)
        except Exception as exc:  # any failure is reported to the host, never fatal to PID 1
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply["id"] = request_id
        self._send(reply)
        if reply.get("ok") and reply.get("op") == "poweroff":
            self.poweroff()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "uptime": round(time.monotonic() - self.started, 3)}
        if op == "exec":
            return run_command(request)
        if op == "poweroff":
            return {"ok": True, "op": "poweroff"}
        return {"ok": False, "error": f"unknown op {op!r}; known: {', '.join(protocol.AGENT_OPS)}"}

    def _send(self, message: dict[str, Any]) -> None:
        data = protocol.encode_frame(message)
        with self._write_lock:
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]


def run_command(request: dict[str, Any]) -> dict[str, Any]:
    argv = request.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return {"ok": False, "error": "exec needs argv: a non-empty list of strings"}
    env = dict(protocol.GUEST_ENV)
    env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
    try:
        done = subprocess.run(
            argv,
            input=protocol.unb64(request.get("stdin")),
            capture_output=True,
            timeout=request.get("timeout"),
            env=env,
            cwd=request.get("cwd") or "/",
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return {"ok": False, "error": f"timed out after {exc.timeout} s", "timeout": True}
    except OSError as exc:
        return {"ok": False, "error": f"cannot run {argv[0]}: {exc}"}
    return {"ok": True, "rc": done.returncode, "stdout": protocol.b64(done.stdout),
            "stderr": protocol.b64(done.stderr)}  # fmt: skip
