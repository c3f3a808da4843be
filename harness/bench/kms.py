"""``teelab bench kms``: Decrypt with a Recipient (enclave attestation document) and plain signed Decrypt,
requests per second and p50/p99 latency at 1, 10 and 100 concurrent clients.

The KMS runs in a subprocess; this process is the load generator (aiohttp, one event loop), so the two compete
for the host's CPUs as a real deployment's client and server would. Request bodies, documents and signatures
are made before the clock starts; a sample of responses is opened after it stops to prove they are right.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from teelab_guest import kms_sigv4
from teelab_guest.kms_client import RecipientKey

from harness.bench.result import Bar, BenchResult
from harness.host import runtime
from harness.kms.runner import KmsProcess, Listen
from harness.kms.store import Store

MODES = ("decrypt-recipient", "decrypt")
OPEN_RATE = 320.0  # offered load of the open-loop run: the 300 req/s bar plus a margin
# (mode, clients, open loop) -> bars: capacity >= 300 req/s closed-loop; at 320 req/s offered, p99 <= 50 ms.
BARS = {
    ("decrypt-recipient", 100, False): (Bar("rps", ">=", 300), Bar("errors", "<=", 0)),
    ("decrypt-recipient", 100, True): (Bar("rps", ">=", 300), Bar("p99", "<=", 50.0), Bar("errors", "<=", 0)),
}
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
    from harness.attest.lab import LabAuthority
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

    async with aiohttp.ClientSession(connector=connector) as session:

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
                except aiohttp.ClientError:
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
