"""A CVM's confidential data disk: LUKS2 whose volume key the KMS releases only to an attested guest, run by
the host through the agent: ``python3 -m teelab_guest.tpm_disk VERB ...`` prints one JSON object.

- ``recipient NONCE [tee]``: a fresh RSA key for the KMS to seal the volume key to (its private half stays in
  this guest's RAM, /run/teelab, until ``unlock``), and a vTPM quote whose extraData binds the nonce and that
  key (``binding.report_data``), with the CVM's SNP report binding the AK when ``tee`` is given;
- ``unlock DEVICE NAME``: stdin is the KMS's CiphertextForRecipient; the volume key it opens formats DEVICE
  (LUKS2, aes-xts-plain64, PBKDF2 with 1000 iterations: the key is 32 random bytes from the KMS, so a slow
  KDF adds nothing but boot time under TCG) if it is not LUKS yet, then opens it as /dev/mapper/NAME. The key
  goes to cryptsetup on a pipe; it is never written anywhere or printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from teelab_guest import binding
from teelab_guest.tpm_attest import b64
from teelab_guest.tpm_attest import run as tpm_run
from teelab_guest.tpm_device import Tpm

RECIPIENT_KEY = "/run/teelab/disk-recipient.pem"
LUKS_FORMAT = ["--type", "luks2", "--batch-mode", "--cipher", "aes-xts-plain64", "--key-size", "512",
               "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]  # fmt: skip


class DiskError(RuntimeError):
    """cryptsetup or the envelope refused; the message says which step."""


def recipient(tpm: Tpm, nonce: bytes, tee: bool, key_path: str = RECIPIENT_KEY) -> dict[str, object]:
    from cryptography.hazmat.primitives import serialization

    from teelab_guest.kms_client import RecipientKey

    key = RecipientKey()
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    os.makedirs(os.path.dirname(key_path), exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    bound = binding.report_data(nonce, key.public_key_der)
    answer = tpm_run(tpm, ["quote", bound.hex(), *(["tee"] if tee else [])])
    return {"public_key": b64(key.public_key_der), **answer}


def volume_key(envelope: bytes, key_path: str = RECIPIENT_KEY) -> bytes:
    """The volume key out of the KMS's envelope; the recipient key is used once and removed."""
    from cryptography.hazmat.primitives import serialization

    from teelab_guest.kms_envelope import open_envelope

    try:
        with open(key_path, "rb") as handle:
            private = serialization.load_pem_private_key(handle.read(), password=None)
    except FileNotFoundError:
        raise DiskError("no recipient key: run `recipient` first") from None
    finally:
        if os.path.exists(key_path):
            os.unlink(key_path)
    return open_envelope(envelope, private)  # type: ignore[arg-type]


def cryptsetup(args: list[str], key: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, DM_DISABLE_UDEV="1")  # no udev in the guest: libdevmapper makes the nodes itself
    return subprocess.run(["cryptsetup", *args], input=key, capture_output=True, env=env, check=False)


def unlock(device: str, name: str, key: bytes) -> dict[str, object]:
    formatted = cryptsetup(["isLuks", device]).returncode != 0
    if formatted:
        done = cryptsetup(["luksFormat", *LUKS_FORMAT, "--key-file=-", device], key)
        if done.returncode != 0:
            raise DiskError(f"luksFormat {device}: {done.stderr.decode(errors='replace').strip()}")
    done = cryptsetup(["open", "--key-file=-", device, name], key)
    if done.returncode != 0:
        raise DiskError(f"open {device}: {done.stderr.decode(errors='replace').strip()}")
    return {"formatted": formatted, "device": f"/dev/mapper/{name}"}


def main() -> None:
    verb, args = sys.argv[1], sys.argv[2:]
    if verb == "recipient":
        with Tpm.open() as tpm:
            print(json.dumps(recipient(tpm, bytes.fromhex(args[0]), args[1:] == ["tee"])))
    elif verb == "unlock":
        print(json.dumps(unlock(args[0], args[1], volume_key(sys.stdin.buffer.read()))))
    else:
        raise SystemExit(f"unknown verb {verb!r}; use recipient NONCE [tee] or unlock DEVICE NAME")


if __name__ == "__main__":
    main()
