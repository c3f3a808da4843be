"""The main job: a lab KMS releases a secret to the confidential VM it expects, and refuses the other one.

1. The lab KMS starts on loopback, in TLS with a lab CA of its own; a key's policy names the launch
   measurement of the expected CVM (emulated SEV-SNP here, real SNP where the host can) and the lab root; the
   operator encrypts a secret under it.
2. Two CVMs boot side by side from the same image, the KMS CA's SHA-256 on both kernel command lines
   (``teelab.kms_ca=``, so it is measured): the expected one, and one whose command line differs further (so
   its measurement differs). Each reaches the host (CID 2) over vsock; the host's vsock-proxy forwards port
   8000 to the KMS and nothing else, passing TLS through: the host never sees inside it.
3. In each guest, ``teelab_guest.unseal`` makes an RSA key, gets an SNP report binding it, opens TLS to the
   KMS trusting only the pinned CA, and asks the KMS to Decrypt with that key as the Recipient. The KMS
   verifies the report against the key policy.
4. The expected CVM is served (it reports the secret's SHA-256, never the secret); the other is refused, and
   the KMS's audit log says why. Everything is torn down.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from teelab_guest import protocol
from teelab_guest.kms_client import KmsClient, Transport

from harness import images
from harness.attest import default_lab_dir
from harness.host import runtime
from harness.kms import KmsServer, Listen
from harness.kms.policy import measured_snp_policy
from harness.kms.tls import ca_certificate_pem, ca_pin, client_context
from harness.lab import CvmPlan, GuestBoot, Lab

KMS_VSOCK_PORT = 8000
DEMO_IMAGE = "cvm"
MODIFIED_CMDLINE = "teelab.variant=modified"


@dataclass
class Phase:
    name: str
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    phases: list[Phase] = field(default_factory=list)
    cvms: dict[str, dict[str, Any]] = field(default_factory=dict)
    ok: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 2),
            "phases": [{"name": p.name, "seconds": round(p.seconds, 2), **p.detail} for p in self.phases],
            "cvms": self.cvms,
        }


def run_demo(on_phase: Callable[[Phase], None] | None = None) -> DemoResult:
    """Run the main job; ``ok`` only when the expected CVM is served and the modified one refused."""
    result = DemoResult()
    started = time.monotonic()

    @contextmanager
    def phase(name: str) -> Iterator[dict[str, Any]]:
        begun = time.monotonic()
        detail: dict[str, Any] = {}
        yield detail
        done = Phase(name, time.monotonic() - begun, detail)
        result.phases.append(done)
        if on_phase:
            on_phase(done)

    secret = os.urandom(32)
    with ExitStack() as stack:
        lab = stack.enter_context(Lab())
        with phase("host") as detail:
            detail.update(accel=lab.host.accel, vsock=lab.vsock.backend, tee=lab.tee_mode("snp"))
        with phase("image") as detail:
            image = images.build(DEMO_IMAGE)
            detail.update(
                image=image.name, cached=not image.built, initrd_mib=round(image.initrd_bytes / 2**20, 1)
            )
        with phase("kms") as detail:
            kms_dir = stack.enter_context(runtime.scratch_dir("demo-kms"))
            listen = Listen(port=0, tls=True)
            kms = stack.enter_context(KmsServer.start(kms_dir, listen, lab_dir=default_lab_dir()))
            host, port = kms.endpoint.removeprefix("https://").rsplit(":", 1)
            stack.enter_context(lab.vsock_proxy(KMS_VSOCK_PORT, (host, int(port))))
            pin = ca_pin(kms_dir)
            detail.update(endpoint=kms.endpoint, vsock_port=KMS_VSOCK_PORT, tls=True, ca=pin[:19] + "...")
        with phase("plan") as detail:
            # One vCPU each: two CVMs boot side by side, and a TCG vCPU is a host thread on a 2-CPU machine.
            # The same count also keeps the command line the only launch input in which the two differ.
            pinned = f"{protocol.KMS_CA_KEY}={pin}"
            extra = {"expected": pinned, "modified": f"{pinned} {MODIFIED_CMDLINE}"}
            plans = {
                name: lab.plan_cvm(image, name=f"demo-{name}", kind="snp", vcpus=1, cmdline_extra=cmdline)
                for name, cmdline in extra.items()
            }
            measurement = plans["expected"].measurement_hex()
            operator = kms.credentials("operator")
            key = kms.create_key(
                measured_snp_policy(operator.arn, measurement), description="teelab demo secret"
            )
            endpoint = Transport.endpoint(kms.endpoint, tls=client_context(kms_dir))
            with KmsClient(endpoint, access_key=operator.access_key, secret=operator.secret) as client:
                blob = client.encrypt(key.id, secret)
            detail.update(
                key=key.id, measurement=measurement[:24] + "...", measure=measure_argv(plans["expected"])
            )
        with phase("boot") as detail, concurrent.futures.ThreadPoolExecutor(2) as pool:
            boots: dict[str, GuestBoot] = dict(
                zip(plans, pool.map(lab.boot_planned, plans.values()), strict=True)
            )
            detail.update({name: round(boot.seconds, 2) for name, boot in boots.items()})
        with phase("unseal") as detail, concurrent.futures.ThreadPoolExecutor(2) as pool:
            argv = ["python3", "-m", "teelab_guest.unseal", "--kms", f"vsock:2:{KMS_VSOCK_PORT}",
                    "--kms-ca", ca_certificate_pem(kms_dir),  # untrusted: checked against the pin
                    "--ciphertext", base64.b64encode(blob).decode()]  # fmt: skip
            outcomes = pool.map(lambda b: _outcome(b.agent.exec(argv, timeout=120).stdout), boots.values())
            result.cvms = dict(zip(boots, outcomes, strict=True))
            for name, plan in plans.items():
                result.cvms[name]["measurement"] = plan.measurement_hex()
            detail.update({name: cvm["outcome"] for name, cvm in result.cvms.items()})
        with phase("audit") as detail:
            rows = [r for r in kms.store.audit(key_id=key.id) if r.operation == "Decrypt"]
            detail["decisions"] = [{"decision": r.decision, "reasons": list(r.reasons)} for r in rows]
        with phase("teardown"):
            stack.close()
    expected, modified = result.cvms.get("expected", {}), result.cvms.get("modified", {})
    result.ok = (
        expected.get("outcome") == "served"
        and expected.get("tls") is True
        and expected.get("sha256") == hashlib.sha256(secret).hexdigest()
        and modified.get("outcome") == "refused"
        and modified.get("error") == "AccessDeniedException"
    )
    result.seconds = time.monotonic() - started
    return result


def measure_argv(plan: CvmPlan) -> list[str]:
    """The ``teelab measure`` command that computes ``plan``'s expected SNP measurement on its own."""
    spec = plan.spec
    argv = ["teelab", "measure", "--kind", "snp", "--kernel", str(spec.kernel), "--initrd", str(spec.initrd),
            "--cmdline", spec.cmdline, "--vcpus", str(spec.vcpus)]  # fmt: skip
    return argv + (["--firmware", str(spec.firmware)] if spec.firmware else [])


def _outcome(stdout: bytes) -> dict[str, Any]:
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"outcome": "broken", "output": stdout.decode(errors="replace")[-500:]}
