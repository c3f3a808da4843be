"""EIF v4: build and read back, PCRs against a plain computation, golden values, corruptions refused."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from harness.enclave import EifImage, build_eif, describe_eif, describe_image, eif_build, errors, read_eif
from harness.enclave.pcrs import pcr3_of_parent_role, pcr4_of_parent_instance

GOLDEN_CMDLINE = "console=ttyS0 reboot=k panic=-1 teelab.role=enclave"
GOLDEN_BUILD = {
    "BuildTime": "2025-01-01T00:00:00+00:00",
    "BuildToolVersion": "0.1.0",
    "OperatingSystem": "Linux",
    "KernelVersion": "6.1.0",
}
GOLDEN = {
    "PCR0": "dee089e8163e27d3799986fd98215f26e81a9157ecc93c77"
    "dffda7fa61aa2909eeba4427e3b30ab7950adf398d9526f9",
    "PCR1": "3d5a6924d80948321fa3c8903e6203508e089e4bbed947fb"
    "d8333afbab4cf7b22ce667940c161332e8731b997363ed7e",
    "PCR2": "df1b0acf5daaa3e34552e375ac7252f822d8073b28cdd3a2"
    "c20237c9a62e29ebc36db63fd1f000ec135e199335af7a65",
    "crc32": 0x4DC46AB6,
    "sha256": "6664f6b7a49b6fc7f5daf958413b9eff3ac3a2139d167ba57899653c6f5e493d",
    "size": 23088,
}


def plain_pcr(*parts: bytes) -> bytes:
    """SHA384(48 zero bytes || SHA384(content)), written out."""
    return hashlib.sha384(bytes(48) + hashlib.sha384(b"".join(parts)).digest()).digest()


def make_signer(curve: ec.EllipticCurve | None = None, *, days: int = 30) -> tuple[bytes, bytes]:
    """A PEM private key and a self-signed PEM certificate for it."""
    key = ec.generate_private_key(curve or ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "enclave signer"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teelab tests"),
        ]
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .sign(key, hashes.SHA384())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Inputs:
    kernel: Path
    ramdisks: list[Path]
    cmdline: str = "console=ttyS0 quiet"

    @property
    def kernel_bytes(self) -> bytes:
        return self.kernel.read_bytes()

    @property
    def ramdisk_bytes(self) -> list[bytes]:
        return [r.read_bytes() for r in self.ramdisks]


@pytest.fixture
def inputs(tmp_path: Path) -> Inputs:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"MZ kernel " + bytes(range(256)) * 40)
    ramdisks = []
    for index, text in enumerate((b"init and nsm driver", b"application", b"application data")):
        path = tmp_path / f"ramdisk{index}.cpio"
        path.write_bytes(b"070701" + text * (50 + 30 * index))
        ramdisks.append(path)
    return Inputs(kernel, ramdisks)


@pytest.fixture(scope="module")
def signer() -> tuple[bytes, bytes]:
    return make_signer()


@pytest.fixture
def signed(inputs: Inputs, tmp_path: Path, signer: tuple[bytes, bytes]) -> EifImage:
    """``inputs`` built into ``s.eif``, signed by ``signer``."""
    key_pem, cert_pem = signer
    return build_eif(
        tmp_path / "s.eif",
        kernel=inputs.kernel,
        cmdline="x",
        ramdisks=inputs.ramdisks,
        signing_key=key_pem,
        signing_certificate=cert_pem,
    )


def walk_sections(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, header offset, data) of each section, walked plainly from the header's table."""
    num_sections = struct.unpack_from(">H", data, 26)[0]
    offsets = struct.unpack_from(">32Q", data, 28)
    sizes = struct.unpack_from(">32Q", data, 28 + 256)
    out = []
    for index in range(num_sections):
        section_type, _flags, size = struct.unpack_from(">HHQ", data, offsets[index])
        assert size == sizes[index]
        out.append((section_type, offsets[index], data[offsets[index] + 12 : offsets[index] + 12 + size]))
    return out


def assemble(sections: list[tuple[int, bytes]], *, version: int = 4) -> bytes:
    """An EIF put together plainly from (type, data) sections, with a correct table and CRC."""
    offsets, sizes, body = [], [], b""
    for section_type, data in sections:
        offsets.append(548 + len(body))
        sizes.append(len(data))
        body += struct.pack(">HHQ", section_type, 0, len(data)) + data
    pad = [0] * (32 - len(sections))
    header = struct.pack(
        ">4sHHQQHH32Q32QI", b".eif", version, 0, 1 << 30, 2, 0, len(sections), *offsets, *pad, *sizes, *pad, 0
    )
    return header + zlib.crc32(header + body).to_bytes(4, "big") + body


