"""``teelab bench kms``: Decrypt with a Recipient (enclave attestation document) and plain signed Decrypt,
requests per second and p50/p99 latency at 1, 10 and 100 concurrent clients.

The KMS runs in a subprocess; this process is the load generator (aiohttp, one event loop), so the two compete
for the host's CPUs as a real deployment's client and server would. Request bodies, documents and signatures
are made before the clock starts; a sample of responses is opened after it stops to prove they are right.

``bench_kms_hostile`` measures the same open-loop load twice against one server: alone, then while another
process holds 1,000 half-open connections against it (a partial request head each, reopened as the server
closes them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from teelab_guest import kms_sigv4
from teelab_guest.kms_client import RecipientKey

from harness.bench.result import Bar, BenchResult
from harness.host import runtime
from harness.kms.admission import raise_fd_limit
from harness.kms.runner import KmsProcess, Listen
from harness.kms.store import Store

MODES = ("decrypt-recipient", "decrypt")
OPEN_RATE = 320.0  # offered load of the open-loop run: the 300 req/s bar plus a margin
# (mode, clients, open loop) -> bars: capacity >= 300 req/s closed-loop; at 320 req/s offered, p99 <= 50 ms.
BARS = {
    ("decrypt-recipient", 100, False): (Bar("rps", ">=", 300), Bar("errors", "<=", 0)),
    ("decrypt-recipient", 100, True): (Bar("rps", ">=", 300), Bar("p99", "<=", 50.0), Bar("errors", "<=", 0)),
}
REQUEST_TIMEOUT_S = 30.0  # a request unanswered this long counts as an error
ENCLAVE_PCR0 = bytes.fromhex("a5" * 48)


class KmsBenchResult(BenchResult):
    """Latency samples in ms, plus throughput and error count as figures the bars can name."""

    rps: float = 0.0
    errors: int = 0

    @property
    def figures(self) -> dict[str, float]:
        figures = super().figures
        if self.samples:
            ordered = sorted(self.samples)
            figures["p50"] = round(ordered[len(ordered) // 2], 3)
        figures["rps"] = round(self.rps, 1)
        figures["errors"] = float(self.errors)
        return figures


@dataclass(frozen=True)
class Prepared:
    """Ready-to-send requests (body, headers) and how to check an answer afterwards."""

    requests: list[tuple[bytes, dict[str, str]]]
    check: Callable[[dict[str, Any], int], None]


def _enclave_policy() -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "enclave image",
                "Effect": "Allow",
                "Principal": "*",
                "Action": "kms:Decrypt",
                "Condition": {
                    "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": ENCLAVE_PCR0.hex()},
                    "StringEquals": {"teelab:RecipientAttestation:Root": "lab"},
                },
            },
            {
                "Sid": "operator",
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::000000000000:root"},
                "Action": "kms:*",
            },
        ],
    }


def prepare(kms_dir: Path, lab_dir: Path, mode: str, pool: int = 16) -> Prepared:
    """Make the key, a ciphertext, credentials and ``pool`` distinct requests for ``mode``."""
    from harness.attest.authority import LabAuthority
    from harness.kms.material import encrypt_blob

    store = Store.open(kms_dir)
    try:
        key = store.create_key(json.dumps(_enclave_policy()), "bench")
        secret = os.urandom(32)
        blob = base64.b64encode(encrypt_blob(key.id, store.material(key.id), secret, None)).decode()
        creds = store.issue_credentials("bench")
    finally:
        store.close()
    requests: list[tuple[bytes, dict[str, str]]] = []
    recipients: list[RecipientKey] = []
    if mode == "decrypt":
        body = json.dumps({"CiphertextBlob": blob, "KeyId": key.id}).encode()
        headers = kms_sigv4.sign(
            access_key=creds.access_key,
            secret=creds.secret,
            region="us-east-1",
            host="kms.lab",
            target="TrentService.Decrypt",
            body=body,
        )
        requests = [(body, headers)] * pool
    else:
        authority = LabAuthority.load_or_create(lab_dir)
        for index in range(pool):
            recipient = RecipientKey()
            document = authority.attestation_document(
                pcrs={0: ENCLAVE_PCR0, 1: bytes(48), 2: bytes(48)},
                public_key=recipient.public_key_der,
                user_data=None,
                nonce=None,
                module_id=f"i-bench-enc{index:04d}",
            )
            body = json.dumps({"CiphertextBlob": blob, "Recipient": recipient.field(document)}).encode()
            headers = {
                "host": "kms.lab",
                "content-type": "application/x-amz-json-1.1",
                "x-amz-target": "TrentService.Decrypt",
            }
            requests.append((body, headers))
            recipients.append(recipient)

    def check(answer: dict[str, Any], index: int) -> None:
        if mode == "decrypt":
            assert base64.b64decode(answer["Plaintext"]) == secret, "wrong plaintext"
        else:
            assert "Plaintext" not in answer, "plaintext sent beside CiphertextForRecipient"
            envelope = base64.b64decode(answer["CiphertextForRecipient"])
            assert recipients[index % pool].open(envelope) == secret, "envelope does not open to the secret"

    return Prepared(requests, check)


async def _load(
    endpoint: str, prepared: Prepared, clients: int, total: int, rate: float | None = None
) -> tuple[list[float], int, float, list[tuple[dict, int]]]:
    """Send ``total`` requests from ``clients`` concurrent workers. Closed loop (``rate`` None): each worker
    sends its next request when the last one is answered. Open loop: request k is due at start + k / rate and
    its latency counts from that moment, so time spent waiting for a free worker is not hidden."""
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    latencies: list[float] = []
    errors = 0
    kept: list[tuple[dict, int]] = []
    counter = iter(range(total))
    url = endpoint + "/"
    started = 0.0

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal errors
            for index in counter:
                body, headers = prepared.requests[index % len(prepared.requests)]
                start = time.perf_counter()
                if rate is not None:
                    due = started + index / rate
                    if due > start:
                        await asyncio.sleep(due - start)
                    start = due
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        data = await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - start) * 1000)
                if status != 200:
                    errors += 1
                elif len(kept) < 8:
                    kept.append((json.loads(data), index))

        # warm the connections and the server's caches, outside the measurement
        warm = iter(range(min(total, clients * 2)))

        async def warmer() -> None:
            for index in warm:
                body, headers = prepared.requests[index % len(prepared.requests)]
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()

        await asyncio.gather(*(warmer() for _ in range(clients)))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed, kept


def bench_kms(
    *,
    modes: tuple[str, ...] = MODES,
    concurrency: tuple[int, ...] = (1, 10, 100),
    requests_per_client: int = 40,
    min_requests: int = 300,
    open_rate: float | None = OPEN_RATE,
    open_seconds: float = 10.0,
    on_result: Callable[[KmsBenchResult], None] | None = None,
    profile_dir: Path | None = None,
) -> list[KmsBenchResult]:
    """Per mode: a closed-loop run at each concurrency (max(min_requests, clients * requests_per_client)
    requests), then an open-loop run of ``open_seconds`` at ``open_rate`` requests/s from the largest client
    count. Closed loop measures capacity; open loop measures latency at a given load (Little's law: a closed
    loop of 100 clients at 300 req/s must show ~333 ms per request, whatever the server does)."""
    results = []
    with runtime.scratch_dir("bench-kms") as tmp:
        for mode in modes:
            kms_dir, lab_dir = Path(tmp) / mode / "kms", Path(tmp) / "lab-ca"
            prepared = prepare(kms_dir, lab_dir, mode)
            profile = profile_dir / f"kms-{mode}.pstats" if profile_dir else None
            server = KmsProcess(kms_dir, Listen(), lab_dir=lab_dir, profile=profile).start()
            runs: list[tuple[int, int, float | None]] = [
                (c, max(min_requests, c * requests_per_client), None) for c in concurrency
            ]
            if open_rate:
                runs.append((max(concurrency), int(open_rate * open_seconds), open_rate))
            try:
                for clients, total, rate in runs:
                    latencies, errors, elapsed, kept = asyncio.run(
                        _load(server.endpoint, prepared, clients, total, rate)
                    )
                    for answer, index in kept:
                        prepared.check(answer, index)
                    load = "closed" if rate is None else f"open {rate:g}/s"
                    result = KmsBenchResult(
                        name="kms",
                        unit="ms",
                        params={
                            "mode": mode,
                            "clients": clients,
                            "load": load,
                            "requests": total,
                            "server": "subprocess",
                            "cpus": os.cpu_count(),
                        },
                    )
                    result.samples.extend(latencies)
                    result.rps = len(latencies) / elapsed if elapsed else 0.0
                    result.errors = errors
                    result.extra["checked_responses"] = len(kept)
                    result.bars.extend(BARS.get((mode, clients, rate is not None), ()))
                    results.append(result)
                    if on_result:
                        on_result(result)
            finally:
                server.stop()
    return results


PARTIAL_HEAD = b"POST / HTTP/1.1\r\nHost: kms.lab\r\nX-Amz-Target: TrentService.Decr"
HOSTILE_P99_FACTOR = 3.0  # p99 under attack may be at most this times the p99 without it
HOSTILE_RATE = 100.0  # requests/s of the hostile bench: well under capacity, so it measures latency


async def hold_half_open(
    host: str, port: int, count: int, stopped: Callable[[], bool], ready: Callable[[], None] = lambda: None
) -> Counter[str]:
    """Keep ``count`` connections open with a partial request head each, reopening each one as soon as the
    server closes it, until ``stopped()``; ``ready()`` once ``count`` are open. Tallies what the server did:
    closed the connection, or answered 503."""
    tally: Counter[str] = Counter()

    async def one() -> None:
        while not stopped():
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                tally["connect_failed"] += 1
                await asyncio.sleep(0.05)
                continue
            tally["opened"] += 1
            try:
                writer.write(PARTIAL_HEAD)
                answer = await reader.read(64)
            except OSError:
                answer = b""
            tally["answered_503" if answer.startswith(b"HTTP/1.1 503") else "closed"] += 1
            writer.close()

    async def watch(tasks: list[asyncio.Task[None]]) -> None:
        announced = False
        while not stopped():
            if not announced and tally["opened"] >= count:
                ready()
                announced = True
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await asyncio.gather(watch(tasks), *tasks, return_exceptions=True)
    return tally


@contextlib.contextmanager
def half_open_attack(endpoint: str, count: int) -> Iterator[dict[str, int]]:
    """Run ``hold_half_open`` against ``endpoint`` (http://host:port) in another process (``python -m
    harness.bench.kms``) while the block runs; the yielded dict holds the attacker's tally after the block."""
    host, port = endpoint.rsplit("/", 1)[-1].rsplit(":", 1)
    argv = [sys.executable, "-m", "harness.bench.kms", host.strip("[]"), port, str(count)]
    attacker = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    tally: dict[str, int] = {}
    try:
        assert attacker.stdout is not None
        if attacker.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the half-open attacker did not open its {count} connections")
        time.sleep(
            1.0
        )  # connected is not yet accepted: let the server take the backlog before the clock starts
        yield tally
    finally:
        # closing its stdin stops the attacker, which prints its tally
        out, _ = attacker.communicate(timeout=60)
        tally.update(json.loads(out.splitlines()[-1]) if out.strip() else {})


