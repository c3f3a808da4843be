"""``teelab demo --tpm``: an attested CVM with a vTPM unlocks its LUKS2 data disk; a changed command line
cannot. The lab KMS holds a volume key whose policy names the expected CVM's vTPM PCRs 8-9 and SNP launch
measurement; the host holds only the key's ciphertext and the disk image."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from teelab_guest.kms_client import KmsCallError, KmsClient, Transport

from harness import images
from harness.attest.lab import default_lab_dir
from harness.attest.tpm_ca import TpmAuthority
from harness.host import runtime
from harness.kms import KmsServer
from harness.lab import Lab, tpm_guest
from harness.qemu import VirtioBlkPci
from harness.tee import tpm_measure
from harness.tee.vtpm_attest import certify_ak
from harness.tee.vtpm_disk import new_volume_key, unlock_disk

DISK_MIB = 64
MODIFIED_CMDLINE = "teelab.variant=modified"
OPERATOR = "arn:aws:iam::000000000000:root"


@dataclass
class TpmPhase:
    name: str
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class TpmDemoResult:
    phases: list[TpmPhase] = field(default_factory=list)
    ok: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 2),
            "phases": [{"name": p.name, "seconds": round(p.seconds, 2), **p.detail} for p in self.phases],
        }


def disk_key_policy(pcrs: dict[int, bytes], measurement: str) -> dict[str, Any]:
    """Decrypt with a Recipient for the measured CVM only; the operator makes volume keys, cannot read one."""
    return {
        "Statement": [
            {"Sid": "attested", "Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Condition": {
                "StringEqualsIgnoreCase": {
                    "teelab:RecipientAttestation:TpmPcr8": pcrs[8].hex(),
                    "teelab:RecipientAttestation:TpmPcr9": pcrs[9].hex(),
                    "teelab:RecipientAttestation:SnpMeasurement": measurement,
                },
                "StringEquals": {"teelab:RecipientAttestation:Root": "lab"},
            }},
            {"Sid": "operator", "Effect": "Allow", "Principal": {"AWS": OPERATOR},
             "Action": ["kms:GenerateDataKeyWithoutPlaintext", "kms:DescribeKey"]},
        ]
    }  # fmt: skip


def run_tpm_demo(on_phase: Callable[[TpmPhase], None] | None = None) -> TpmDemoResult:
    """``ok`` only when the expected CVM formats its disk, reads its secret back after a reboot, the secret is
    not in the disk image, and the CVM with the changed command line is refused."""
    result = TpmDemoResult()
    started = time.monotonic()

    @contextmanager
    def phase(name: str) -> Iterator[dict[str, Any]]:
        begun = time.monotonic()
        detail: dict[str, Any] = {}
        yield detail
        done = TpmPhase(name, time.monotonic() - begun, detail)
        result.phases.append(done)
        if on_phase:
            on_phase(done)

    secret = b"teelab demo disk secret " + os.urandom(8).hex().encode()
    checks: dict[str, bool] = {}
    with ExitStack() as stack:
        lab = stack.enter_context(Lab())
        scratch = stack.enter_context(runtime.scratch_dir("demo-tpm"))
        disk = scratch / "data.img"
        with open(disk, "wb") as handle:
            handle.truncate(DISK_MIB << 20)
        image = images.build("cvm")
        authority = TpmAuthority.load_or_create()
        kms = stack.enter_context(KmsServer.start(scratch / "kms", lab_dir=default_lab_dir()))
        creds = kms.credentials("admin")
        operator = KmsClient(
            Transport.endpoint(kms.endpoint), access_key=creds.access_key, secret=creds.secret
        )
        anyone = KmsClient(Transport.endpoint(kms.endpoint))

        def boot(name: str, extra: str = "") -> tuple[Any, Any, Any]:
            plan = lab.plan_cvm(image, name=name, vsock=False, vtpm="ephemeral", cmdline_extra=extra,
                                devices=(VirtioBlkPci("disk0", disk),))  # fmt: skip
            booted = lab.boot_planned(plan, timeout=180)
            return plan, booted, certify_ak(tpm_guest(booted), authority)

        with phase("boot") as detail:
            plan, first, ak = boot("demo-tpm-expected")
            detail.update(cvm="expected", seconds_to_ready=round(first.seconds, 2), vtpm="ephemeral")
        with phase("kms-key") as detail:
            pcrs = tpm_measure.predict(plan.spec.cmdline, image.initrd).pcrs
            key = kms.create_key(disk_key_policy(pcrs, plan.measurement_hex() or ""), description="disk").id
            blob = new_volume_key(operator, key)
            detail.update(key=key, pcr8=pcrs[8].hex()[:16] + "...", pcr9=pcrs[9].hex()[:16] + "...")
        with phase("unlock") as detail:
            opened = unlock_disk(tpm_guest(first, "teelab_guest.tpm_disk"), anyone, ak, blob)
            write = f"printf %s '{secret.decode()}' | dd of={opened.device} bs=512 count=1 conv=sync && sync"
            first.agent.exec(["sh", "-c", write], check=True)  # type: ignore[union-attr]
            lab.stop(first.machine)
            checks["formatted"] = opened.formatted
            checks["not-in-image"] = secret not in disk.read_bytes()
            detail.update(formatted=opened.formatted, secret_in_disk_image=not checks["not-in-image"])
        with phase("reboot") as detail:
            _, second, ak = boot("demo-tpm-expected")
            opened = unlock_disk(tpm_guest(second, "teelab_guest.tpm_disk"), anyone, ak, blob)
            read = second.agent.exec(["dd", f"if={opened.device}", "bs=512", "count=1"], check=True).stdout  # type: ignore[union-attr]
            lab.stop(second.machine)
            checks["read-back"] = read.startswith(secret)
            detail.update(
                opened=True, secret_sha256=hashlib.sha256(read[: len(secret)]).hexdigest()[:16] + "..."
            )
        with phase("modified") as detail:
            _, other, ak = boot("demo-tpm-modified", MODIFIED_CMDLINE)
            try:
                unlock_disk(tpm_guest(other, "teelab_guest.tpm_disk"), anyone, ak, blob)
                outcome = "served"
            except KmsCallError as err:
                outcome = f"refused ({err.aws_type})"
                checks["modified-refused"] = err.aws_type == "AccessDeniedException"
            lab.stop(other.machine)
            detail.update(cmdline_extra=MODIFIED_CMDLINE, outcome=outcome)
        with phase("audit") as detail:
            rows = [r for r in kms.store.audit(key_id=key) if r.operation == "Decrypt"]
            detail["decisions"] = [r.decision for r in rows]
    result.ok = all(
        checks.get(name) for name in ("formatted", "not-in-image", "read-back", "modified-refused")
    )
    result.seconds = time.monotonic() - started
    return result
