"""``teelab bench kms --versus-moto``: the same signed Decrypt load against the lab KMS and against moto's KMS
server, each in a process of its own, in interleaved rounds of one run; and the lab KMS's attestation-bound
Decrypt (Recipient) in the same rounds. Reports each one's throughput and the two ratios the bars name.

Each round runs the three loads back to back at the same client count, in an order that rotates from round to
round, so drift in what else the machine does falls on all of them alike. A ratio is that of the medians of
the rounds' throughputs; the median of the per-round ratios is reported beside it. Each target's server CPU
time per request (its process's user and system time over its loads, warm-up included, divided by the requests
sent) is reported too: on a shared machine it moves far less than throughput does.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from teelab_guest import kms_sigv4
from teelab_guest.kms_client import KmsClient, Transport

from harness.bench.kms import KmsBenchResult, Prepared, _cpu_seconds, _load, prepare
from harness.bench.result import Bar, BenchResult
from harness.host import runtime
from harness.kms.errors import ServerStartError
from harness.kms.runner import KmsProcess, Listen

TARGETS = ("teelab decrypt", "teelab decrypt-recipient", "moto decrypt")
RATIO_BARS = (Bar("teelab/moto", ">=", 3.0), Bar("recipient/plain", ">=", 0.75))
MOTO_START_S = 60.0


class VersusResult(BenchResult):
    """The ratios of one side-by-side run: figures are ratios of median throughputs, not latencies."""

    ratios: dict[str, float]

    def __init__(self, ratios: dict[str, float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ratios = ratios

    @property
    def figures(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in self.ratios.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer(NamedTuple):
    endpoint: str
    pid: int


@contextmanager
def moto_server() -> Iterator[MotoServer]:
    """moto's server (all services, KMS among them) in a subprocess; yields its endpoint and process id."""
    if importlib.util.find_spec("moto") is None:
        raise ServerStartError(
            "moto is not installed, so there is nothing to compare the lab KMS with",
            hint="pip install 'moto[server]' (it is in teelab's test extra)",
        )
    endpoint = f"http://127.0.0.1:{_free_port()}"
    port = endpoint.rsplit(":", 1)[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + MOTO_START_S
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ServerStartError(
                        f"moto's server did not answer on {endpoint} within {MOTO_START_S:g} s"
                    ) from None
                time.sleep(0.2)
        yield MotoServer(endpoint, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prepare_moto(endpoint: str, pool: int = 16) -> Prepared:
    """A key and a ciphertext in moto, and signed Decrypt requests shaped like the lab KMS's (body with
    CiphertextBlob and KeyId, SigV4 over host, x-amz-date and x-amz-target)."""
    access_key, secret_key = "AKIABENCHVERSUSMOTO0", "bench"
    client = KmsClient(Transport.endpoint(endpoint), access_key=access_key, secret=secret_key)
    key = client.call("CreateKey", {"Description": "bench"})["KeyMetadata"]["KeyId"]
    secret = os.urandom(32)
    blob = base64.b64encode(client.encrypt(key, secret)).decode()
    body = json.dumps({"CiphertextBlob": blob, "KeyId": key}).encode()
    headers = kms_sigv4.sign(
        access_key=access_key,
        secret=secret_key,
        region="us-east-1",
        host="kms.lab",
        target="TrentService.Decrypt",
        body=body,
    )

    def check(answer: dict[str, Any], index: int) -> None:
        assert base64.b64decode(answer["Plaintext"]) == secret, "moto answered a wrong plaintext"

    return Prepared([(body, headers)] * pool, check)


def bench_kms_versus(
    *,
    rounds: int = 5,
    clients: int = 100,
    requests: int = 1000,
    on_result: Callable[[BenchResult], None] | None = None,
) -> list[BenchResult]:
    """``rounds`` rounds of ``requests`` closed-loop Decrypts from ``clients`` clients against each target;
    one result per target (latencies of all rounds, median throughput) and one of the ratios."""
    rates: dict[str, list[float]] = {target: [] for target in TARGETS}
    cpu = dict.fromkeys(TARGETS, 0.0)  # server CPU seconds over each target's loads
    sent = requests + min(requests, clients * 2)  # _load's warm-up requests, then the measured ones
    results = {
        target: KmsBenchResult(
            name="kms-versus",
            unit="ms",
            params={"target": target, "clients": clients, "requests": requests, "rounds": rounds},
        )
        for target in TARGETS
    }
    with runtime.scratch_dir("bench-kms-versus") as tmp, moto_server() as moto:
        kms_dir, lab_dir = Path(tmp) / "kms", Path(tmp) / "lab-ca"
        # Recipient requests are unsigned: preparing them first lets the signed ones keep their credentials
        prepared = {
            "teelab decrypt-recipient": prepare(kms_dir, lab_dir, "decrypt-recipient"),
            "teelab decrypt": prepare(kms_dir, lab_dir, "decrypt"),
            "moto decrypt": prepare_moto(moto.endpoint),
        }
        server = KmsProcess(kms_dir, Listen(), lab_dir=lab_dir).start()
        endpoints = {target: server.endpoint for target in TARGETS} | {"moto decrypt": moto.endpoint}
        pids = {target: server.pid for target in TARGETS} | {"moto decrypt": moto.pid}
        try:
            for round_index in range(rounds):
                order = TARGETS[round_index % 3 :] + TARGETS[: round_index % 3]
                for target in order:
                    before = _cpu_seconds(pids[target])
                    latencies, errors, elapsed, kept = asyncio.run(
                        _load(endpoints[target], prepared[target], clients, requests)
                    )
                    cpu[target] += _cpu_seconds(pids[target]) - before
                    for answer, index in kept:
                        prepared[target].check(answer, index)
                    result = results[target]
                    result.samples.extend(latencies)
                    result.errors += errors
                    rates[target].append(len(latencies) / elapsed if elapsed else 0.0)
        finally:
            server.stop()
    per_request = {target: cpu[target] / (sent * rounds) for target in TARGETS}
    for target, result in results.items():
        result.rps = statistics.median(rates[target])
        result.extra["rps_by_round"] = [round(r, 1) for r in rates[target]]
        result.extra["server_cpu_ms_per_request"] = round(1000 * per_request[target], 3)
        result.bars.append(Bar("errors", "<=", 0))
        if on_result:
            on_result(result)
    summary = _summary(
        rates,
        per_request,
        {"clients": clients, "requests": requests, "rounds": rounds, "cpus": os.cpu_count()},
    )
    if on_result:
        on_result(summary)
    return [*results.values(), summary]


def _summary(rates: dict[str, list[float]], cpu_per_request: dict[str, float], params: dict) -> VersusResult:
    """The two ratios of median throughputs with their bars; beside them the ratios round by round and the
    plain/recipient ratio of server CPU per request."""
    plain, recipient, moto = (rates[t] for t in TARGETS)
    ratios = {
        "teelab/moto": statistics.median(plain) / statistics.median(moto),
        "recipient/plain": statistics.median(recipient) / statistics.median(plain),
    }
    summary = VersusResult(ratios, name="kms-versus", unit="ratio", params=params, bars=list(RATIO_BARS))
    summary.extra["teelab/moto by round"] = [round(a / b, 2) for a, b in zip(plain, moto, strict=True)]
    summary.extra["recipient/plain by round"] = [
        round(a / b, 2) for a, b in zip(recipient, plain, strict=True)
    ]
    if cpu_per_request["teelab decrypt-recipient"]:
        summary.extra["server CPU per request, plain/recipient"] = round(
            cpu_per_request["teelab decrypt"] / cpu_per_request["teelab decrypt-recipient"], 2
        )
    return summary
