"""Start and stop the lab KMS: in this process on its own event-loop thread, or as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from harness.aio import EventLoopThread
from harness.kms.admission import Admission, Limits, raise_fd_limit, within
from harness.kms.base import ServiceConfig
from harness.kms.errors import KmsError, ServerStartError
from harness.kms.recipient import Verifier
from harness.kms.server import DEFAULT_MAX_BODY, KmsHttp
from harness.kms.service import KmsService
from harness.kms.store import Credentials, KeyRecord, Store
from harness.kms.tls import ensure_certificate, server_context

MAX_BODY_LIMIT = 16 << 20  # bodies are read whole into memory: the cap itself is capped


@dataclass(frozen=True)
class Listen:
    """Where the KMS listens: loopback host and port (0: any free one) or a Unix socket; TLS optional;
    ``limits`` caps open connections and how long a request may take to arrive."""

    host: str = "127.0.0.1"
    port: int = 0
    unix_path: Path | None = None
    tls: bool = False
    max_body: int = DEFAULT_MAX_BODY
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        within("port", self.port, 0, 65535)
        within("max body", self.max_body, 1, MAX_BODY_LIMIT)


def default_verifier(lab_dir: Path | None = None, tdx_collateral: Path | None = None) -> Verifier:
    from harness.kms.recipient import AttestVerifier

    return AttestVerifier(lab_dir, tdx_collateral)


def policy_text(policy: str | dict[str, Any] | None) -> str | None:
    return json.dumps(policy, indent=2) if isinstance(policy, dict) else policy


class KmsServer:
    """A KMS serving from this process; ``endpoint`` is ``http(s)://127.0.0.1:PORT`` or ``unix:PATH``."""

    def __init__(
        self,
        kms_dir: Path,
        listen: Listen | None = None,
        *,
        verifier: Verifier | None = None,
        config: ServiceConfig | None = None,
        lab_dir: Path | None = None,
        tdx_collateral: Path | None = None,
        master_key_file: Path | None = None,
    ) -> None:
        self.kms_dir = kms_dir
        self.listen = listen or Listen()
        verifier = verifier or default_verifier(lab_dir, tdx_collateral)  # a bad collateral cache: no store
        self.store = Store.open(kms_dir, master_key_file)
        self.store.purge_deleted()
        self.service = KmsService(self.store, verifier, config)
        self.http = KmsHttp(self.service, max_body=self.listen.max_body)
        self._loop: EventLoopThread | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.admission: Admission | None = None
        self.endpoint = ""
        self._stopped = False

    @classmethod
    def start(cls, kms_dir: Path, listen: Listen | None = None, **kwargs: Any) -> KmsServer:
        """Open the store in ``kms_dir`` and listen; ServerStartError if it cannot."""
        server = cls(kms_dir, listen, **kwargs)
        raise_fd_limit()
        server._loop = EventLoopThread(name="teelab-kms")
        try:
            server.endpoint = server._loop.run(server._serve(), timeout=30)
        except BaseException:
            server.stop()
            raise
        return server

    async def _serve(self) -> str:
        listen = self.listen
        app = self.http.app()
        # aiohttp's idle timeout matches the admission deadline (its default is an hour)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=listen.limits.request_timeout
        )
        admission = self.admission = Admission(listen.limits, listen.max_body)
        app.middlewares.append(admission.middleware)
        await self._runner.setup()
        admission.factory = self._runner.server
        try:
            context = server_context(self.kms_dir) if listen.tls else None
        except OSError as exc:  # ssl.SSLError is one
            await self._runner.cleanup()
            raise ServerStartError(
                f"KMS cannot load its TLS certificate from {self.kms_dir / 'tls'}: {exc.strerror or exc}",
                hint=f"remove {self.kms_dir / 'tls'} to have a new lab certificate made",
            ) from None
        loop = asyncio.get_running_loop()
        handshake = listen.limits.request_timeout if context is not None else None
        try:
            if listen.unix_path is not None:
                self._listener = await loop.create_unix_server(
                    admission.protocol,
                    str(listen.unix_path),
                    ssl=context,
                    backlog=admission.backlog,
                    ssl_handshake_timeout=handshake,
                )
                return f"unix:{listen.unix_path}"
            self._listener = await loop.create_server(
                admission.protocol,
                listen.host,
                listen.port,
                ssl=context,
                backlog=admission.backlog,
                reuse_address=True,
                ssl_handshake_timeout=handshake,
            )
        except (OSError, OverflowError) as exc:
            await self._runner.cleanup()
            where = listen.unix_path or f"{listen.host}:{listen.port}"
            raise ServerStartError(
                f"KMS cannot listen on {where}: {getattr(exc, 'strerror', None) or exc}",
                hint="pick another port or socket path",
            ) from None
        port = self._listener.sockets[0].getsockname()[1]
        host = f"[{listen.host}]" if ":" in listen.host else listen.host
        return f"{'https' if listen.tls else 'http'}://{host}:{port}"

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def ca_certificate(self) -> Path | None:
        """The lab CA that signed the server certificate (TLS only)."""
        return ensure_certificate(self.kms_dir)[0] if self.listen.tls else None

    def create_key(self, policy: str | dict[str, Any] | None = None, description: str = "") -> KeyRecord:
        """A new key with ``policy`` (JSON text or dict; None = the default policy), durable on return."""
        from harness.kms.policy import KeyPolicy, default_policy

        text = policy_text(policy) or default_policy(self.store.account)
        KeyPolicy.parse(text)
        return self.store.create_key(text, description)

    def set_account_policy(self, policy: str | dict[str, Any] | None) -> None:
        """The policy of key-less operations (CreateKey, ListKeys, GenerateRandom); None restores the default
        (lab credentials may do all three; nobody else)."""
        from harness.kms.policy import KeyPolicy

        text = policy_text(policy)
        if text is not None:
            KeyPolicy.parse(text)
        self.store.set_account_policy(text)

    def credentials(self, name: str = "admin") -> Credentials:
        return self.store.issue_credentials(name)

    def stop(self) -> None:
        """Stop listening, flush the store, remove a Unix socket; safe to call twice."""
        if self._loop is not None:
            with contextlib.suppress(TimeoutError, RuntimeError):
                self._loop.run(self._close(), timeout=10)
            self._loop.close()
            self._loop = None
        if not self._stopped:
            self._stopped = True
            with contextlib.suppress(KmsError):  # refusals counted, not logged, become one chained row each
                self.store.submit(Store.flush_refusals(0.0)).result(timeout=30)
        self.store.close()
        if self.listen.unix_path is not None:
            Path(self.listen.unix_path).unlink(missing_ok=True)

    def __enter__(self) -> KmsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(
    kms_dir: Path,
    listen: Listen,
    *,
    lab_dir: Path | None = None,
    tdx_collateral: Path | None = None,
    master_key_file: Path | None = None,
    ready: Any = None,
    profile: Path | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; print one JSON ready line ``{"endpoint", "pid"}`` to ``ready``.
    With ``profile``, the event-loop thread (where requests are served) is profiled into that pstats file."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = KmsServer.start(
        kms_dir, listen, lab_dir=lab_dir, tdx_collateral=tdx_collateral, master_key_file=master_key_file
    )
    profiler = None
    if profile is not None and server._loop is not None:
        import cProfile

        profiler = cProfile.Profile()
        server._loop.call(profiler.enable)
    try:
        out = ready or sys.stdout
        print(json.dumps({"endpoint": server.endpoint, "pid": os.getpid()}), file=out, flush=True)
        stop.wait()
    finally:
        if profiler is not None and server._loop is not None:
            server._loop.call(profiler.disable)
            profiler.dump_stats(str(profile))
        server.stop()


