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
   the KMS's audit log says why.

The enclave leg, after it (docs/enclave.md, "The KMS round trip"):

5. The ``unseal`` enclave image gets the same KMS CA pin on its kernel command line (measured: PCR0, PCR1),
   and a modified copy one word more; a second key's policy names the expected image's PCR0.
6. A parent (SEV-SNP, emulated here, like the CVMs) boots with an enclave pool for two enclaves and runs
   guest-init's vsock-proxy, passing its enclaves' port 8000 on to the host (CID 2), as a Nitro parent
   instance does.
7. Two enclaves are carved from it, the expected image's and the modified one's (the second while the first
   unseals). Each asks the parent for its job, makes an RSA key, gets an attestation document bound to it
   from its security module, calls KMS Decrypt with it as the Recipient in TLS through both proxies, and
   answers the parent; the expected one reports the secret's SHA-256, the modified one is refused (PCR0).
   Both are terminated, and everything is torn down.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from teelab_guest import protocol
from teelab_guest.kms_client import KmsClient, Transport

from harness import images
from harness.attest import default_lab_dir
from harness.enclave.carver import ParentVm
from harness.enclave.parent_side import serve_unseal_jobs, start_kms_proxy, unseal_outcomes
from harness.enclave.pool import EnclavePool
from harness.enclave.recipes import build_enclave_image
from harness.enclave.variant import with_cmdline_words
from harness.host import runtime
from harness.kms import KmsServer, Listen
from harness.kms.policy import measured_enclave_policy, measured_snp_policy
from harness.kms.tls import ca_certificate_pem, ca_pin, client_context
from harness.lab import CvmPlan, GuestBoot, Lab

KMS_VSOCK_PORT = 8000
DEMO_IMAGE = "cvm"
MODIFIED_CMDLINE = "teelab.variant=modified"
ENCLAVE_RECIPE = "unseal"
ENCLAVE_MEMORY_MIB = 256
ENCLAVE_VCPUS = 2
# Which leg each phase belongs to; the others (host, kms, audit, teardown) serve both.
LEGS = {
    "cvm": ("image", "plan", "boot", "unseal"),
    "enclave": ("enclave-image", "parent", "carve", "enclave-unseal"),
}


@dataclass
class Phase:
    name: str
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    phases: list[Phase] = field(default_factory=list)
    cvms: dict[str, dict[str, Any]] = field(default_factory=dict)
    enclaves: dict[str, dict[str, Any]] = field(default_factory=dict)
    ok: bool = False
    seconds: float = 0.0

    def legs(self) -> dict[str, float]:
        """Each leg's seconds (the sum of its phases), and the enclave leg over the CVM leg."""
        legs = {
            leg: round(sum(p.seconds for p in self.phases if p.name in names), 2)
            for leg, names in LEGS.items()
        }
        if legs["cvm"] > 0:
            legs["enclave_over_cvm"] = round(legs["enclave"] / legs["cvm"], 2)
        return legs

    def to_dict(self) -> dict[str, Any]:
        def leg_of(name: str) -> str:
            return next((leg for leg, names in LEGS.items() if name in names), "both")

        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 2),
            "legs": self.legs(),
            "phases": [
                {"name": p.name, "leg": leg_of(p.name), "seconds": round(p.seconds, 2), **p.detail}
                for p in self.phases
            ],
            "cvms": self.cvms,
            "enclaves": self.enclaves,
        }


def run_demo(on_phase: Callable[[Phase], None] | None = None) -> DemoResult:
    """Run the main job; ``ok`` only when the expected CVM and enclave are served and the modified ones
    refused."""
    result = DemoResult()
    started = time.monotonic()
    phase = _phases(result, on_phase)

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
            detail.update(endpoint=kms.endpoint, vsock_port=KMS_VSOCK_PORT, tls=True, ca=pin)
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
            detail.update(key=key.id, measurement=measurement, measure=measure_argv(plans["expected"]))
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
        enclave_key = _enclave_leg(lab, kms, kms_dir, stack, secret, result, phase)
        with phase("audit") as detail:
            detail["decisions"] = _decisions(kms, key.id)
            detail["enclave_decisions"] = _decisions(kms, enclave_key)
        with phase("teardown"):
            stack.close()
    result.ok = _served_and_refused(result.cvms, secret) and _served_and_refused(result.enclaves, secret)
    result.seconds = time.monotonic() - started
    return result


