"""``teelab bench unseal``: the guest's unseal round trip, over TLS and over plain HTTP in one run.

One CVM boots as the demo's expected one does (emulated SEV-SNP where the host has no SNP, the TLS KMS's CA
pinned on its measured command line). Two lab KMSes serve it through the host's vsock-proxy, one in TLS and
one in plain HTTP, each with a key whose policy names the CVM's measurement. In the guest,
``teelab_guest.unseal_bench`` alternates Decrypt-with-Recipient round trips between the two, timing each from
the request to the opened secret, with fresh evidence (untimed) before each. Each mode keeps one connection,
as a guest unsealing more than once would; the first round trip (which connects, and for TLS handshakes) and
``cold`` round trips on fresh connections are reported beside the bar, which holds the medians on kept
connections: TLS / plain <= 1.10. ``samples`` are each round's TLS / plain (taken back to back), and their
median is reported too, a second view of the same runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import statistics
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from teelab_guest import protocol
from teelab_guest.kms_client import KmsClient, Transport

from harness import images
from harness.attest import default_lab_dir
from harness.bench.result import Bar, BenchResult
from harness.host import runtime
from harness.kms import KmsServer, Listen
from harness.kms.policy import measured_snp_policy
from harness.kms.tls import ca_certificate_pem, ca_pin, client_context
from harness.lab import Lab

PORTS = {"tls": 8443, "plain": 8000}  # host (CID 2) vsock ports the guest reaches each KMS on
BARS = (Bar("tls_over_plain", "<=", 1.10), Bar("wrong_secrets", "<=", 0))
IMAGE = "cvm"


@dataclass
class UnsealBenchResult(BenchResult):
    """Round trips in ms per mode on kept connections (``warm``) and on fresh ones (``cold``)."""

    warm: dict[str, list[float]] = field(default_factory=dict)
    cold: dict[str, list[float]] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)
    wrong_secrets: int = 0  # secrets the guest opened that are not the one sealed

    @property
    def figures(self) -> dict[str, float]:
        figures: dict[str, float] = {}
        for mode in PORTS:
            if self.warm.get(mode):
                figures[f"{mode}_median_ms"] = round(statistics.median(self.warm[mode]), 3)
        if "tls_median_ms" in figures and figures.get("plain_median_ms"):
            figures["tls_over_plain"] = round(figures["tls_median_ms"] / figures["plain_median_ms"], 3)
        if self.samples:  # each round's TLS / plain, the two taken back to back
            figures["paired_ratio_median"] = round(statistics.median(self.samples), 3)
        for mode in PORTS:
            if self.cold.get(mode):
                figures[f"cold_{mode}_median_ms"] = round(statistics.median(self.cold[mode]), 3)
        if figures.get("cold_plain_median_ms") and "cold_tls_median_ms" in figures:
            figures["cold_tls_over_plain"] = round(
                figures["cold_tls_median_ms"] / figures["cold_plain_median_ms"], 3
            )
        for mode, milliseconds in self.first.items():
            figures[f"first_{mode}_ms"] = round(milliseconds, 3)
        figures["wrong_secrets"] = self.wrong_secrets
        return figures

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for mode in PORTS:
            data[f"{mode}_ms"] = [round(s, 3) for s in self.warm.get(mode, [])]
            data[f"cold_{mode}_ms"] = [round(s, 3) for s in self.cold.get(mode, [])]
        return data


def bench_unseal(
    lab: Lab, *, rounds: int = 100, cold: int = 5, on_step: Callable[[str, str], None] | None = None
) -> UnsealBenchResult:
    """Boot one CVM and measure; ``on_step(name, value)`` reports progress."""
    step = on_step or (lambda _name, _value: None)
    result = UnsealBenchResult(
        name="unseal",
        unit="ms",
        params={"rounds": rounds, "cold": cold, "accel": lab.host.accel, "tee": lab.tee_mode("snp")},
        bars=list(BARS),
    )
    secret = os.urandom(32)
    image = images.build(IMAGE)
    with ExitStack() as stack:
        servers: dict[str, KmsServer] = {}
        for mode in PORTS:
            kms_dir = stack.enter_context(runtime.scratch_dir(f"bench-unseal-{mode}"))
            listen = Listen(port=0, tls=mode == "tls")
            servers[mode] = stack.enter_context(KmsServer.start(kms_dir, listen, lab_dir=default_lab_dir()))
            host, port = servers[mode].endpoint.split("://")[1].rsplit(":", 1)
            stack.enter_context(lab.vsock_proxy(PORTS[mode], (host, int(port))))
        tls_dir = servers["tls"].kms_dir
        pinned = f"{protocol.KMS_CA_KEY}={ca_pin(tls_dir)}"
        plan = lab.plan_cvm(
            image, name=f"bench-unseal-{os.getpid()}", kind="snp", vcpus=1, cmdline_extra=pinned
        )
        measurement = plan.measurement_hex()
        assert measurement is not None
        blobs = {mode: seal_secret(server, measurement, secret) for mode, server in servers.items()}
        boot = lab.boot_planned(plan)
        stack.callback(lab.stop, boot.machine)
        step("boot", f"{boot.seconds:.2f} s")
        assert boot.agent is not None
        argv = ["python3", "-m", "teelab_guest.unseal_bench",
                "--tls", f"vsock:2:{PORTS['tls']}", "--tls-ciphertext", blobs["tls"],
                "--plain", f"vsock:2:{PORTS['plain']}", "--plain-ciphertext", blobs["plain"],
                "--kms-ca", ca_certificate_pem(tls_dir),
                "--rounds", str(rounds), "--cold", str(cold)]  # fmt: skip
        report = json.loads(boot.agent.exec(argv, timeout=60 + 10 * (rounds + cold), check=True).stdout)
    result.wrong_secrets = len(set(report["secrets"]) - {hashlib.sha256(secret).hexdigest()})
    result.warm = {mode: report[f"{mode}_ms"] for mode in PORTS}
    result.cold = {mode: report[f"cold_{mode}_ms"] for mode in PORTS}
    result.first = {mode: report[f"first_{mode}_ms"] for mode in PORTS}
    result.samples = [t / p for t, p in zip(result.warm["tls"], result.warm["plain"], strict=True)]
    step("ratio", f"{result.figures.get('tls_over_plain')}")
    return result


def seal_secret(server: KmsServer, measurement: str, secret: bytes) -> str:
    """A key for the measured CVM on ``server`` and ``secret`` encrypted under it, base64."""
    operator = server.credentials("operator")
    key = server.create_key(measured_snp_policy(operator.arn, measurement), description="teelab unseal bench")
    tls = client_context(server.kms_dir) if server.endpoint.startswith("https://") else None
    transport = Transport.endpoint(server.endpoint, tls=tls)
    with KmsClient(transport, access_key=operator.access_key, secret=operator.secret) as client:
        return base64.b64encode(client.encrypt(key.id, secret)).decode()
