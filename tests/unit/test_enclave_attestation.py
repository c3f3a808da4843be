"""From image to verdict: an EIF's PCRs boot a security module that signs with the lab authority, and the
verifier accepts the document only for that image, that nonce and that key."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from teelab_guest import nsm_wire as wire

from harness.attest import LabAuthority, Policy, parse_attestation_document, verify
from harness.enclave import build_eif, pcr3_of_parent_role, pcr4_of_parent_instance
from harness.enclave.nsm import SecurityModule

ROLE = "arn:aws:iam::123456789012:role/lab-parent"
INSTANCE = "i-0123456789abcdef0"


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> LabAuthority:
    return LabAuthority.load_or_create(tmp_path_factory.mktemp("lab-ca"))


def boot_pcrs(tmp_path: Path, app: bytes) -> dict[int, bytes]:
    (tmp_path / "k").write_bytes(b"kernel" * 100)
    (tmp_path / "init").write_bytes(b"init" * 100)
    (tmp_path / "app").write_bytes(app)
    image = build_eif(
        tmp_path / f"{app[:8].hex()}.eif",
        kernel=tmp_path / "k",
        cmdline="console=ttyS0",
        ramdisks=[tmp_path / "init", tmp_path / "app"],
    )
    return {
        **image.measurements.as_pcrs(),
        3: pcr3_of_parent_role(ROLE),
        4: pcr4_of_parent_instance(INSTANCE),
    }


def attest(module: SecurityModule, nonce: bytes, public_key: bytes) -> bytes:
    response = module.handle(wire.attestation(nonce=nonce, public_key=public_key, user_data=b"hello"))
    return wire.decode_response(response, expect=wire.Operation.ATTESTATION).document


@pytest.fixture(scope="module")
def public_key() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def policy(authority: LabAuthority, pcrs: dict[int, bytes], nonce: bytes, public_key: bytes) -> Policy:
    return Policy(roots=("lab",), pcrs=pcrs, nonce=nonce, public_key=public_key, lab_dir=authority.directory)


def test_the_document_verifies_for_its_image_nonce_and_key(
    tmp_path: Path, authority: LabAuthority, public_key: bytes
) -> None:
    pcrs = boot_pcrs(tmp_path, b"application v1")
    module = SecurityModule(
        pcrs,
        debug=False,
        issue_document=authority.attestation_document,
        module_id="i-0123456789abcdef0-enc0001",
    )
    document = attest(module, b"n" * 32, public_key)
    verdict = verify(
        document,
        policy(
            authority, {0: pcrs[0], 1: pcrs[1], 2: pcrs[2], 3: pcrs[3], 4: pcrs[4]}, b"n" * 32, public_key
        ),
    )
    assert verdict.ok, verdict.to_dict()
    parsed = parse_attestation_document(document)
    assert (
        sorted(parsed.pcrs) == list(range(16)) and parsed.pcrs[0] == pcrs[0] and parsed.user_data == b"hello"
    )
    assert parsed.module_id == "i-0123456789abcdef0-enc0001"
    assert not verify(document, policy(authority, {0: pcrs[0]}, b"other nonce", public_key)).ok


def test_another_image_or_a_debug_enclave_does_not_pass_the_policy(
    tmp_path: Path, authority: LabAuthority, public_key: bytes
) -> None:
    expected = boot_pcrs(tmp_path, b"application v1")
    modified = SecurityModule(
        boot_pcrs(tmp_path, b"application v2"),
        debug=False,
        issue_document=authority.attestation_document,
        module_id="enc-b",
    )
    debug = SecurityModule(
        expected, debug=True, issue_document=authority.attestation_document, module_id="enc-c"
    )
    want = policy(authority, {0: expected[0]}, b"n" * 32, public_key)
    assert not verify(attest(modified, b"n" * 32, public_key), want).ok
    debug_document = attest(debug, b"n" * 32, public_key)
    assert not verify(debug_document, want).ok
    assert set(parse_attestation_document(debug_document).pcrs.values()) == {bytes(48)}
