"""The KMS releases to a vTPM quote: the quote's extraData binds the Recipient's nonce and key, key policies
name vTPM PCRs (teelab:RecipientAttestation:TpmPcrN) and, for a CVM whose SNP report binds the AK, its SNP
keys too. A real swtpm (no VM) measured the 'boot'; the lab KMS runs in this process."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from teelab_guest import tpm_attest, tpm_boot, tpm_wire
from teelab_guest.binding import report_data
from teelab_guest.kms_client import KmsCallError, KmsClient, RecipientKey, Transport
from tpm_sim import swtpm

from harness.attest import LabAuthority
from harness.attest.tpm_ca import TpmAuthority
from harness.kms import KmsServer
from harness.tee import vtpm_attest
from harness.tee.vtpm_attest import CertifiedAk

SECRET = b"the LUKS volume key stands in here"
MEASUREMENT = bytes.fromhex("7c" * 48)


@pytest.fixture(scope="module")
def measured(
    lab: LabAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, CertifiedAk]]:
    """A vTPM whose 'guest' measured a command line, and its AK certified by the lab AK CA."""
    root = tmp_path_factory.mktemp("guest")
    (root / "init").write_text("#!/init\n")
    (root / "cmdline").write_text("console=ttyS0 teelab.role=cvm\n")
    authority = TpmAuthority.load_or_create(lab.directory / "tpm")
    with swtpm(authority) as tpm:
        tpm_boot.measure_boot(
            tpm.pcr_extend, tpm_boot.boot_events(str(root), str(root / "cmdline")), str(root / "log")
        )

        def guest(args: Sequence[str]) -> dict[str, Any]:
            return tpm_attest.run(tpm, list(args), event_log=str(root / "log"))

        yield guest, vtpm_attest.certify_ak(guest, authority)


def policy(conditions: dict[str, Any]) -> dict[str, Any]:
    return {
        "Statement": [
            {
                "Sid": "attested",
                "Effect": "Allow",
                "Principal": "*",
                "Action": "kms:Decrypt",
                "Condition": conditions,
            },
            {
                "Sid": "operator",
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::000000000000:root"},
                "Action": "kms:*",
            },
        ]
    }


def evidence(
    measured: tuple[Any, CertifiedAk], recipient: RecipientKey, nonce: bytes, **options: Any
) -> bytes:
    guest, ak = measured
    return vtpm_attest.quote(guest, ak, report_data(nonce, recipient.public_key_der), **options).to_bytes()


def admin(server: KmsServer) -> KmsClient:
    creds = server.credentials("admin")
    return KmsClient(Transport.endpoint(server.endpoint), access_key=creds.access_key, secret=creds.secret)


def refused(call: Any) -> str:
    with pytest.raises(KmsCallError) as err:
        call()
    return err.value.aws_type


def test_a_key_policy_on_vtpm_pcrs_releases_only_to_that_boot_and_key(
    server: KmsServer, measured: tuple[Any, CertifiedAk]
) -> None:
    guest, _ = measured
    pcr8 = guest(["quote", "00"])["pcrs"]["8"]
    key = server.create_key(policy({
        "StringEqualsIgnoreCase": {"teelab:RecipientAttestation:TpmPcr8": pcr8},
        "StringEquals": {"teelab:RecipientAttestation:Root": "lab",
                         "teelab:RecipientAttestation:Kind": "tpm"},
    })).id  # fmt: skip
    creds = server.credentials("admin")
    blob = KmsClient(
        Transport.endpoint(server.endpoint), access_key=creds.access_key, secret=creds.secret
    ).encrypt(key, SECRET)
    client = KmsClient(Transport.endpoint(server.endpoint))
    recipient, nonce = RecipientKey(), os.urandom(32)
    assert (
        client.decrypt(blob, recipient=recipient, evidence=evidence(measured, recipient, nonce), nonce=nonce)
        == SECRET
    )
    thief, nonce = RecipientKey(), os.urandom(32)  # the quote binds another key than the one beside it
    stolen = evidence(measured, recipient, nonce)
    assert (
        refused(lambda: client.decrypt(blob, recipient=thief, evidence=stolen, nonce=nonce))
        == "AccessDeniedException"
    )
    other = server.create_key(
        policy({"StringEqualsIgnoreCase": {"teelab:RecipientAttestation:TpmPcr8": "00" * 32}})
    ).id
    other_blob = KmsClient(
        Transport.endpoint(server.endpoint), access_key=creds.access_key, secret=creds.secret
    ).encrypt(other, SECRET)
    nonce = os.urandom(32)
    quote = evidence(measured, recipient, nonce)
    assert (
        refused(lambda: client.decrypt(other_blob, recipient=recipient, evidence=quote, nonce=nonce))
        == "AccessDeniedException"
    )


def test_a_cvm_key_needs_the_snp_report_that_binds_the_ak(
    server: KmsServer, measured: tuple[Any, CertifiedAk], lab: LabAuthority
) -> None:
    """A key for a CVM with a vTPM: its SNP measurement and a vTPM PCR in one policy. The quote alone (no
    report) is refused; with the lab's SNP report binding (nonce, AK) beside the quote it is served."""
    guest, ak = measured
    pcr8 = guest(["quote", "00"])["pcrs"]["8"]
    key = server.create_key(policy({
        "StringEqualsIgnoreCase": {"teelab:RecipientAttestation:TpmPcr8": pcr8,
                                   "teelab:RecipientAttestation:SnpMeasurement": MEASUREMENT.hex()},
        "StringEquals": {"teelab:RecipientAttestation:Root": "lab"},
    })).id  # fmt: skip
    creds = server.credentials("admin")
    blob = KmsClient(
        Transport.endpoint(server.endpoint), access_key=creds.access_key, secret=creds.secret
    ).encrypt(key, SECRET)
    client = KmsClient(Transport.endpoint(server.endpoint))
    recipient, nonce = RecipientKey(), os.urandom(32)
    alone = evidence(measured, recipient, nonce)
    assert (
        refused(lambda: client.decrypt(blob, recipient=recipient, evidence=alone, nonce=nonce))
        == "AccessDeniedException"
    )

    snp_policy = 0x30000

    def cvm(args: Sequence[str]) -> dict[str, Any]:  # the guest's `quote X tee`, its report from the lab CA
        answer = guest([a for a in args if a != "tee"])
        spki = tpm_wire.ak_spki_der(tpm_wire.parse_ecc_public(ak.ak_public))
        bound = report_data(bytes.fromhex(args[1]), spki)
        report = lab.snp_report(bound, measurement=MEASUREMENT, policy=snp_policy)
        return answer | {
            "tee_evidence": tpm_attest.b64(report),
            "tee_certificates": tpm_attest.b64(lab.snp_cert_table()),
        }

    nonce = os.urandom(32)
    both = vtpm_attest.quote(cvm, ak, report_data(nonce, recipient.public_key_der), tee=True).to_bytes()
    assert client.decrypt(blob, recipient=recipient, evidence=both, nonce=nonce) == SECRET
    snp_policy |= 1 << 19  # a debug CVM: the key policy does not allow Debug
    nonce = os.urandom(32)
    debug = vtpm_attest.quote(cvm, ak, report_data(nonce, recipient.public_key_der), tee=True).to_bytes()
    assert (
        refused(lambda: client.decrypt(blob, recipient=recipient, evidence=debug, nonce=nonce))
        == "AccessDeniedException"
    )