def _phases(
    result: DemoResult, on_phase: Callable[[Phase], None] | None
) -> Callable[[str], AbstractContextManager[dict[str, Any]]]:
    """``with phase(name) as detail:`` times a phase, records it in ``result`` and tells ``on_phase``."""

    @contextmanager
    def phase(name: str) -> Iterator[dict[str, Any]]:
        begun = time.monotonic()
        detail: dict[str, Any] = {}
        yield detail
        done = Phase(name, time.monotonic() - begun, detail)
        result.phases.append(done)
        if on_phase:
            on_phase(done)

    return phase


def _decisions(kms: KmsServer, key_id: str) -> list[dict[str, Any]]:
    """The KMS's Decrypt decisions on ``key_id`` and their reasons, from its audit log."""
    rows = [r for r in kms.store.audit(key_id=key_id) if r.operation == "Decrypt"]
    return [{"decision": r.decision, "reasons": list(r.reasons)} for r in rows]


def _served_and_refused(outcomes: dict[str, dict[str, Any]], secret: bytes) -> bool:
    expected, modified = outcomes.get("expected", {}), outcomes.get("modified", {})
    return (
        expected.get("outcome") == "served"
        and expected.get("tls") is True
        and expected.get("sha256") == hashlib.sha256(secret).hexdigest()
        and modified.get("outcome") == "refused"
        and modified.get("error") == "AccessDeniedException"
    )


def _enclave_leg(
    lab: Lab,
    kms: KmsServer,
    kms_dir: Any,
    stack: ExitStack,
    secret: bytes,
    result: DemoResult,
    phase: Callable[[str], AbstractContextManager[dict[str, Any]]],
) -> str:
    """The enclave leg (steps 5-7 above); returns its key's id. Its outcomes land in ``result.enclaves``."""
    with phase("enclave-image") as detail:
        built = build_enclave_image(ENCLAVE_RECIPE)
        work = stack.enter_context(runtime.scratch_dir("demo-enclave"))
        pinned = f"{protocol.KMS_CA_KEY}={ca_pin(kms_dir)}"
        words = {"expected": [pinned], "modified": [pinned, MODIFIED_CMDLINE]}
        eifs = {name: with_cmdline_words(built.path, w, work / f"{name}.eif") for name, w in words.items()}
        pcr0 = eifs["expected"].measurements.pcr0.hex()
        operator = kms.credentials("operator")
        key = kms.create_key(measured_enclave_policy(operator.arn, pcr0), description="teelab demo enclave")
        endpoint = Transport.endpoint(kms.endpoint, tls=client_context(kms_dir))
        with KmsClient(endpoint, access_key=operator.access_key, secret=operator.secret) as client:
            blob = client.encrypt(key.id, secret)
        detail.update(recipe=built.name, cached=not built.built, key=key.id, pcr0=pcr0)
    with phase("parent") as detail:
        # room for both enclaves at once: the modified one is carved while the expected one unseals
        pool = EnclavePool(memory_mib=2 * ENCLAVE_MEMORY_MIB, cpu_count=2 * ENCLAVE_VCPUS)
        parent: ParentVm = lab.boot_parent(name="demo-parent", pool=pool, tee="snp")
        start_kms_proxy(parent)
        detail.update(
            boot=round(parent.boot.seconds, 2), tee=lab.tee_mode("snp"), cpu_mapping=parent.layout.reason
        )
    ca_pem = ca_certificate_pem(kms_dir)  # handed over untrusted: checked against the pin in the enclave
    with phase("carve") as detail:
        job = serve_unseal_jobs(parent, blob, ca_pem, count=len(eifs))
        enclaves = {
            name: parent.carve(
                image.path,
                memory_mib=ENCLAVE_MEMORY_MIB,
                cpu_count=ENCLAVE_VCPUS,
                name=f"demo-enclave-{name}",
            )
            for name, image in eifs.items()
        }
        detail.update({name: enclave.carve_seconds for name, enclave in enclaves.items()})
    with phase("enclave-unseal") as detail:
        answers = unseal_outcomes(job)
        for name, enclave in enclaves.items():
            parent.terminate(enclave)
            outcome = answers.get(enclave.cid, {"outcome": "broken", "output": "no answer from its CID"})
            outcome.update(pcr0=eifs[name].measurements.pcr0.hex(), enclave_id=enclave.enclave_id)
            outcome.update(cid=enclave.cid, carve=enclave.carve_seconds, heartbeat=enclave.heartbeat_seconds)
            result.enclaves[name] = outcome
            detail[name] = outcome["outcome"]
    return key.id


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