class KmsProcess:
    """A KMS in a subprocess (``python -m harness.kms``), for isolation, benchmarks and crash tests."""

    def __init__(
        self,
        kms_dir: Path,
        listen: Listen | None = None,
        *,
        lab_dir: Path | None = None,
        env: dict[str, str] | None = None,
        profile: Path | None = None,
    ) -> None:
        self.kms_dir = kms_dir
        self.lab_dir = lab_dir
        self.profile = profile
        self.listen = listen or Listen()
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.endpoint = ""
        self.log_path = kms_dir / "server.log"

    def start(self, timeout: float = 30) -> KmsProcess:
        listen = self.listen
        argv = [
            sys.executable,
            "-m",
            "harness.kms",
            "--kms-dir",
            str(self.kms_dir),
            "--host",
            listen.host,
            "--port",
            str(listen.port),
            "--max-body",
            str(listen.max_body),
            "--max-connections",
            str(listen.limits.max_connections),
            "--request-timeout",
            str(listen.limits.request_timeout),
        ]
        if listen.unix_path is not None:
            argv += ["--unix", str(listen.unix_path)]
        if listen.tls:
            argv.append("--tls")
        if self.lab_dir is not None:
            argv += ["--lab-ca", str(self.lab_dir)]
        if self.profile is not None:
            argv += ["--profile", str(self.profile)]
        self.kms_dir.mkdir(parents=True, exist_ok=True)
        # The server's log goes to a file, not a pipe: nobody reads a pipe while it runs, and a full one
        # would stall the server at its next warning.
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, **(self.env or {})},
            )
        line = _readline(self.proc, timeout)
        if not line:
            self.kill()
            err = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise ServerStartError("KMS subprocess did not report ready", stderr=err[-2000:])
        self.endpoint = json.loads(line)["endpoint"]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> KmsProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(
        target=lambda: result.append(proc.stdout.readline() if proc.stdout else ""), daemon=True
    )
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""