def _attack(host: str, port: str, count: str) -> None:
    """The attacking process: hold half-open connections until stdin closes, then print the tally."""
    raise_fd_limit()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    tally = asyncio.run(
        hold_half_open(host, int(port), int(count), stop.is_set, lambda: print("ready", flush=True))
    )
    print(json.dumps(tally), flush=True)


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_kms_hostile(
    *,
    mode: str = "decrypt-recipient",
    clients: int = 100,
    attackers: int = 1000,
    rate: float = HOSTILE_RATE,
    seconds: float = 10.0,
    rounds: int = 3,
    listen: Listen | None = None,
    on_result: Callable[[KmsBenchResult], None] | None = None,
) -> list[KmsBenchResult]:
    """One KMS subprocess, an open-loop load of ``rate`` requests/s from ``clients`` for ``seconds`` in each
    of two conditions: alone, and beside ``attackers`` half-open connections. The conditions alternate over
    ``rounds`` (calm, attacked, calm, attacked...) and each pools its rounds, so a burst of other work on the
    machine does not land on one condition only. The attacked result's bars: no errors, and p99 at most
    ``HOSTILE_P99_FACTOR`` times the calm one's. ``server_cpu_ms_per_request`` says what the attack cost."""
    pooled = {hostile: ([], 0, 0.0, 0.0, Counter()) for hostile in (0, attackers)}
    per_round = max(1, int(rate * seconds / rounds))
    with runtime.scratch_dir("bench-kms") as tmp:
        kms_dir, lab_dir = Path(tmp) / "kms", Path(tmp) / "lab-ca"
        prepared = prepare(kms_dir, lab_dir, mode)
        with KmsProcess(kms_dir, listen or Listen(), lab_dir=lab_dir) as server:
            for _ in range(rounds):
                for hostile in (0, attackers):
                    latencies, errors, elapsed, cpu, tally = pooled[hostile]
                    with (
                        half_open_attack(server.endpoint, hostile)
                        if hostile
                        else contextlib.nullcontext({}) as attack
                    ):
                        cpu_before = _cpu_seconds(server.pid)
                        got, failed, took, kept = asyncio.run(
                            _load(server.endpoint, prepared, clients, per_round, rate)
                        )
                        cpu += _cpu_seconds(server.pid) - cpu_before
                    for answer, index in kept:
                        prepared.check(answer, index)
                    latencies.extend(got)
                    tally.update(attack)
                    pooled[hostile] = (latencies, errors + failed, elapsed + took, cpu, tally)
    results: list[KmsBenchResult] = []
    for hostile, (latencies, errors, elapsed, cpu, tally) in pooled.items():
        result = KmsBenchResult(
            name="kms",
            unit="ms",
            params={
                "mode": mode,
                "clients": clients,
                "load": f"open {rate:g}/s",
                "hostile": hostile,
                "requests": per_round * rounds,
                "rounds": rounds,
                "server": "subprocess",
                "cpus": os.cpu_count(),
            },
        )
        result.samples.extend(latencies)
        result.rps = len(latencies) / elapsed if elapsed else 0.0
        result.errors = errors
        result.extra["server_cpu_ms_per_request"] = round(1000 * cpu / max(1, len(latencies)), 3)
        result.extra["attacker"] = dict(tally)
        result.bars.append(Bar("errors", "<=", 0))
        if hostile:
            result.bars.append(Bar("p99", "<=", HOSTILE_P99_FACTOR * results[0].figures["p99"]))
        results.append(result)
        if on_result:
            on_result(result)
    return results


if __name__ == "__main__":
    _attack(*sys.argv[1:4])