def fix_crc(data: bytearray) -> bytearray:
    data[544:548] = zlib.crc32(bytes(data[:544]) + bytes(data[548:])).to_bytes(4, "big")
    return data


METADATA = json.dumps({"ImageName": "x", "ImageVersion": "1", "BuildMetadata": {}}).encode()


# ------------------------------------------------------------------------------------------------ round trip


def test_build_then_read_gives_back_every_section_and_the_metadata(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "app.eif"
    built = build_eif(
        out,
        kernel=inputs.kernel,
        cmdline=inputs.cmdline,
        ramdisks=inputs.ramdisks,
        name="app",
        version="2.1",
        custom_metadata={"owner": "lab", "tier": 3},
    )
    image = read_eif(out)

    assert [s.type.name for s in image.sections] == [
        "KERNEL",
        "CMDLINE",
        "METADATA",
        "RAMDISK",
        "RAMDISK",
        "RAMDISK",
    ]
    assert b"".join(image.section_chunks(image.kernel)) == inputs.kernel_bytes
    assert [b"".join(image.section_chunks(r)) for r in image.ramdisks] == inputs.ramdisk_bytes
    assert image.cmdline == inputs.cmdline.encode()
    assert image.metadata["ImageName"] == "app" and image.metadata["ImageVersion"] == "2.1"
    assert image.metadata["CustomMetadata"] == {"owner": "lab", "tier": 3}
    assert image.metadata["BuildMetadata"]["BuildTool"] == "teelab"
    assert image.version == 4 and image.header.num_sections == 6 and image.arch == "x86_64"
    assert image.header.default_cpus == 2 and image.header.default_mem == 1 << 30
    assert image.crc_ok and not image.is_signed
    assert image.measurements == built.measurements
    assert describe_image(image) == describe_image(built)
    assert image.size == out.stat().st_size


def test_kernel_and_initrd_come_out_for_qemu(inputs: Inputs, tmp_path: Path) -> None:
    image = build_eif(tmp_path / "app.eif", kernel=inputs.kernel, cmdline="x", ramdisks=inputs.ramdisks)
    assert image.write_kernel(tmp_path / "kernel.out").read_bytes() == inputs.kernel_bytes
    assert image.write_initrd(tmp_path / "initrd").read_bytes() == b"".join(inputs.ramdisk_bytes)


def test_aarch64_images_carry_the_arch_flag(inputs: Inputs, tmp_path: Path) -> None:
    image = build_eif(
        tmp_path / "a.eif", kernel=inputs.kernel, cmdline="x", ramdisks=inputs.ramdisks[:1], arch="aarch64"
    )
    assert read_eif(tmp_path / "a.eif").arch == "aarch64" and image.header.flags == 1


# -------------------------------------------------------------------------------------------- measurements


def test_pcrs_equal_a_plain_computation_over_the_section_bytes(
    inputs: Inputs, tmp_path: Path, signer: tuple[bytes, bytes]
) -> None:
    key_pem, cert_pem = signer
    out = tmp_path / "signed.eif"
    build_eif(
        out,
        kernel=inputs.kernel,
        cmdline=inputs.cmdline,
        ramdisks=inputs.ramdisks,
        signing_key=key_pem,
        signing_certificate=cert_pem,
    )
    by_type: dict[int, list[bytes]] = {}
    for section_type, _offset, data in walk_sections(out.read_bytes()):
        by_type.setdefault(section_type, []).append(data)
    kernel, cmdline, ramdisks = by_type[1][0], by_type[2][0], by_type[3]
    assert kernel == inputs.kernel_bytes and ramdisks == inputs.ramdisk_bytes
    cert_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)

    measured = read_eif(out).measurements
    assert measured.pcr0 == plain_pcr(kernel, cmdline, *ramdisks)
    assert measured.pcr1 == plain_pcr(kernel, cmdline, ramdisks[0])
    assert measured.pcr2 == plain_pcr(*ramdisks[1:])
    assert measured.pcr8 == plain_pcr(cert_der)
    assert measured.as_pcrs() == {0: measured.pcr0, 1: measured.pcr1, 2: measured.pcr2, 8: measured.pcr8}


