"""Fuzzing the EIF reader: random bytes and single-field mutations of a valid signed image; only coded errors
(E900-E949) may escape, and whatever is accepted is consistent."""

from __future__ import annotations

import io
import json
import struct
import tempfile
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.enclave import build_eif, describe_image, read_eif
from harness.enclave.errors import EnclaveError


def _signed_image() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz signer")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "k").write_bytes(b"kernel" * 20)
        (root / "r0").write_bytes(b"init" * 20)
        (root / "r1").write_bytes(b"app" * 20)
        image = build_eif(
            root / "a.eif",
            kernel=root / "k",
            cmdline="console=ttyS0",
            ramdisks=[root / "r0", root / "r1"],
            signing_key=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            signing_certificate=cert.public_bytes(serialization.Encoding.PEM),
        )
        return image.path.read_bytes()


VALID = _signed_image()
NUM_SECTIONS = struct.unpack_from(">H", VALID, 26)[0]
OFFSETS = struct.unpack_from(f">{NUM_SECTIONS}Q", VALID, 28)

# (offset, struct format) of every field: the header's, then each section header's
FIELDS: list[tuple[int, str]] = [
    (0, ">4s"),
    (4, ">H"),
    (6, ">H"),
    (8, ">Q"),
    (16, ">Q"),
    (24, ">H"),
    (26, ">H"),
]
FIELDS += [(28 + 8 * i, ">Q") for i in range(32)] + [(284 + 8 * i, ">Q") for i in range(32)]
FIELDS += [(540, ">I"), (544, ">I")]
for _offset in OFFSETS:
    FIELDS += [(_offset, ">H"), (_offset + 2, ">H"), (_offset + 4, ">Q")]


def _parse(data: bytes, verify_crc: bool) -> None:
    try:
        image = read_eif(io.BytesIO(data), verify_crc=verify_crc)
    except EnclaveError as err:
        assert 900 <= int(err.code[1:]) <= 949 and err.hint, err
        return
    # accepted: the table it reports must describe the file it read, and it can be described
    assert image.size == len(data)
    json.dumps(describe_image(image))
    assert image.kernel.size >= 0 and image.ramdisks
    assert not verify_crc or image.crc_ok


def _fixed_crc(data: bytearray) -> bytes:
    if len(data) >= 548:
        data[544:548] = zlib.crc32(bytes(data[:544]) + bytes(data[548:])).to_bytes(4, "big")
    return bytes(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1200), st.booleans())
def test_random_bytes_raise_only_coded_errors(data: bytes, with_magic: bool) -> None:
    if with_magic:
        data = b".eif\x00\x04" + data
    _parse(data, verify_crc=True)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS), st.data(), st.booleans())
def test_single_field_mutations_raise_only_coded_errors(
    field: tuple[int, str], data: st.DataObject, fix_crc: bool
) -> None:
    offset, fmt = field
    size = struct.calcsize(fmt)
    value = data.draw(
        st.binary(min_size=size, max_size=size)
        | st.integers(0, 2 ** (8 * size) - 1).map(lambda v: v.to_bytes(size, "big"))
        | st.sampled_from([bytes(size), b"\xff" * size])
    )
    mutated = bytearray(VALID)
    mutated[offset : offset + size] = value
    _parse(_fixed_crc(mutated) if fix_crc else bytes(mutated), verify_crc=True)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, len(VALID) - 1),
    st.binary(min_size=1, max_size=8),
    st.none() | st.integers(0, len(VALID) - 1),
    st.booleans(),
)
def test_data_mutations_and_truncations_raise_only_coded_errors(
    at: int, patch: bytes, cut: int | None, verify_crc: bool
) -> None:
    mutated = bytearray(VALID)
    mutated[at : at + len(patch)] = patch
    _parse(_fixed_crc(mutated)[:cut], verify_crc=verify_crc)


def test_the_unmutated_image_is_accepted() -> None:
    image = read_eif(io.BytesIO(VALID))
    assert image.is_signed and image.signature_problem is None and len(FIELDS) > 70
