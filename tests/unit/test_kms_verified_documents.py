"""Enclave documents whose verdict the KMS remembers (``VerifiedDocuments``): a remembered document still
meets the clock, the replay rule and the key policy on every request; a changed byte, a lab CA gone or a key
policy trusting other roots verify it again; refusals and other evidence kinds are never remembered; the
memory is bounded. Real lab evidence, the real verifier and service, a clock the tests move."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from teelab_guest.binding import report_data
from teelab_guest.kms_client import RecipientKey

from harness.attest import LabAuthority
from harness.kms.base import Audit
from harness.kms.errors import AccessDenied, EvidenceRefused
from harness.kms.material import encrypt_blob
from harness.kms.recipient import AttestVerifier, VerifiedDocuments
from harness.kms.service import KmsService
from harness.kms.store import Store

PCR0 = bytes.fromhex("3c" * 48)
SECRET = b"released only to the attested enclave"
AGAIN = "(the same document verified before)"


class Clock:
    """Real time plus however far the test has moved it."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


def policy(pcr0: bytes = PCR0, *, name_lab: bool = True) -> str:
    condition: dict[str, Any] = {
        "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": pcr0.hex()}
    }
    if name_lab:
        condition["StringEquals"] = {"teelab:RecipientAttestation:Root": "lab"}
    statement = {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Condition": condition}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


class Kms:
    """A KmsService over a store in a temporary directory, with the verifier and clock the tests look at."""

    def __init__(self, directory: Path, lab_dir: Path, verified: VerifiedDocuments | None = None) -> None:
        self.store = Store.open(directory)
        self.verifier = AttestVerifier(lab_dir, verified=verified)
        self.clock = Clock()
        self.service = KmsService(self.store, self.verifier, clock=self.clock)

    def blob(self, text: str) -> str:
        key = self.store.create_key(text, "test")
        return base64.b64encode(encrypt_blob(key.id, self.store.material(key.id), SECRET, None)).decode()

    def decrypt(self, blob: str, recipient: dict[str, str]) -> tuple[bytes, list[str]]:
        """The envelope the KMS answered and the audit reasons (also kept in ``reasons`` when it refuses)."""
        audit = Audit("Decrypt", None)
        self.reasons = audit.reasons
        outcome = self.service.call("Decrypt", {"CiphertextBlob": blob, "Recipient": recipient}, audit)
        assert "Plaintext" not in outcome.response
        return base64.b64decode(outcome.response["CiphertextForRecipient"]), audit.reasons

    def remembered(self) -> bool:
        """Whether the last request's document was a remembered one (its audit reasons say so)."""
        return any(AGAIN in reason for reason in self.reasons)


@pytest.fixture(scope="module")
def enclave() -> RecipientKey:
    return RecipientKey()


@pytest.fixture
def kms(tmp_path: Path, lab: LabAuthority) -> Iterator[Kms]:
    kms = Kms(tmp_path / "kms", lab.directory)
    yield kms
    kms.store.close()


def document(
    lab: LabAuthority, enclave: RecipientKey, *, nonce: bytes | None = None, module: str = "enc0"
) -> bytes:
    return lab.attestation_document(
        pcrs={0: PCR0, 1: bytes.fromhex("11" * 48), 2: bytes(48)},
        public_key=enclave.public_key_der,
        user_data=None,
        nonce=nonce,
        module_id=f"i-0123456789abcdef0-{module}",
    )


def test_a_remembered_document_still_meets_the_clock_and_each_key_policy(
    kms: Kms, lab: LabAuthority, enclave: RecipientKey
) -> None:
    blob = kms.blob(policy())
    field = enclave.field(document(lab, enclave))
    assert enclave.open(kms.decrypt(blob, field)[0]) == SECRET
    assert not kms.remembered() and len(kms.verifier.verified) == 1
    assert enclave.open(kms.decrypt(blob, field)[0]) == SECRET
    assert kms.remembered()
    # each key's policy is evaluated per request: another PCR0 is refused with the same remembered document
    with pytest.raises(AccessDenied):
        kms.decrypt(kms.blob(policy(bytes(48))), field)
    assert kms.remembered()
    # a key policy that does not name the lab root trusts other roots: the document is verified again, refused
    with pytest.raises(EvidenceRefused, match="untrusted-root"):
        kms.decrypt(kms.blob(policy(name_lab=False)), field)
    assert not kms.remembered()
    # the age limit is checked against the clock on every request, remembered or not
    kms.clock.ahead = kms.service.config.max_evidence_age_s + 60
    with pytest.raises(EvidenceRefused, match="old"):
        kms.decrypt(blob, field)
    assert kms.remembered()


def test_a_remembered_document_with_a_nonce_is_still_refused_as_a_replay(
    kms: Kms, lab: LabAuthority, enclave: RecipientKey
) -> None:
    blob = kms.blob(policy())
    field = enclave.field(document(lab, enclave, nonce=os.urandom(16)))
    assert enclave.open(kms.decrypt(blob, field)[0]) == SECRET
    with pytest.raises(EvidenceRefused, match="replay"):
        kms.decrypt(blob, field)
    assert kms.remembered()


def test_one_changed_byte_is_verified_in_full_and_refusals_are_not_remembered(
    kms: Kms, lab: LabAuthority, enclave: RecipientKey
) -> None:
    blob = kms.blob(policy())
    good = document(lab, enclave)
    kms.decrypt(blob, enclave.field(good))
    forged = good[:-1] + bytes([good[-1] ^ 1])  # the last byte of the ES384 signature
    for _ in range(2):
        with pytest.raises(EvidenceRefused, match="signature"):
            kms.decrypt(blob, enclave.field(forged))
    assert len(kms.verifier.verified) == 1


def test_a_lab_ca_gone_from_its_directory_makes_remembered_documents_fail(
    tmp_path: Path, lab: LabAuthority, enclave: RecipientKey
) -> None:
    copy = tmp_path / "lab-ca"
    shutil.copytree(lab.directory, copy)
    kms = Kms(tmp_path / "kms", copy)
    try:
        blob = kms.blob(policy())
        field = enclave.field(document(lab, enclave))
        kms.decrypt(blob, field)
        kms.decrypt(blob, field)
        (copy / "authority.json").rename(copy / "authority.json.gone")
        with pytest.raises(EvidenceRefused, match="untrusted-root"):
            kms.decrypt(blob, field)
    finally:
        kms.store.close()


def test_snp_reports_are_not_remembered_and_the_memory_is_bounded(
    tmp_path: Path, lab: LabAuthority, enclave: RecipientKey
) -> None:
    kms = Kms(tmp_path / "kms", lab.directory, VerifiedDocuments(limit=2))
    try:
        blob = kms.blob(policy())
        fields = [enclave.field(document(lab, enclave, module=f"enc{i}")) for i in range(3)]
        for field in fields:
            kms.decrypt(blob, field)
        assert len(kms.verifier.verified) == 2
        # the least recently used went first: the first document is verified again, the last one is not
        kms.decrypt(blob, fields[0])
        assert not kms.remembered()
        kms.decrypt(blob, fields[2])
        assert kms.remembered()
        snp_policy = json.dumps(
            {
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": "kms:Decrypt",
                        "Condition": {"StringEquals": {"teelab:RecipientAttestation:Root": "lab"}},
                    }
                ]
            }
        )
        snp_blob = kms.blob(snp_policy)
        before = dict(kms.verifier.verified._entries)
        nonce = os.urandom(32)
        report = lab.snp_report(report_data(nonce, enclave.public_key_der), measurement=bytes(48))
        snp_field = enclave.field(report, nonce=nonce)
        assert enclave.open(kms.decrypt(snp_blob, snp_field)[0]) == SECRET
        assert dict(kms.verifier.verified._entries) == before
    finally:
        kms.store.close()
