"""``teelab bench tee``: what an evidence request costs through the emulated security processor, host-side and
from inside a TCG guest."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

from teelab_guest import tee_wire

from harness.aio import shared_loop
from harness.bench.result import Bar, BenchResult
from harness.tee.measure import LaunchInputs, measure_snp, measure_tdx
from harness.tee.platforms import (
    EmulatedSnpBackend,
    EmulatedTdxBackend,
    lab_authority,
    lab_snp_issuer,
    lab_tdx_issuer,
)
from harness.tee.processor import DeviceService, RateLimit, SecurityProcessor

# Bars on a 2-vCPU TCG host: one request through the service (sign included), and get_evidence in a guest.
SERVICE_BAR_MS = 2.0
GUEST_BAR_MS = 25.0
GUEST_LOOP = """
import json, sys, time
from teelab_guest.evidence import get_evidence
get_evidence(b"warm-up")
samples = []
for i in range(int(sys.argv[1])):
    start = time.perf_counter()
    get_evidence(i.to_bytes(8, "big"))
    samples.append((time.perf_counter() - start) * 1000)
print(json.dumps(samples))
"""


def _processor(kind: str) -> SecurityProcessor:
    import tempfile
    from pathlib import Path

    with tempfile.NamedTemporaryFile(prefix="teelab-bench-kernel-") as kernel:
        kernel.write(b"bench kernel")
        kernel.flush()
        inputs = LaunchInputs(Path(kernel.name), cmdline="console=ttyS0", vcpus=2)
        authority = lab_authority()
        if kind == "snp":
            return SecurityProcessor("snp", snp=lab_snp_issuer(authority, measure_snp(inputs), bytes(32)))
        return SecurityProcessor("tdx", tdx=lab_tdx_issuer(authority, measure_tdx(inputs)))


def bench_service(
    kind: str, runs: int, *, on_sample: Callable[[int, float], None] | None = None
) -> BenchResult:
    """``runs`` sequential requests over a socketpair to a DeviceService (no rate limit): one sample per
    request, frame out to verified-shape answer in, in milliseconds."""
    result = BenchResult("tee-service", "ms", {"kind": kind, "runs": runs, "transport": "socketpair"})
    result.bars.append(Bar("median", "<=", SERVICE_BAR_MS))
    ours, theirs = socket.socketpair()
    service = DeviceService(
        _processor(kind), name="bench", rate=lambda: RateLimit(per_second=1e9, burst=10**9)
    )
    service.serve_socket(theirs, shared_loop())
    op, size = ("snp-report", tee_wire.SNP_REPORT_BYTES) if kind == "snp" else ("tdx-quote", None)
    try:
        ours.settimeout(30)
        stream = ours.makefile("rwb", buffering=0)
        for index in range(runs):
            request = tee_wire.Request(index, op, report_data=index.to_bytes(64, "big"))
            start = time.perf_counter()
            answer = tee_wire.call(stream, request)  # type: ignore[arg-type]
            elapsed = (time.perf_counter() - start) * 1000
            blob = answer.get("report") or answer.get("quote") or b""
            if not answer.get("ok") or (size is not None and len(blob) != size):
                raise RuntimeError(f"bad answer in bench: {str(answer)[:200]}")
            result.samples.append(elapsed)
            if on_sample:
                on_sample(index, elapsed)
    finally:
        service.close()
        ours.close()
    result.extra["requests_per_second"] = round(1000 / (sum(result.samples) / len(result.samples)), 1)
    return result


def bench_guest(kind: str, runs: int) -> BenchResult:
    """Boot the enclave image as a cvm with the emulated ``kind`` device and time ``get_evidence`` inside it
    (open the port, describe, request, close), in milliseconds, under the default per-VM rate limit (two
    requests per call: past the burst, the limit paces a tight loop)."""
    from harness import images
    from harness.lab import Lab

    image = images.build("enclave")
    limit = RateLimit()
    params = {"kind": kind, "runs": runs, "image": "enclave"}
    params["rate_limit"] = f"{limit.per_second:g}/s burst {limit.burst}"
    result = BenchResult("tee-guest", "ms", params)
    with Lab() as lab:
        result.params["accel"] = lab.host.accel
        if lab.host.accel == "tcg":
            result.bars.append(Bar("median", "<=", GUEST_BAR_MS))
        backend: Any = EmulatedSnpBackend() if kind == "snp" else EmulatedTdxBackend()
        spec = lab.spec_for_image(image, name=f"bench-tee-{kind}", role="cvm")
        with backend.attach(spec, lab.host) as attachment:
            boot = lab.boot(attachment.spec)
            attachment.after_launch(boot.machine)
            assert boot.agent is not None
            out = boot.agent.exec(["python3", "-c", GUEST_LOOP, str(runs)], check=True, timeout=600)
            result.samples = [float(s) for s in json.loads(out.stdout)]
            if attachment.service is not None:
                result.extra["service_refused"] = attachment.service.stats.refused
    return result
