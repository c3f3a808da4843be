"""A CVM's confidential data disk, host side: the KMS releases the LUKS volume key only to a guest whose vTPM
quote (and, in a CVM, SNP report) its key policy accepts, sealed to a key that never leaves the guest.

The host holds the disk image, the volume key's KMS ciphertext (``GenerateDataKeyWithoutPlaintext``) and the
vTPM state; none of them yields the key. On every boot: the guest makes a recipient key and a quote binding
it (``teelab_guest.tpm_disk recipient``), the host relays that Recipient to the KMS's Decrypt and gets back a
CiphertextForRecipient, which only the guest can open (``unlock``: LUKS2 format on first use, then open).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from teelab_guest.kms_client import KmsClient
from teelab_guest.kms_envelope import KEY_ENCRYPTION_ALGORITHM

from harness.tee.vtpm_attest import CertifiedAk, evidence_from_answer

GUEST_MODULE = "teelab_guest.tpm_disk"
# (argv after the module, stdin) -> the JSON the guest printed
GuestDiskCall = Callable[[Sequence[str], bytes], dict[str, Any]]


@dataclass(frozen=True)
class Unlocked:
    device: str  # /dev/mapper/NAME in the guest
    formatted: bool  # True on the first unlock: the disk was made LUKS2 now
    evidence_bytes: int


def new_volume_key(kms: KmsClient, key_id: str) -> bytes:
    """A fresh 256-bit volume key as KMS ciphertext only (the plaintext never reaches the host)."""
    answer = kms.call("GenerateDataKeyWithoutPlaintext", {"KeyId": key_id, "KeySpec": "AES_256"})
    return base64.b64decode(answer["CiphertextBlob"])


def unlock_disk(
    guest: GuestDiskCall, kms: KmsClient, ak: CertifiedAk, volume_key_blob: bytes, *,
    device: str = "/dev/vda", name: str = "teelab-data", tee: bool = True,
) -> Unlocked:  # fmt: skip
    """Attest, let the KMS release the volume key to the guest, and open the disk there. A KMS refusal
    (KmsCallError: AccessDeniedException) leaves the disk closed."""
    nonce = os.urandom(32)
    answer = guest(["recipient", nonce.hex(), *(["tee"] if tee else [])], b"")
    evidence = evidence_from_answer(answer, ak).to_bytes()
    recipient = {
        "AttestationDocument": base64.b64encode(evidence).decode(),
        "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
        "PublicKey": answer["public_key"],
        "Nonce": base64.b64encode(nonce).decode(),
    }
    released = kms.call(
        "Decrypt", {"CiphertextBlob": base64.b64encode(volume_key_blob).decode(), "Recipient": recipient}
    )
    opened = guest(["unlock", device, name], base64.b64decode(released["CiphertextForRecipient"]))
    return Unlocked(str(opened["device"]), bool(opened["formatted"]), len(evidence))
