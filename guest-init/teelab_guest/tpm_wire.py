"""TPM 2.0 structures both sides use (TPM 2.0 Library, Part 2), big-endian as on the wire.

The guest marshals commands with these and the host's verifier parses quotes with the same code, so the two
cannot drift. Stdlib only, except ``make_credential`` (the verifier's side of credential activation), which
needs python3-cryptography.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

ALG_RSA, ALG_SHA256, ALG_AES, ALG_NULL, ALG_ECDSA, ALG_ECC, ALG_CFB = 0x1, 0xB, 0x6, 0x10, 0x18, 0x23, 0x43
ECC_NIST_P256 = 0x0003
GENERATED_VALUE = 0xFF544347  # TPM_GENERATED_VALUE: "\xffTCG", the first bytes of every TPMS_ATTEST
ST_ATTEST_QUOTE = 0x8018
PCR_COUNT = 24
# The AK: a restricted ECDSA P-256 signing key, fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth |
# restricted | sign.
AK_ATTRIBUTES = 0x2 | 0x10 | 0x20 | 0x40 | 0x10000 | 0x40000


class TpmFormatError(ValueError):
    """Bytes that are not the TPM structure they should be."""


def u16(value: int) -> bytes:
    return struct.pack(">H", value)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def tpm2b(data: bytes) -> bytes:
    return u16(len(data)) + data


class Reader:
    """Reads TPM structures off a buffer; TpmFormatError when it runs short."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.at = 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise TpmFormatError(f"needs {size} bytes at offset {self.at}, has {len(self.data) - self.at}")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def pcr_selection(self) -> dict[int, tuple[int, ...]]:
        """TPML_PCR_SELECTION: hash algorithm -> selected PCR indexes."""
        out: dict[int, tuple[int, ...]] = {}
        for _ in range(self.u32()):
            alg = self.u16()
            bitmap = self.take(self.u8())
            out[alg] = tuple(i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1)
        return out

    def done(self) -> None:
        if self.at != len(self.data):
            raise TpmFormatError(f"{len(self.data) - self.at} bytes left over")