def test_golden_image_has_fixed_pcrs_checksum_and_bytes(tmp_path: Path) -> None:
    (tmp_path / "kernel").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "init.cpio").write_bytes(b"070701" + b"bootstrap ramdisk " * 100)
    (tmp_path / "app.cpio").write_bytes(b"application ramdisk\n" * 200)
    image = build_eif(
        tmp_path / "golden.eif",
        kernel=tmp_path / "kernel",
        cmdline=GOLDEN_CMDLINE,
        ramdisks=[tmp_path / "init.cpio", tmp_path / "app.cpio"],
        name="golden",
        version="1.0",
        build_metadata=GOLDEN_BUILD,
    )
    measurements = describe_eif(tmp_path / "golden.eif")["Measurements"]
    assert {k: measurements[k] for k in ("PCR0", "PCR1", "PCR2")} == {
        k: GOLDEN[k] for k in ("PCR0", "PCR1", "PCR2")
    }
    assert image.header.crc32 == GOLDEN["crc32"]
    data = (tmp_path / "golden.eif").read_bytes()
    assert len(data) == GOLDEN["size"] and hashlib.sha256(data).hexdigest() == GOLDEN["sha256"]


def test_the_checksum_covers_header_section_headers_and_data_but_not_itself(
    inputs: Inputs, tmp_path: Path
) -> None:
    data = build_eif(
        tmp_path / "a.eif", kernel=inputs.kernel, cmdline="x", ramdisks=inputs.ramdisks
    ).path.read_bytes()
    assert int.from_bytes(data[544:548], "big") == zlib.crc32(data[:544] + data[548:])
    assert read_eif(tmp_path / "a.eif").computed_crc == zlib.crc32(data[:544] + data[548:])


def test_parent_pcrs_measure_the_role_and_instance_id() -> None:
    role = "arn:aws:iam::123456789012:role/enclave-parent"
    assert pcr3_of_parent_role(role) == plain_pcr(role.encode())
    assert pcr4_of_parent_instance("i-0123456789abcdef0") == plain_pcr(b"i-0123456789abcdef0")
    with pytest.raises(errors.PcrInputInvalid):
        pcr3_of_parent_role("")


# ------------------------------------------------------------------------------------------------ signing


def test_signed_image_describes_like_nitro_cli(
    inputs: Inputs, tmp_path: Path, signer: tuple[bytes, bytes]
) -> None:
    key_pem, cert_pem = signer
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    build_eif(
        tmp_path / "s.eif",
        kernel=inputs.kernel,
        cmdline="x",
        ramdisks=inputs.ramdisks,
        name="s",
        custom_metadata={"team": "lab"},
        signing_key=tmp_path / "key.pem",
        signing_certificate=tmp_path / "cert.pem",
    )
    info = describe_eif(tmp_path / "s.eif")

    assert list(info) == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "SigningCertificate",
        "CheckCRC",
        "SignatureCheck",
        "ImageName",
        "ImageVersion",
        "Metadata",
    ]
    assert list(info["Measurements"]) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert info["Measurements"]["HashAlgorithm"] == "Sha384 { ... }"
    assert info["IsSigned"] and info["CheckCRC"] and info["SignatureCheck"]
    cert = info["SigningCertificate"]
    assert cert["IssuerName"] == {"commonName": "enclave signer", "organizationName": "teelab tests"}
    assert cert["Algorithm"] == "ecdsa-with-SHA384" and cert["NotAfter"].endswith(" GMT")
    assert info["Metadata"]["team"] == "lab" and info["Metadata"]["DockerInfo"] is None
    read_eif(tmp_path / "s.eif").require_valid_signature()


def test_signature_section_is_laid_out_as_nitro_cli_writes_it(
    signed: EifImage, signer: tuple[bytes, bytes]
) -> None:
    image, cert_pem = signed, signer[1]
    section_type, _offset, data = walk_sections(image.path.read_bytes())[-1]
    assert section_type == 4
    [entry] = cbor2.loads(data)
    # serde_cbor writes Vec<u8> as arrays of small integers
    assert bytes(entry["signing_certificate"]) == cert_pem
    protected, unprotected, payload, signature = cbor2.loads(bytes(entry["signature"]))
    assert cbor2.loads(protected) == {1: -35} and unprotected == {} and len(signature) == 96
    assert cbor2.loads(payload) == {"register_index": 0, "register_value": list(image.measurements.pcr0)}
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    r, s = int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    key.verify(
        encode_dss_signature(r, s),
        cbor2.dumps(["Signature1", protected, b"", payload]),
        ec.ECDSA(hashes.SHA384()),
    )


