"""Key material: the master key that wraps every KMS key, and the ciphertext blobs those keys make."""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from harness.kms.errors import InvalidCiphertext, MasterKeyError

MASTER_KEY_ENV = "TEELAB_KMS_MASTER_KEY"
BLOB_MAGIC = b"TLK1"
KEY_ID_LEN = 36  # a UUID in text form
_WRAP_AAD = b"teelab-kms-wrap:"


@dataclass(frozen=True)
class MasterKey:
    """32 bytes that wrap (AES-256-GCM, key id as associated data) the material of every KMS key."""

    key: bytes
    source: str

    @classmethod
    def load_or_create(cls, kms_dir: Path) -> MasterKey:
        """From ``TEELAB_KMS_MASTER_KEY`` (base64), else ``kms_dir/master.key`` (0600), made on first use."""
        env = os.environ.get(MASTER_KEY_ENV)
        if env:
            try:
                key = base64.b64decode(env, validate=True)
            except binascii.Error:
                key = b""
            if len(key) != 32:
                raise MasterKeyError(
                    f"{MASTER_KEY_ENV} is not base64 of 32 bytes",
                    hint=f"set {MASTER_KEY_ENV}=$(head -c32 /dev/urandom | base64) or unset it",
                )
            return cls(key, "environment")
        path = kms_dir / "master.key"
        if not path.exists():
            kms_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise MasterKeyError(
                f"master key file {path} is accessible to group or others (mode {stat.S_IMODE(mode):o})",
                hint=f"chmod 600 {path}",
                path=str(path),
            )
        key = path.read_bytes()
        if len(key) != 32:
            raise MasterKeyError(f"master key file {path} holds {len(key)} bytes, not 32", path=str(path))
        return cls(key, str(path))

    def wrap(self, key_id: str, material: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(self.key).encrypt(nonce, material, _WRAP_AAD + key_id.encode())

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        try:
            return AESGCM(self.key).decrypt(wrapped[:12], wrapped[12:], _WRAP_AAD + key_id.encode())
        except (InvalidTag, ValueError):
            raise MasterKeyError(
                f"key {key_id} does not unwrap with the master key from {self.source}",
                hint="start the KMS with the master key the store was made with",
            ) from None


def _context_bytes(context: dict[str, str] | None) -> bytes:
    return json.dumps(context or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encrypt_blob(key_id: str, material: bytes, plaintext: bytes, context: dict[str, str] | None) -> bytes:
    """A CiphertextBlob: magic, key id, nonce, AES-256-GCM over plaintext binding the encryption context."""
    header = BLOB_MAGIC + key_id.encode()
    nonce = os.urandom(12)
    return header + nonce + AESGCM(material).encrypt(nonce, plaintext, header + _context_bytes(context))


def blob_key_id(blob: bytes) -> str:
    """The key id a CiphertextBlob names; InvalidCiphertext if it is not one of ours."""
    if len(blob) < len(BLOB_MAGIC) + KEY_ID_LEN + 12 + 16 or not blob.startswith(BLOB_MAGIC):
        raise InvalidCiphertext("CiphertextBlob is not a ciphertext of this KMS", length=len(blob))
    try:
        return blob[len(BLOB_MAGIC) : len(BLOB_MAGIC) + KEY_ID_LEN].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidCiphertext("CiphertextBlob has a corrupt key id") from None


def decrypt_blob(blob: bytes, material: bytes, context: dict[str, str] | None) -> bytes:
    key_id = blob_key_id(blob)
    header = BLOB_MAGIC + key_id.encode()
    nonce = blob[len(header) : len(header) + 12]
    try:
        return AESGCM(material).decrypt(nonce, blob[len(header) + 12 :], header + _context_bytes(context))
    except InvalidTag:
        raise InvalidCiphertext(
            "CiphertextBlob does not decrypt: it was altered or the EncryptionContext differs",
            hint="pass the same EncryptionContext that Encrypt was given",
        ) from None
