"""The shared wire pieces: SigV4 agrees with botocore both ways; the CMS envelope opens with OpenSSL and with
Debian's python3-cryptography 38 + python3-asn1crypto."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from teelab_guest import kms_envelope, kms_sigv4

GUEST_INIT = Path(__file__).parents[2] / "guest-init"
NOW = 1_700_000_000.0


def _botocore_signed(body: bytes) -> AWSRequest:
    request = AWSRequest(
        "POST",
        "http://kms.lab:8000/",
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.Encrypt"},
    )
    SigV4Auth(Credentials("AKIDEXAMPLE", "s3cret"), "kms", "eu-west-1").add_auth(request)
    return request


def test_botocore_signature_verifies_with_our_canonical_form() -> None:
    body = b'{"KeyId": "k", "Plaintext": "aGk="}'
    request = _botocore_signed(body)
    auth = kms_sigv4.parse_authorization(request.headers["Authorization"])
    headers = {name.lower(): value for name, value in request.headers.items()}
    headers.setdefault("host", "kms.lab:8000")
    canonical = kms_sigv4.canonical_request("POST", "/", "", headers, auth.signed_headers, body)
    assert kms_sigv4.signature("s3cret", headers["x-amz-date"], auth.scope, canonical) == auth.signature
    tampered = kms_sigv4.canonical_request("POST", "/", "", headers, auth.signed_headers, body + b" ")
    assert kms_sigv4.signature("s3cret", headers["x-amz-date"], auth.scope, tampered) != auth.signature


def test_our_signature_equals_botocore_for_the_same_headers() -> None:
    body = b'{"NumberOfBytes": 32}'
    ours = kms_sigv4.sign(
        access_key="AKIDEXAMPLE",
        secret="s3cret",
        region="eu-west-1",
        host="kms.lab:8000",
        target="TrentService.GenerateRandom",
        body=body,
        now=NOW,
    )
    request = AWSRequest(
        "POST",
        "http://kms.lab:8000/",
        data=body,
        headers={k: v for k, v in ours.items() if k != "authorization"},
    )
    signer = SigV4Auth(Credentials("AKIDEXAMPLE", "s3cret"), "kms", "eu-west-1")
    request.context["timestamp"] = ours["x-amz-date"]
    canonical = signer.canonical_request(request)
    scope = f"{ours['x-amz-date'][:8]}/eu-west-1/kms/aws4_request"
    theirs = signer.signature(signer.string_to_sign(request, canonical), request)
    assert ours["authorization"].endswith("Signature=" + theirs)
    assert kms_sigv4.signature("s3cret", ours["x-amz-date"], scope, canonical) == theirs


def test_parse_authorization_refuses_malformed_headers() -> None:
    good = (
        "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/kms/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=" + "a" * 64
    )
    auth = kms_sigv4.parse_authorization(good)
    assert (auth.access_key, auth.region, auth.service, auth.signed_headers) == (
        "AKID",
        "us-east-1",
        "kms",
        ("host", "x-amz-date"),
    )
    for bad in (
        good.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1"),
        good.replace("/aws4_request", ""),
        good.replace("host;x-amz-date", "x-amz-date;host"),
        good.replace("a" * 64, "a" * 63),
    ):
        with pytest.raises(ValueError):
            kms_sigv4.parse_authorization(bad)


def _rsa() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, der


def test_envelope_round_trip_and_wrong_key_refused() -> None:
    key, der = _rsa()
    secret = bytes(range(256)) * 4
    envelope = kms_envelope.seal(secret, der)
    assert secret not in envelope
    assert kms_envelope.open_envelope(envelope, key) == secret
    with pytest.raises(kms_envelope.EnvelopeError, match="matches this key"):
        kms_envelope.open_envelope(envelope, _rsa()[0])
    with pytest.raises(kms_envelope.EnvelopeError):
        kms_envelope.open_envelope(envelope[:-40], key)


def test_envelope_refuses_small_or_non_rsa_recipient_keys() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(kms_envelope.EnvelopeError, match="1024 bits"):
        kms_envelope.seal(
            b"x",
            small.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        )
    with pytest.raises(kms_envelope.EnvelopeError, match="SubjectPublicKeyInfo"):
        kms_envelope.seal(b"x", b"\x30\x03\x02\x01\x01")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_cms_opens_the_envelope(tmp_path: Path) -> None:
    key, der = _rsa()
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (tmp_path / "env.der").write_bytes(kms_envelope.seal(b"released to the enclave", der))
    out = subprocess.run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-inform",
            "DER",
            "-in",
            str(tmp_path / "env.der"),
            "-inkey",
            str(tmp_path / "key.pem"),
        ],
        capture_output=True,
        check=True,
    )
    assert out.stdout == b"released to the enclave"
    printed = subprocess.run(
        ["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in", str(tmp_path / "env.der")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "rsaesOaep" in printed and "aes-256-cbc" in printed and "sha256" in printed


def test_hand_framed_envelope_is_the_der_asn1crypto_would_write() -> None:
    from asn1crypto import cms

    key, der = _rsa()
    envelope = kms_envelope.seal(b"framing check", der)
    parsed = cms.ContentInfo.load(envelope)
    enveloped = parsed["content"]
    ktri = enveloped["recipient_infos"][0].chosen
    content = enveloped["encrypted_content_info"]
    rebuilt = cms.ContentInfo(
        {
            "content_type": "enveloped_data",
            "content": cms.EnvelopedData(
                {
                    "version": "v2",
                    "recipient_infos": [
                        cms.RecipientInfo(
                            {
                                "ktri": cms.KeyTransRecipientInfo(
                                    {
                                        "version": "v2",
                                        "rid": cms.RecipientIdentifier(
                                            {
                                                "subject_key_identifier": kms_envelope.subject_key_identifier(
                                                    der
                                                )
                                            }
                                        ),
                                        "key_encryption_algorithm": {
                                            "algorithm": "rsaes_oaep",
                                            "parameters": {
                                                "hash_algorithm": {"algorithm": "sha256"},
                                                "mask_gen_algorithm": {
                                                    "algorithm": "mgf1",
                                                    "parameters": {"algorithm": "sha256"},
                                                },
                                            },
                                        },
                                        "encrypted_key": ktri["encrypted_key"].native,
                                    }
                                )
                            }
                        )
                    ],
                    "encrypted_content_info": {
                        "content_type": "data",
                        "content_encryption_algorithm": {
                            "algorithm": "aes256_cbc",
                            "parameters": content["content_encryption_algorithm"]["parameters"],
                        },
                        "encrypted_content": content["encrypted_content"].native,
                    },
                }
            ),
        }
    )
    assert rebuilt.dump(force=True) == envelope
    assert kms_envelope.open_envelope(envelope, key) == b"framing check"