def test_a_modified_signed_image_fails_its_signature_check(signed: EifImage, tmp_path: Path) -> None:
    image = signed
    data = bytearray(image.path.read_bytes())
    data[image.kernel.data_offset + 5] ^= 0xFF
    (tmp_path / "m.eif").write_bytes(fix_crc(data))
    modified = read_eif(tmp_path / "m.eif")
    assert modified.measurements.pcr0 != image.measurements.pcr0
    assert modified.measurements.pcr8 == image.measurements.pcr8
    assert describe_image(modified)["SignatureCheck"] is False
    with pytest.raises(errors.EifSignatureMismatch, match="another PCR0"):
        modified.require_valid_signature()


def test_an_expired_signing_certificate_is_refused_when_required(
    signed: EifImage, inputs: Inputs, tmp_path: Path
) -> None:
    with pytest.raises(errors.EifSignatureMismatch, match="valid from"):
        signed.require_valid_signature(now=datetime.now(UTC) + timedelta(days=400))
    unsigned = build_eif(tmp_path / "u.eif", kernel=inputs.kernel, cmdline="x", ramdisks=inputs.ramdisks)
    with pytest.raises(errors.EifSignatureMismatch, match="not signed"):
        unsigned.require_valid_signature()


def test_der_certificates_are_accepted_and_stored_as_pem(
    inputs: Inputs, tmp_path: Path, signer: tuple[bytes, bytes]
) -> None:
    key_pem, cert_pem = signer
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    image = build_eif(
        tmp_path / "s.eif",
        kernel=inputs.kernel,
        cmdline="x",
        ramdisks=inputs.ramdisks,
        signing_key=key_pem,
        signing_certificate=der,
    )
    assert image.measurements.pcr8 == plain_pcr(der) and read_eif(image.path).signature_problem is None


def _rsa_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    "case", ["key only", "certificate only", "rsa key", "p256 key", "other key", "garbage"]
)
def test_bad_signing_material_is_refused_and_writes_nothing(
    case: str, inputs: Inputs, tmp_path: Path, signer: tuple[bytes, bytes]
) -> None:
    key_pem, cert_pem = signer
    key, cert = {
        "key only": (key_pem, None),
        "certificate only": (None, cert_pem),
        "rsa key": (lambda: _rsa_key_pem(), cert_pem),
        "p256 key": (lambda: make_signer(ec.SECP256R1())[0], cert_pem),
        "other key": (lambda: make_signer()[0], cert_pem),
        "garbage": (key_pem, b"not a certificate"),
    }[case]
    key = key() if callable(key) else key
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(errors.SigningKeyInvalid) as raised:
        build_eif(
            out_dir / "s.eif",
            kernel=inputs.kernel,
            cmdline="x",
            ramdisks=inputs.ramdisks,
            signing_key=key,
            signing_certificate=cert,
        )
    assert raised.value.code == "E914" and raised.value.hint
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------------------------------------ corruption


def _valid(tmp_path: Path) -> bytes:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"kernel" * 100)
    ramdisk = tmp_path / "r"
    ramdisk.write_bytes(b"ramdisk" * 100)
    return build_eif(
        tmp_path / "v.eif", kernel=kernel, cmdline="c", ramdisks=[ramdisk, ramdisk]
    ).path.read_bytes()


def _set(offset: int, fmt: str, value: int, *, crc: bool = False) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, offset, value)
        return bytes(fix_crc(out) if crc else out)

    return mutate


def _section_field(index: int, field_offset: int, fmt: str, value: int, *, crc: bool = True):
    def mutate(data: bytes) -> bytes:
        offset = struct.unpack_from(">Q", data, 28 + 8 * index)[0]
        return _set(offset + field_offset, fmt, value, crc=crc)(data)

    return mutate


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


