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
from harness.agent import GuestAgent
from harness.attest import default_lab_dir
from harness.attest.tpm_ca import TpmAuthority
from harness.host import runtime
from harness.kms import KmsServer
from harness.lab import GuestBoot, Lab, tpm_guest
from harness.qemu import VirtioBlkPci
from harness.tee import tpm_measure
from harness.tee.vtpm_attest import CertifiedAk, certify_ak
from harness.tee.vtpm_disk import Unlocked, new_volume_key, unlock_disk

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

    with ExitStack() as stack:
        demo = _DiskDemo(stack)
        with phase("boot") as detail:
            plan, first, ak = demo.boot("demo-tpm-expected")
            detail.update(cvm="expected", seconds_to_ready=round(first.seconds, 2), vtpm="ephemeral")
        with phase("kms-key") as detail:
            detail.update(demo.make_key(plan))
        with phase("unlock") as detail:
            detail.update(demo.format_and_write(first, ak))
        with phase("reboot") as detail:
            detail.update(demo.reboot_and_read())
        with phase("modified") as detail:
            detail.update(demo.modified())
        with phase("audit") as detail:
            rows = [r for r in demo.kms.store.audit(key_id=demo.key) if r.operation == "Decrypt"]
            detail["decisions"] = [r.decision for r in rows]
    names = ("formatted", "not-in-image", "read-back", "modified-refused")
    result.ok = all(demo.checks.get(name) for name in names)
    result.seconds = time.monotonic() - started
    return result


class _DiskDemo:
    """The demo's lab, KMS, disk image and checks; one method per phase."""

    def __init__(self, stack: ExitStack) -> None:
        self.lab = stack.enter_context(Lab())
        scratch = stack.enter_context(runtime.scratch_dir("demo-tpm"))
        self.disk = scratch / "data.img"
        with open(self.disk, "wb") as handle:
            handle.truncate(DISK_MIB << 20)
        self.image = images.build("cvm")
        self.authority = TpmAuthority.load_or_create()
        self.kms = stack.enter_context(KmsServer.start(scratch / "kms", lab_dir=default_lab_dir()))
        creds = self.kms.credentials("admin")
        endpoint = Transport.endpoint(self.kms.endpoint)
        self.operator = KmsClient(endpoint, access_key=creds.access_key, secret=creds.secret)
        self.anyone = KmsClient(Transport.endpoint(self.kms.endpoint))
        self.secret = b"teelab demo disk secret " + os.urandom(8).hex().encode()
        self.checks: dict[str, bool] = {}
        self.key = ""
        self.blob = b""

    def boot(self, name: str, extra: str = "") -> tuple[Any, GuestBoot, CertifiedAk]:
        plan = self.lab.plan_cvm(self.image, name=name, vsock=False, vtpm="ephemeral", cmdline_extra=extra,
                                 devices=(VirtioBlkPci("disk0", self.disk),))  # fmt: skip
        booted = self.lab.boot_planned(plan, timeout=180)
        return plan, booted, certify_ak(tpm_guest(booted), self.authority)

    def make_key(self, plan: Any) -> dict[str, Any]:
        pcrs = tpm_measure.predict(plan.spec.cmdline, self.image.initrd).pcrs
        policy = disk_key_policy(pcrs, plan.measurement_hex() or "")
        self.key = self.kms.create_key(policy, description="teelab demo disk").id
        self.blob = new_volume_key(self.operator, self.key)
        return {"key": self.key, "pcr8": pcrs[8].hex()[:16] + "...", "pcr9": pcrs[9].hex()[:16] + "..."}

    def unlock(self, boot: GuestBoot, ak: CertifiedAk) -> Unlocked:
        return unlock_disk(tpm_guest(boot, "teelab_guest.tpm_disk"), self.anyone, ak, self.blob)

    def format_and_write(self, boot: GuestBoot, ak: CertifiedAk) -> dict[str, Any]:
        opened = self.unlock(boot, ak)
        write = f"printf %s '{self.secret.decode()}' | dd of={opened.device} bs=512 count=1 conv=sync && sync"
        _agent(boot).exec(["sh", "-c", write], check=True)
        self.lab.stop(boot.machine)
        self.checks["formatted"] = opened.formatted
        self.checks["not-in-image"] = self.secret not in self.disk.read_bytes()
        return {"formatted": opened.formatted, "secret_in_disk_image": not self.checks["not-in-image"]}

    def reboot_and_read(self) -> dict[str, Any]:
        _, boot, ak = self.boot("demo-tpm-expected")
        opened = self.unlock(boot, ak)
        read = _agent(boot).exec(["dd", f"if={opened.device}", "bs=512", "count=1"], check=True).stdout
        self.lab.stop(boot.machine)
        self.checks["read-back"] = read.startswith(self.secret)
        digest = hashlib.sha256(read[: len(self.secret)]).hexdigest()
        return {"opened": True, "secret_sha256": digest[:16] + "..."}

    def modified(self) -> dict[str, Any]:
        _, boot, ak = self.boot("demo-tpm-modified", MODIFIED_CMDLINE)
        try:
            self.unlock(boot, ak)
            outcome = "served"
        except KmsCallError as err:
            outcome = f"refused ({err.aws_type})"
            self.checks["modified-refused"] = err.aws_type == "AccessDeniedException"
        self.lab.stop(boot.machine)
        return {"cmdline_extra": MODIFIED_CMDLINE, "outcome": outcome}


def _agent(boot: GuestBoot) -> GuestAgent:
    if boot.agent is None:
        raise RuntimeError(f"{boot.machine.spec.name} has no guest agent")
    return boot.agent