def pcr_selection(pcrs: list[int] | tuple[int, ...], alg: int = ALG_SHA256) -> bytes:
    """TPML_PCR_SELECTION of one bank."""
    bitmap = bytearray(3)
    for index in pcrs:
        if not 0 <= index < PCR_COUNT:
            raise ValueError(f"PCR {index} is not 0..{PCR_COUNT - 1}")
        bitmap[index // 8] |= 1 << (index % 8)
    return u32(1) + u16(alg) + bytes([3]) + bytes(bitmap)


def ak_template() -> bytes:
    """TPMT_PUBLIC of the AK as a CreatePrimary template (empty unique: the same AK for the same seed)."""
    parameters = u16(ALG_NULL) + u16(ALG_ECDSA) + u16(ALG_SHA256) + u16(ECC_NIST_P256) + u16(ALG_NULL)
    return (
        u16(ALG_ECC)
        + u16(ALG_SHA256)
        + u32(AK_ATTRIBUTES)
        + tpm2b(b"")
        + parameters
        + tpm2b(b"")
        + tpm2b(b"")
    )


@dataclass(frozen=True)
class EccPublic:
    """An ECC key's TPMT_PUBLIC, as the TPM returned it."""

    raw: bytes
    name_alg: int
    attributes: int
    scheme: int
    scheme_hash: int
    curve: int
    x: bytes
    y: bytes

    @property
    def name(self) -> bytes:
        """The TPM name: nameAlg (SHA-256, the only one parsed) then the TPMT_PUBLIC's digest."""
        return u16(self.name_alg) + hashlib.sha256(self.raw).digest()


def ak_spki_der(ak: EccPublic) -> bytes:
    """The AK as DER SubjectPublicKeyInfo: what a CVM binds into its SNP/TDX report_data beside the nonce
    (``teelab_guest.binding.report_data(nonce, this)``), as Azure's paravisor binds its vTPM's AK."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if ak.curve != ECC_NIST_P256 or len(ak.x) != 32 or len(ak.y) != 32:
        raise TpmFormatError("the AK is not a P-256 point")
    try:
        key = ec.EllipticCurvePublicNumbers(
            int.from_bytes(ak.x, "big"), int.from_bytes(ak.y, "big"), ec.SECP256R1()
        ).public_key()
    except ValueError:
        raise TpmFormatError("the AK's point is not on P-256") from None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def parse_ecc_public(raw: bytes) -> EccPublic:
    """A TPMT_PUBLIC of type ECC with a SHA-256 name (the AK); TpmFormatError for anything else."""
    r = Reader(raw)
    if r.u16() != ALG_ECC:
        raise TpmFormatError("the key is not an ECC key")
    name_alg, attributes = r.u16(), r.u32()
    if name_alg != ALG_SHA256:
        raise TpmFormatError(f"name algorithm {name_alg:#x} is not SHA-256")
    r.tpm2b()  # authPolicy
    if r.u16() != ALG_NULL:
        raise TpmFormatError("a signing key has no symmetric algorithm")
    scheme = r.u16()
    scheme_hash = r.u16() if scheme != ALG_NULL else ALG_NULL
    curve = r.u16()
    if r.u16() != ALG_NULL:
        raise TpmFormatError("the key has a KDF")
    x, y = r.tpm2b(), r.tpm2b()
    r.done()
    return EccPublic(bytes(raw), name_alg, attributes, scheme, scheme_hash, curve, x, y)


@dataclass(frozen=True)
class Quote:
    """A TPMS_ATTEST of type quote."""

    signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    selection: dict[int, tuple[int, ...]]
    pcr_digest: bytes


def parse_quote(raw: bytes) -> Quote:
    r = Reader(raw)
    if r.u32() != GENERATED_VALUE:
        raise TpmFormatError("magic is not TPM_GENERATED_VALUE: the TPM did not make this structure")
    if r.u16() != ST_ATTEST_QUOTE:
        raise TpmFormatError("the attestation structure is not a quote")
    signer, extra = r.tpm2b(), r.tpm2b()
    clock, resets, restarts, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware = r.u64()
    selection = r.pcr_selection()
    digest = r.tpm2b()
    r.done()
    return Quote(signer, extra, clock, resets, restarts, bool(safe), firmware, selection, digest)


def parse_ecdsa_signature(raw: bytes) -> tuple[int, int, int]:
    """TPMT_SIGNATURE with ECDSA: (hash algorithm, r, s)."""
    r = Reader(raw)
    if r.u16() != ALG_ECDSA:
        raise TpmFormatError("the signature is not ECDSA")
    alg = r.u16()
    sig_r, sig_s = r.tpm2b(), r.tpm2b()
    r.done()
    return alg, int.from_bytes(sig_r, "big"), int.from_bytes(sig_s, "big")


def pcr_digest(values: list[bytes]) -> bytes:
    """What a quote's pcrDigest is: SHA-256 of the selected PCR values in index order."""
    return hashlib.sha256(b"".join(values)).digest()


def extend(pcr: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(pcr + digest).digest()


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with SHA-256 (Part 1, 11.4.10.2): counter-mode HMAC; ``label`` without its terminating zero."""
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        message = u32(counter) + label + b"\0" + context_u + context_v + u32(bits)
        out += hmac.new(key, message, hashlib.sha256).digest()
        counter += 1
    return out[: bits // 8]


def make_credential(ek_public_key: object, ak_name: bytes, credential: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential done outside a TPM, for an RSA EK of the standard template (AES-128-CFB, SHA-256):
    (credentialBlob as TPM2B_ID_OBJECT, secret as TPM2B_ENCRYPTED_SECRET). Only the TPM holding that EK, with
    an object of ``ak_name`` loaded, can get ``credential`` back (TPM2_ActivateCredential)."""
    import os

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    try:
        from cryptography.hazmat.decrepit.ciphers.modes import CFB
    except ImportError:  # cryptography before 43 (Debian 12's guests)
        from cryptography.hazmat.primitives.ciphers.modes import CFB

    if not isinstance(ek_public_key, rsa.RSAPublicKey):
        raise TpmFormatError("credential activation here uses the RSA EK")
    seed = os.urandom(32)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\0")
    secret = ek_public_key.encrypt(seed, oaep)
    sym_key = kdfa(seed, b"STORAGE", ak_name, b"", 128)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(tpm2b(credential)) + encryptor.finalize()
    hmac_key = kdfa(seed, b"INTEGRITY", b"", b"", 256)
    integrity = hmac.new(hmac_key, enc_identity + ak_name, hashlib.sha256).digest()
    return tpm2b(tpm2b(integrity) + enc_identity), tpm2b(secret)