K, C, M, R = (1, b"kernel"), (2, b"console=ttyS0"), (5, METADATA), (3, b"ramdisk")
CORRUPTIONS: list[tuple[str, Callable[[bytes], bytes], type[errors.EnclaveError]]] = [
    ("empty file", lambda d: b"", errors.EifTruncated),
    ("header cut short", lambda d: d[:300], errors.EifTruncated),
    ("last section cut short", lambda d: d[:-10], errors.EifTruncated),
    ("bad magic", lambda d: b"ELF\x7f" + d[4:], errors.EifBadMagic),
    ("version 5", _set(4, ">H", 5), errors.EifUnsupportedVersion),
    ("version 1", _set(4, ">H", 1), errors.EifUnsupportedVersion),
    ("num_sections 0", _set(26, ">H", 0), errors.EifSectionCount),
    ("num_sections 1", _set(26, ">H", 1), errors.EifSectionCount),
    ("num_sections 33", _set(26, ">H", 33), errors.EifSectionCount),
    ("num_sections larger than the table", _set(26, ">H", 6), errors.EifSectionTable),
    ("first offset overlaps the header", _set(28, ">Q", 500), errors.EifSectionTable),
    ("offset overlaps the previous section", _set(28 + 8, ">Q", 600), errors.EifSectionTable),
    ("offset leaves a gap", _set(28 + 8, ">Q", 5000), errors.EifSectionTable),
    ("size overflows 64 bits", _set(28 + 256 + 8 * 4, ">Q", 2**64 - 1), errors.EifSectionTable),
    ("last size past the end", _set(28 + 256 + 8 * 4, ">Q", 10**6), errors.EifTruncated),
    ("trailing bytes", lambda d: d + b"\0" * 16, errors.EifSectionTable),
    ("section header size differs from the table", _section_field(1, 4, ">Q", 0), errors.EifSectionTable),
    ("section type 0", _section_field(0, 0, ">H", 0), errors.EifUnknownSection),
    ("section type 6", _section_field(3, 0, ">H", 6), errors.EifUnknownSection),
    ("section type 0xffff", _section_field(2, 0, ">H", 0xFFFF), errors.EifUnknownSection),
    ("one data bit flipped", _flip_last_byte, errors.EifCrcMismatch),
    ("section flags changed", _section_field(0, 2, ">H", 1, crc=False), errors.EifCrcMismatch),
    ("stored checksum changed", _set(544, ">I", 0), errors.EifCrcMismatch),
    ("kernel turned into a cmdline (no kernel)", _section_field(0, 0, ">H", 2), errors.EifMissingSection),
    ("ramdisk turned into a second kernel", _section_field(3, 0, ">H", 1), errors.EifSectionOrder),
    ("cmdline turned into a ramdisk (no cmdline)", _section_field(1, 0, ">H", 3), errors.EifMissingSection),
    (
        "kernel and ramdisk swapped",
        lambda d: _section_field(3, 0, ">H", 1)(_section_field(0, 0, ">H", 3)(d)),
        errors.EifSectionOrder,
    ),
    ("no kernel", lambda d: assemble([C, M, R]), errors.EifMissingSection),
    ("no ramdisk", lambda d: assemble([K, C, M]), errors.EifMissingSection),
    ("version 4 without metadata", lambda d: assemble([K, C, R]), errors.EifMissingSection),
    ("two kernels", lambda d: assemble([K, C, M, R, K]), errors.EifSectionOrder),
    ("ramdisk before the kernel", lambda d: assemble([R, K, C, M]), errors.EifSectionOrder),
    ("metadata not JSON", lambda d: assemble([K, C, (5, b"{nope"), R]), errors.EifMetadataInvalid),
    ("metadata not UTF-8", lambda d: assemble([K, C, (5, b"\xff\xfe"), R]), errors.EifMetadataInvalid),
    ("metadata a list", lambda d: assemble([K, C, (5, b"[]"), R]), errors.EifMetadataInvalid),
    (
        "metadata without ImageName",
        lambda d: assemble([K, C, (5, b'{"ImageVersion": "1", "BuildMetadata": {}}'), R]),
        errors.EifMetadataInvalid,
    ),
    ("cmdline over 64 KiB", lambda d: assemble([K, (2, b"x" * 65537), M, R]), errors.EifSectionTable),
    ("signature not CBOR", lambda d: assemble([K, C, M, R, (4, b"\xff\x00")]), errors.EifSignatureMalformed),
    (
        "signature an empty array",
        lambda d: assemble([K, C, M, R, (4, cbor2.dumps([]))]),
        errors.EifSignatureMalformed,
    ),
    (
        "signature certificate not PEM",
        lambda d: assemble(
            [K, C, M, R, (4, cbor2.dumps([{"signing_certificate": list(b"junk"), "signature": []}]))]
        ),
        errors.EifSignatureMalformed,
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [(m, e) for _, m, e in CORRUPTIONS], ids=[name for name, _, _ in CORRUPTIONS]
)
def test_a_corrupted_image_is_refused_with_the_code_that_names_the_problem(
    mutate: Callable[[bytes], bytes], expected: type[errors.EnclaveError], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.eif"
    bad.write_bytes(mutate(_valid(tmp_path)))
    with pytest.raises(errors.EnclaveError) as raised:
        read_eif(bad)
    assert type(raised.value) is expected, str(raised.value)
    assert raised.value.hint and raised.value.exit_status == 2


def test_the_assembled_reference_image_itself_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "ok.eif").write_bytes(assemble([K, C, M, R, R]))
    image = read_eif(tmp_path / "ok.eif")
    assert image.measurements.pcr0 == plain_pcr(b"kernel", b"console=ttyS0", b"ramdisk", b"ramdisk")
    assert image.measurements.pcr2 == plain_pcr(b"ramdisk")


def test_a_checksum_mismatch_can_be_reported_instead_of_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.eif").write_bytes(_flip_last_byte(_valid(tmp_path)))
    info = describe_eif(tmp_path / "bad.eif", verify_crc=False)
    assert info["CheckCRC"] is False


def test_a_missing_or_unreadable_image_is_a_coded_error(tmp_path: Path) -> None:
    with pytest.raises(errors.EifInputInvalid, match="cannot read"):
        read_eif(tmp_path / "nope.eif")
    with pytest.raises(errors.EifInputInvalid, match="cannot read"):
        read_eif(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    fifo = os.fdopen(os.open(tmp_path / "fifo", os.O_RDWR), "rb", buffering=0)
    with fifo, pytest.raises(errors.EifInputInvalid, match=r"Illegal seek"):
        read_eif(fifo)


# ------------------------------------------------------------------------------------------------ building


@pytest.mark.parametrize(
    "case",
    [
        "missing kernel",
        "empty kernel",
        "no ramdisk",
        "30 ramdisks",
        "NUL in cmdline",
        "metadata not JSON",
        "empty name",
        "bad arch",
    ],
)
def test_bad_build_input_is_refused_and_leaves_nothing(case: str, inputs: Inputs, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    args = {"kernel": inputs.kernel, "cmdline": "x", "ramdisks": inputs.ramdisks}
    change = {
        "missing kernel": {"kernel": tmp_path / "nope"},
        "empty kernel": {"kernel": tmp_path / "empty"},
        "no ramdisk": {"ramdisks": []},
        "30 ramdisks": {"ramdisks": inputs.ramdisks[:1] * 30},
        "NUL in cmdline": {"cmdline": "a\0b"},
        "metadata not JSON": {"custom_metadata": {"when": {1, 2}}},
        "empty name": {"name": ""},
        "bad arch": {"arch": "riscv64"},
    }[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(errors.EifInputInvalid) as raised:
        build_eif(out_dir / "a.eif", **{**args, **change})
    assert raised.value.code == "E913" and raised.value.hint
    assert list(out_dir.iterdir()) == []


def test_an_unwritable_output_directory_is_a_coded_error(inputs: Inputs, tmp_path: Path) -> None:
    with pytest.raises(errors.EifWriteFailed):
        build_eif(tmp_path / "missing" / "a.eif", kernel=inputs.kernel, cmdline="x", ramdisks=inputs.ramdisks)


def test_a_failed_build_keeps_the_previous_output_and_no_temp_file(
    inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.eif").write_bytes(b"previous image")

    def disk_full(_out: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eif_build, "_file_crc", disk_full)
    with pytest.raises(errors.EifWriteFailed, match="No space left"):
        build_eif(out / "a.eif", kernel=inputs.kernel, cmdline="x", ramdisks=inputs.ramdisks)
    assert [p.name for p in out.iterdir()] == ["a.eif"]
    assert (out / "a.eif").read_bytes() == b"previous image"


def test_a_40_mb_ramdisk_is_streamed_not_held_in_memory(inputs: Inputs, tmp_path: Path) -> None:
    big = tmp_path / "big.cpio"
    with open(big, "wb") as f:
        f.truncate(40 << 20)
    tracemalloc.start()
    try:
        image = build_eif(
            tmp_path / "big.eif", kernel=inputs.kernel, cmdline="x", ramdisks=[inputs.ramdisks[0], big]
        )
        read_eif(tmp_path / "big.eif")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.size > 40 << 20
    assert peak < 8 << 20, f"peak Python allocation {peak} bytes"
    assert image.measurements.pcr2 == plain_pcr(bytes(40 << 20))
