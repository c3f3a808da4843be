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
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from harness.kms.errors import InvalidCiphertext, MasterKeyError

MASTER_KEY_ENV = "TEELAB_KMS_MASTER_KEY"
MASTER_KEY_FILE_ENV = "TEELAB_KMS_MASTER_KEY_FILE"
BLOB_MAGIC = b"TLK2"  # TLK1 blobs (no material version) still decrypt
_BLOB_MAGIC_V1 = b"TLK1"
KEY_ID_LEN = 36  # a UUID in text form
_WRAP_AAD = b"teelab-kms-wrap:"


@dataclass(frozen=True)
class MasterKey:
    """32 bytes that wrap (AES-256-GCM, key id as associated data) the material of every KMS key."""

    key: bytes
    source: str

    @classmethod
    def load_or_create(cls, kms_dir: Path, key_file: Path | None = None) -> MasterKey:
        """From ``TEELAB_KMS_MASTER_KEY`` (base64), else ``key_file`` or ``TEELAB_KMS_MASTER_KEY_FILE`` (a
        credential file the operator keeps elsewhere, never made here), else ``kms_dir/master.key`` (0600),
        made on first use. Files hold 32 bytes, raw or in base64, and must not be open to group or others."""
        env = os.environ.get(MASTER_KEY_ENV)
        if env:
            key = _base64_key(env)
            if key is None:
                raise MasterKeyError(
                    f"{MASTER_KEY_ENV} is not base64 of 32 bytes",
                    hint=f"set {MASTER_KEY_ENV}=$(head -c32 /dev/urandom | base64) or unset it",
                )
            return cls(key, "environment")
        named = key_file or (
            Path(os.environ[MASTER_KEY_FILE_ENV]) if os.environ.get(MASTER_KEY_FILE_ENV) else None
        )
        if named is not None:
            return cls(_read_key_file(named), str(named))
        path = kms_dir / "master.key"
        if not path.exists():
            kms_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
        return cls(_read_key_file(path), str(path))

    def subkey(self, purpose: str) -> bytes:
        """32 bytes for ``purpose`` (HKDF-SHA256 of the master key), so the master key itself does one job."""
        return HKDF(hashes.SHA256(), 32, salt=None, info=b"teelab-kms:" + purpose.encode()).derive(self.key)

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


def _base64_key(text: str) -> bytes | None:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == 32 else None


def _read_key_file(path: Path) -> bytes:
    """32 bytes from ``path`` (raw, or base64 text); MasterKeyError if missing, too open or the wrong size."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()[:4096]
    except OSError as exc:
        raise MasterKeyError(
            f"cannot read the master key file {path}: {exc.strerror}",
            hint="point at a readable file holding 32 bytes (raw or base64)",
            path=str(path),
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MasterKeyError(
            f"master key file {path} is accessible to group or others (mode {stat.S_IMODE(mode):o})",
            hint=f"chmod 600 {path}",
            path=str(path),
        )
    key = data if len(data) == 32 else _base64_key(data.decode("ascii", errors="replace"))
    if key is None:
        raise MasterKeyError(
            f"master key file {path} holds {len(data)} bytes, not 32 (raw) or base64 of 32", path=str(path)
        )
    return key


def _context_bytes(context: dict[str, str] | None) -> bytes:
    return json.dumps(context or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encrypt_blob(
    key_id: str, material: bytes, plaintext: bytes, context: dict[str, str] | None, version: int = 0
) -> bytes:
    """A CiphertextBlob: magic, key id, material version (4 bytes, big-endian), nonce, then AES-256-GCM over
    the plaintext with the header and encryption context as associated data."""
    header = BLOB_MAGIC + key_id.encode() + version.to_bytes(4, "big")
    nonce = os.urandom(12)
    return header + nonce + AESGCM(material).encrypt(nonce, plaintext, header + _context_bytes(context))


@dataclass(frozen=True)
class BlobHeader:
    key_id: str
    version: int  # which material of the key (0: the material it was made with; each rotation adds one)
    length: int  # bytes before the nonce


def blob_header(blob: bytes) -> BlobHeader:
    """The key id and material version a CiphertextBlob names; InvalidCiphertext if it is not one of ours.
    Blobs made before keys rotated (magic TLK1, no version) name version 0."""
    versioned = blob.startswith(BLOB_MAGIC)
    length = len(BLOB_MAGIC) + KEY_ID_LEN + (4 if versioned else 0)
    if len(blob) < length + 12 + 16 or not (versioned or blob.startswith(_BLOB_MAGIC_V1)):
        raise InvalidCiphertext("CiphertextBlob is not a ciphertext of this KMS", length=len(blob))
    try:
        key_id = blob[len(BLOB_MAGIC) : len(BLOB_MAGIC) + KEY_ID_LEN].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidCiphertext("CiphertextBlob has a corrupt key id") from None
    version = int.from_bytes(blob[length - 4 : length], "big") if versioned else 0
    return BlobHeader(key_id, version, length)


def blob_key_id(blob: bytes) -> str:
    """The key id a CiphertextBlob names; InvalidCiphertext if it is not one of ours."""
    return blob_header(blob).key_id


def decrypt_blob(
    blob: bytes, material: bytes, context: dict[str, str] | None, parsed: BlobHeader | None = None
) -> bytes:
    """The plaintext of ``blob``, given the material of the key version its header (``parsed``: already
    read with ``blob_header``) names."""
    header = blob[: (parsed or blob_header(blob)).length]
    nonce = blob[len(header) : len(header) + 12]
    try:
        return AESGCM(material).decrypt(nonce, blob[len(header) + 12 :], header + _context_bytes(context))
    except InvalidTag:
        raise InvalidCiphertext(
            "CiphertextBlob does not decrypt: it was altered or the EncryptionContext differs",
            hint="pass the same EncryptionContext that Encrypt was given",
        ) from None
