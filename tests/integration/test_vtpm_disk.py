"""A CVM with a vTPM and a LUKS2 data disk whose volume key the KMS releases only after attestation: the
attested guest formats and opens it, finds its secret again after a reboot, the secret never appears in the
disk image, and the same disk under another kernel command line stays closed (the KMS refuses)."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from teelab_guest.kms_client import KmsCallError, KmsClient, Transport

from harness.attest import default_lab_dir
from harness.attest.tpm_ca import TpmAuthority
from harness.demo_tpm import disk_key_policy
from harness.kms import KmsServer
from harness.lab import GuestBoot, Lab, tpm_guest
from harness.qemu import VirtioBlkPci
from harness.tee import tpm_measure
from harness.tee.vtpm_attest import CertifiedAk, certify_ak
from harness.tee.vtpm_disk import new_volume_key, unlock_disk

pytestmark = pytest.mark.vm


def test_the_attested_cvm_opens_its_disk_after_a_reboot_and_another_command_line_cannot(
    cvm_image, tmp_path: Path
) -> None:
    disk = tmp_path / "data.img"
    with open(disk, "wb") as handle:
        handle.truncate(64 << 20)
    secret = b"TEELAB-DISK-SECRET-" + os.urandom(12).hex().encode()
    authority = TpmAuthority.load_or_create()
    with KmsServer.start(tmp_path / "kms", lab_dir=default_lab_dir()) as server, Lab() as lab:
        creds = server.credentials("admin")
        operator = KmsClient(
            Transport.endpoint(server.endpoint), access_key=creds.access_key, secret=creds.secret
        )
        anyone = KmsClient(Transport.endpoint(server.endpoint))

        def boot(name: str, extra: str = "") -> tuple[Any, GuestBoot, CertifiedAk]:
            plan = lab.plan_cvm(cvm_image, name=name, vsock=False, vtpm="ephemeral", cmdline_extra=extra,
                                devices=(VirtioBlkPci("disk0", disk),))  # fmt: skip
            booted = lab.boot_planned(plan, timeout=180)
            return plan, booted, certify_ak(tpm_guest(booted), authority)

        plan, first, ak = boot("disk-1")
        pcrs = tpm_measure.predict(plan.spec.cmdline, cvm_image.initrd).pcrs
        key = server.create_key(disk_key_policy(pcrs, plan.measurement_hex())).id
        blob = new_volume_key(operator, key)
        with pytest.raises(KmsCallError) as err:  # the operator who made it cannot read the volume key
            operator.call("Decrypt", {"CiphertextBlob": base64.b64encode(blob).decode(), "KeyId": key})
        assert err.value.aws_type == "AccessDeniedException"
        opened = unlock_disk(tpm_guest(first, "teelab_guest.tpm_disk"), anyone, ak, blob)
        assert opened.formatted and opened.device == "/dev/mapper/teelab-data"
        assert first.agent is not None
        write = f"printf %s {secret.decode()} | dd of={opened.device} bs=512 count=1 conv=sync && sync"
        first.agent.exec(["sh", "-c", write], check=True)
        lab.stop(first.machine)
        assert secret not in disk.read_bytes()

        _, second, ak = boot("disk-2")  # a reboot with the same inputs: a new vTPM, the same measurements
        opened = unlock_disk(tpm_guest(second, "teelab_guest.tpm_disk"), anyone, ak, blob)
        assert not opened.formatted
        assert second.agent is not None
        read = second.agent.exec(["dd", f"if={opened.device}", "bs=512", "count=1"], check=True).stdout
        assert read.startswith(secret)
        lab.stop(second.machine)

        _, other, ak = boot("disk-3", extra="teelab.other=1")  # another command line: PCR 8 and SNP differ
        with pytest.raises(KmsCallError) as err:
            unlock_disk(tpm_guest(other, "teelab_guest.tpm_disk"), anyone, ak, blob)
        assert err.value.aws_type == "AccessDeniedException"
        assert other.agent is not None
        assert other.agent.exec(["test", "-e", "/dev/mapper/teelab-data"]).returncode != 0
        lab.stop(other.machine)
    assert secret not in disk.read_bytes()


@pytest.mark.slow
def test_teelab_demo_tpm_unlocks_for_the_expected_cvm_only() -> None:
    """The demo leg end to end, as a user runs it: its exit status and JSON."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "demo", "--tpm", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], done.stderr[-2000:]
    phases = {p["name"]: p for p in result["phases"]}
    assert phases["unlock"]["formatted"] and not phases["unlock"]["secret_in_disk_image"]
    assert phases["modified"]["outcome"] == "refused (AccessDeniedException)"
    assert phases["audit"]["decisions"] == ["allow", "allow", "deny"]
