"""``teelab bench tpm``: what a vTPM costs a confidential VM, side by side with the same guest without one.

- Boot: the cvm image as an emulated SEV-SNP CVM, with and without an ephemeral vTPM, boots interleaved;
  launch to guest-init ready on the host's clock (a TCG guest's own uptime is not comparable: its TSC
  calibration varies with host load), and apart from it the vTPM's start (manufacture and swtpm).
- Attestation round trips in one booted CVM with its vTPM, interleaved: the vTPM's (nonce, quote through the
  agent, ``verify_tpm``) and the SNP evidence's (nonce, report through the agent, ``verify``), each from the
  nonce to the verdict; the AK's certification (credential activation) once, beside them.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from harness import images
from harness.attest.policy import NonceBook, Policy
from harness.attest.tpm_ca import TpmAuthority
from harness.attest.verifier import verify
from harness.attest.verify_tpm import verify_tpm
from harness.bench.result import BenchResult
from harness.lab import Lab, tpm_guest
from harness.tee import tpm_measure, vtpm_attest

SNP_EVIDENCE = """
import base64, json, sys
from teelab_guest.evidence import get_evidence
e = get_evidence(bytes.fromhex(sys.argv[1]))
print(json.dumps({"blob": base64.b64encode(e.blob).decode(), "aux": base64.b64encode(e.aux or b"").decode()}))
"""


def bench_tpm(
    lab: Lab, *, boots: int = 3, rounds: int = 10, on_step: Callable[[str, str], None] | None = None
) -> BenchResult:
    """``boots`` boots with and without a vTPM, then ``rounds`` round trips of each kind, in milliseconds."""
    image = images.build("cvm")
    say = on_step or (lambda name, value: None)
    result = BenchResult(
        "tpm", "ms", {"image": "cvm", "boots": boots, "rounds": rounds, "accel": lab.host.accel}
    )
    boot_s: dict[str, list[float]] = {"without_vtpm": [], "with_vtpm": []}
    vtpm_start_s: list[float] = []
    for index in range(boots):
        for mode in ("without_vtpm", "with_vtpm"):
            started = time.monotonic()
            plan = lab.plan_cvm(image, name=f"bench-tpm-{index}", vsock=False,
                                vtpm="ephemeral" if mode == "with_vtpm" else None)  # fmt: skip
            if plan.vtpm is not None:
                vtpm_start_s.append(time.monotonic() - started)
            boot = lab.boot_planned(plan, timeout=180)
            boot_s[mode].append(boot.seconds)
            say(f"boot {index + 1}/{boots} {mode.replace('_', ' ')}", f"{boot.seconds:.2f} s")
            lab.stop(boot.machine)
    result.extra["boot_seconds"] = _side_by_side(boot_s)
    result.extra["vtpm_start_seconds"] = {"median": _median(vtpm_start_s), "samples": _rounded(vtpm_start_s)}

    plan = lab.plan_cvm(image, name="bench-tpm-attest", vsock=False, vtpm="ephemeral")
    boot = lab.boot_planned(plan, timeout=180)
    try:
        guest = tpm_guest(boot)
        ak = vtpm_attest.certify_ak(guest, TpmAuthority.load_or_create())
        result.extra["ak_certify_ms"] = round(ak.seconds * 1000, 1)
        pcrs = tpm_measure.predict(plan.spec.cmdline, image.initrd).pcrs
        measurement = bytes.fromhex(plan.measurement_hex() or "")
        snp_ms: list[float] = []
        book = NonceBook()
        for index in range(rounds):
            result.samples.append(_tpm_round_trip(guest, ak, book, pcrs))
            snp_ms.append(_snp_round_trip(boot.agent, book, measurement))
            say(
                f"round trip {index + 1}/{rounds}",
                f"vTPM {result.samples[-1]:.0f} ms, SNP {snp_ms[-1]:.0f} ms",
            )
        result.extra["snp_round_trip_ms"] = {"median": _median(snp_ms), "samples": _rounded(snp_ms)}
        result.extra["tpm_round_trip_ms"] = {"median": _median(result.samples)}
    finally:
        lab.stop(boot.machine)
    return result


def _tpm_round_trip(
    guest: vtpm_attest.GuestCall, ak: vtpm_attest.CertifiedAk, book: NonceBook, pcrs: Any
) -> float:
    started = time.perf_counter()
    nonce = book.issue()
    evidence = vtpm_attest.quote(guest, ak, nonce)
    verdict = verify_tpm(evidence.to_bytes(), Policy(roots=("lab",), nonce=nonce, nonce_book=book, pcrs=pcrs))
    elapsed = (time.perf_counter() - started) * 1000
    if not verdict.ok:
        raise RuntimeError(f"vTPM evidence refused in the bench: {verdict.reasons}")
    return elapsed


def _snp_round_trip(agent: Any, book: NonceBook, measurement: bytes) -> float:
    started = time.perf_counter()
    nonce = book.issue()
    report_data = nonce + bytes(64 - len(nonce))
    out = agent.exec(["python3", "-c", SNP_EVIDENCE, report_data.hex()], check=True, timeout=120)
    got = json.loads(out.stdout)
    policy = Policy(roots=("lab",), report_data=report_data, measurement=measurement or None)
    aux = base64.b64decode(got["aux"])
    verdict = verify(base64.b64decode(got["blob"]), policy, certificates=aux or ())
    elapsed = (time.perf_counter() - started) * 1000
    if not verdict.ok:
        raise RuntimeError(f"SNP evidence refused in the bench: {verdict.reasons}")
    return elapsed


def _side_by_side(samples: dict[str, list[float]]) -> dict[str, Any]:
    without, with_ = _median(samples["without_vtpm"]), _median(samples["with_vtpm"])
    return {
        "median_without_vtpm": without,
        "median_with_vtpm": with_,
        "vtpm_cost": round(with_ - without, 3),
        "samples": {mode: _rounded(values) for mode, values in samples.items()},
    }


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else 0.0


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]
