"""Release to attested recipients with the real verifier and lab-issued evidence: enclave documents, SNP
reports and TDX quotes; PCR and measurement conditions, debug, lab roots, replay, staleness, tampering."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from teelab_guest.binding import report_data
from teelab_guest.kms_client import KmsCallError, KmsClient, RecipientKey, Transport

from harness.attest import LabAuthority
from harness.kms import KmsServer
from harness.kms.errors import EvidenceRefused
from harness.kms.recipient import AttestVerifier, Recipient

PCR0 = bytes.fromhex("5a" * 48)
OTHER_PCR0 = bytes.fromhex("6b" * 48)
MEASUREMENT = bytes.fromhex("7c" * 48)
SECRET = b"the sealed secret: correct horse battery staple"


@pytest.fixture(scope="module")
def admin(server: KmsServer) -> KmsClient:
    creds = server.credentials("admin")
    return KmsClient(Transport.endpoint(server.endpoint), access_key=creds.access_key, secret=creds.secret)


@pytest.fixture(scope="module")
def recipient() -> RecipientKey:
    return RecipientKey()


def allow(condition: dict, action: str | list[str] = "kms:Decrypt") -> dict:
    return {
        "Statement": [
            {
                "Sid": "attested",
                "Effect": "Allow",
                "Principal": "*",
                "Action": action,
                "Condition": condition,
            },
            {
                "Sid": "operator",
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::000000000000:root"},
                "Action": "kms:*",
            },
        ]
    }


LAB_PCR0 = {
    "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCR0.hex().upper()},
    "StringEquals": {"teelab:RecipientAttestation:Root": "lab"},
}


def sealed(server: KmsServer, admin: KmsClient, policy: dict) -> tuple[str, bytes]:
    key = server.create_key(policy).id
    return key, admin.encrypt(key, SECRET)


def document(
    lab: LabAuthority,
    recipient: RecipientKey,
    *,
    pcr0: bytes = PCR0,
    nonce: bytes | None = None,
    timestamp_ms: int | None = None,
    zero: bool = False,
) -> bytes:
    pcrs = {i: bytes(48) for i in range(3)} if zero else {0: pcr0, 1: bytes.fromhex("11" * 48), 2: bytes(48)}
    return lab.attestation_document(
        pcrs=pcrs,
        public_key=recipient.public_key_der,
        user_data=None,
        nonce=nonce,
        module_id="i-0123456789abcdef0-enc0123456789abcdef",
        timestamp_ms=timestamp_ms,
    )


def anonymous(server: KmsServer) -> KmsClient:
    return KmsClient(Transport.endpoint(server.endpoint))


def refused(call) -> KmsCallError:  # type: ignore[no-untyped-def]
    with pytest.raises(KmsCallError) as exc:
        call()
    assert exc.value.status < 500
    return exc.value


def test_enclave_with_the_named_pcr0_gets_the_secret_only_as_ciphertext_for_recipient(
    server: KmsServer,
    admin: KmsClient,
    lab: LabAuthority,
    recipient: RecipientKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key, blob = sealed(server, admin, allow(LAB_PCR0))
    evidence = document(lab, recipient)
    answer = anonymous(server).call(
        "Decrypt", {"CiphertextBlob": base64.b64encode(blob).decode(), "Recipient": recipient.field(evidence)}
    )
    assert "Plaintext" not in answer
    raw = json.dumps(answer).encode()
    for form in (SECRET, base64.b64encode(SECRET), SECRET.hex().encode()):
        assert form not in raw
        assert form.decode() not in caplog.text
    assert recipient.open(base64.b64decode(answer["CiphertextForRecipient"])) == SECRET
    row = [r for r in server.store.audit(key_id=key) if r.operation == "Decrypt"][-1]
    assert row.decision == "allow" and row.evidence_digest
    assert SECRET.decode() not in json.dumps(row.to_dict())


def test_pcr0_mismatch_is_refused(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    _, blob = sealed(server, admin, allow(LAB_PCR0))
    err = refused(
        lambda: anonymous(server).decrypt(
            blob, recipient=recipient, evidence=document(lab, recipient, pcr0=OTHER_PCR0)
        )
    )
    assert err.aws_type == "AccessDeniedException"


def test_a_document_binding_a_key_that_is_not_rsa_gets_nothing(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _, blob = sealed(server, admin, allow(LAB_PCR0))
    ec_key = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    evidence = lab.attestation_document(
        pcrs={0: PCR0, 1: bytes(48), 2: bytes(48)},
        public_key=ec_key,
        user_data=None,
        nonce=None,
        module_id="i-0123456789abcdef0-enc0123456789abcdef",
    )
    body = {"CiphertextBlob": base64.b64encode(blob).decode(), "Recipient": recipient.field(evidence)}
    err = refused(lambda: anonymous(server).call("Decrypt", body))
    assert err.aws_type == "ValidationException" and "must be RSA" in err.message


def test_debug_enclave_is_refused_unless_the_policy_allows_debug(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    any_lab_enclave = {
        "StringEquals": {
            "teelab:RecipientAttestation:Root": "lab",
            "teelab:RecipientAttestation:Kind": "nitro",
        }
    }
    _, blob = sealed(server, admin, allow(any_lab_enclave))
    debug_doc = document(lab, recipient, zero=True)
    err = refused(lambda: anonymous(server).decrypt(blob, recipient=recipient, evidence=debug_doc))
    assert err.aws_type == "AccessDeniedException"
    assert anonymous(server).decrypt(blob, recipient=recipient, evidence=document(lab, recipient)) == SECRET
    _, blob = sealed(
        server, admin, allow({**any_lab_enclave, "Bool": {"teelab:RecipientAttestation:Debug": True}})
    )
    assert anonymous(server).decrypt(blob, recipient=recipient, evidence=debug_doc) == SECRET


def test_lab_root_is_refused_when_the_policy_does_not_name_it(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    pcr0_only = {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": PCR0.hex()}}
    key, blob = sealed(server, admin, allow(pcr0_only))
    err = refused(
        lambda: anonymous(server).decrypt(blob, recipient=recipient, evidence=document(lab, recipient))
    )
    assert err.aws_type == "AccessDeniedException"
    reasons = " ".join(r for row in server.store.audit(key_id=key) for r in row.reasons)
    assert "untrusted-root" in reasons or "does not name" in reasons


def test_tampered_truncated_stale_and_replayed_documents_are_refused(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    _, blob = sealed(server, admin, allow(LAB_PCR0))
    good = document(lab, recipient)
    position = good.index(PCR0)
    resigned = good[:position] + OTHER_PCR0 + good[position + len(OTHER_PCR0) :]
    client = anonymous(server)
    assert (
        refused(lambda: client.decrypt(blob, recipient=recipient, evidence=resigned)).aws_type
        == "AccessDeniedException"
    )
    assert (
        refused(lambda: client.decrypt(blob, recipient=recipient, evidence=good[:-100])).aws_type
        == "ValidationException"
    )
    stale = document(lab, recipient, timestamp_ms=int((time.time() - 900) * 1000))
    assert (
        refused(lambda: client.decrypt(blob, recipient=recipient, evidence=stale)).aws_type
        == "AccessDeniedException"
    )
    with_nonce = document(lab, recipient, nonce=os.urandom(16))
    assert client.decrypt(blob, recipient=recipient, evidence=with_nonce) == SECRET
    err = refused(lambda: client.decrypt(blob, recipient=recipient, evidence=with_nonce))
    assert err.aws_type == "AccessDeniedException" and "replay" in err.message


def test_snp_report_bound_to_the_recipient_key(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    policy = allow(
        {
            "StringEqualsIgnoreCase": {"teelab:RecipientAttestation:SnpMeasurement": MEASUREMENT.hex()},
            "StringEquals": {"teelab:RecipientAttestation:Root": "lab"},
            "NumericGreaterThanEquals": {"teelab:RecipientAttestation:SnpTcbSnp": 1},
        }
    )
    _, blob = sealed(server, admin, policy)
    client = anonymous(server)
    nonce = os.urandom(32)
    report = lab.snp_report(report_data(nonce, recipient.public_key_der), measurement=MEASUREMENT)
    assert client.decrypt(blob, recipient=recipient, evidence=report, nonce=nonce) == SECRET
    # the same report with another key beside it: report_data does not bind that key
    thief = RecipientKey()
    nonce2 = os.urandom(32)
    report2 = lab.snp_report(report_data(nonce2, recipient.public_key_der), measurement=MEASUREMENT)
    err = refused(lambda: client.decrypt(blob, recipient=thief, evidence=report2, nonce=nonce2))
    assert err.aws_type == "AccessDeniedException"
    nonce3 = os.urandom(32)
    other = lab.snp_report(report_data(nonce3, recipient.public_key_der), measurement=bytes(48))
    assert (
        refused(lambda: client.decrypt(blob, recipient=recipient, evidence=other, nonce=nonce3)).aws_type
        == "AccessDeniedException"
    )
    nonce4 = os.urandom(32)
    debug = lab.snp_report(
        report_data(nonce4, recipient.public_key_der), measurement=MEASUREMENT, policy=0x30000 | 1 << 19
    )
    assert (
        refused(lambda: client.decrypt(blob, recipient=recipient, evidence=debug, nonce=nonce4)).aws_type
        == "AccessDeniedException"
    )


def test_generate_data_key_and_random_with_recipient_through_boto3(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    key = server.create_key(allow(LAB_PCR0, ["kms:Decrypt", "kms:GenerateDataKey"])).id
    creds = server.credentials("sdk")
    sdk = boto3.client(
        "kms",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret,
        config=Config(retries={"max_attempts": 1}),
    )
    field = {"AttestationDocument": document(lab, recipient), "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}
    out = sdk.generate_data_key(KeyId=key, KeySpec="AES_256", Recipient=field)
    assert not out.get("Plaintext")
    data_key = recipient.open(out["CiphertextForRecipient"])
    assert len(data_key) == 32
    assert sdk.decrypt(CiphertextBlob=out["CiphertextBlob"])["Plaintext"] == data_key
    again = sdk.decrypt(CiphertextBlob=out["CiphertextBlob"], Recipient=field)
    assert recipient.open(again["CiphertextForRecipient"]) == data_key
    with pytest.raises(ClientError) as exc:  # the default account policy does not name the lab root
        sdk.generate_random(NumberOfBytes=48, Recipient=field)
    assert exc.value.response["Error"]["Code"] == "AccessDeniedException"
    server.set_account_policy(allow(LAB_PCR0, "kms:GenerateRandom"))
    random = sdk.generate_random(NumberOfBytes=48, Recipient=field)
    assert len(recipient.open(random["CiphertextForRecipient"])) == 48
    with pytest.raises(ClientError) as exc:
        sdk.decrypt(
            CiphertextBlob=out["CiphertextBlob"],
            Recipient={**field, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_1"},
        )
    assert exc.value.response["Error"]["Code"] == "ValidationException"


def test_tdx_quote_with_mrtd_and_rtmr_conditions(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    mrtd, rtmr0 = bytes.fromhex("d1" * 48), bytes.fromhex("e2" * 48)
    _, blob = sealed(
        server,
        admin,
        allow(
            {
                "StringEqualsIgnoreCase": {
                    "teelab:RecipientAttestation:TdxMrtd": mrtd.hex(),
                    "teelab:RecipientAttestation:TdxRtmr0": rtmr0.hex(),
                },
                "StringEquals": {"teelab:RecipientAttestation:Root": "lab"},
            }
        ),
    )
    client = anonymous(server)
    nonce = os.urandom(32)
    quote = lab.tdx_quote(report_data(nonce, recipient.public_key_der), mrtd=mrtd, rtmrs=[rtmr0])
    assert client.decrypt(blob, recipient=recipient, evidence=quote, nonce=nonce) == SECRET
    nonce = os.urandom(32)
    other = lab.tdx_quote(report_data(nonce, recipient.public_key_der), mrtd=mrtd, rtmrs=[bytes(48)])
    assert (
        refused(lambda: client.decrypt(blob, recipient=recipient, evidence=other, nonce=nonce)).aws_type
        == "AccessDeniedException"
    )


def test_tdx_attributes_are_compared_as_a_number(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    sept_ve_disable = 1 << 28
    _, blob = sealed(
        server,
        admin,
        allow(
            {
                "NumericEquals": {"teelab:RecipientAttestation:TdxAttributes": f"{sept_ve_disable:#x}"},
                "NumericLessThan": {"teelab:RecipientAttestation:TdxAttributes": 1 << 29},
                "StringEquals": {"teelab:RecipientAttestation:Root": "lab"},
            }
        ),
    )
    client = anonymous(server)

    def decrypt(td_attributes: int) -> bytes:
        nonce = os.urandom(32)
        quote = lab.tdx_quote(
            report_data(nonce, recipient.public_key_der), mrtd=bytes(48), td_attributes=td_attributes
        )
        return client.decrypt(blob, recipient=recipient, evidence=quote, nonce=nonce)

    assert decrypt(sept_ve_disable) == SECRET
    assert refused(lambda: decrypt(0)).aws_type == "AccessDeniedException"
    assert refused(lambda: decrypt(sept_ve_disable | 1 << 29)).aws_type == "AccessDeniedException"


def test_a_nonce_is_accepted_once_even_when_sent_concurrently(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    _, blob = sealed(server, admin, allow(LAB_PCR0))
    evidence = document(lab, recipient, nonce=os.urandom(16))

    def attempt(_: int) -> str:
        try:
            anonymous(server).decrypt(blob, recipient=recipient, evidence=evidence)
            return "released"
        except KmsCallError as err:
            return err.aws_type

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(attempt, range(32)))
    assert outcomes.count("released") == 1
    assert set(outcomes) == {"released", "AccessDeniedException"}


TDX_VECTORS = Path(__file__).parents[1] / "vectors" / "tdx"
IN_COLLATERAL_WINDOW = dt.datetime(2025, 6, 20, tzinfo=dt.UTC).timestamp()


def test_a_vendor_tdx_quote_is_checked_against_the_configured_collateral(recipient: RecipientKey) -> None:
    given = Recipient((TDX_VECTORS / "quote.bin").read_bytes(), recipient.public_key_der, b"nonce")
    with pytest.raises(EvidenceRefused) as without:
        AttestVerifier()(given, frozenset(), IN_COLLATERAL_WINDOW)
    assert "collateral-missing" in without.value.message
    cached = AttestVerifier(tdx_collateral=TDX_VECTORS / "collateral.json")
    with pytest.raises(EvidenceRefused) as checked:  # the vendor quote binds no recipient key of ours
        cached(given, frozenset(), IN_COLLATERAL_WINDOW)
    assert "binding-mismatch" in checked.value.message
    assert "collateral" not in checked.value.message and "tcb" not in checked.value.message


def test_a_lab_quote_gets_the_lab_collateral_only_where_the_key_policy_names_the_lab(
    lab: LabAuthority, recipient: RecipientKey
) -> None:
    nonce = os.urandom(32)
    quote = lab.tdx_quote(report_data(nonce, recipient.public_key_der), mrtd=bytes(48))
    given = Recipient(quote, recipient.public_key_der, nonce)
    verifier = AttestVerifier(lab.directory)
    with pytest.raises(EvidenceRefused) as vendor_only:
        verifier(given, frozenset(), time.time())
    assert "untrusted-root" in vendor_only.value.message and "collateral" not in vendor_only.value.message
    assert verifier(given, frozenset({"lab"}), time.time()).root == "lab"


@pytest.mark.parametrize("content", [None, "{}", '[{"tcb_info": 1}]'])
def test_kms_serve_refuses_an_unusable_collateral_cache_before_making_its_store(
    run: Callable[..., tuple[int, str, str]], tmp_path: Path, content: str | None
) -> None:
    cache = tmp_path / "collateral.json"
    if content is not None:
        cache.write_text(content)
    kms_dir = tmp_path / "kms"
    argv = ["kms", "--kms-dir", str(kms_dir), "serve", "--port", "0", "--tdx-collateral", str(cache)]
    status, _, err = run(*argv)
    assert status == 2 and ("E830" if content is None else "E805") in err
    assert "Traceback" not in err and not kms_dir.exists()


def test_an_snp_report_above_vmpl_0_is_released_only_where_a_statement_names_its_vmpl(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    lab_root = {"StringEquals": {"teelab:RecipientAttestation:Root": "lab"}}
    _, unnamed = sealed(server, admin, allow(lab_root))
    _, named = sealed(
        server, admin, allow({**lab_root, "NumericEquals": {"teelab:RecipientAttestation:SnpVmpl": 2}})
    )
    client = anonymous(server)

    def decrypt(blob: bytes, vmpl: int) -> bytes:
        nonce = os.urandom(32)
        report = lab.snp_report(
            report_data(nonce, recipient.public_key_der), measurement=MEASUREMENT, vmpl=vmpl
        )
        return client.decrypt(blob, recipient=recipient, evidence=report, nonce=nonce)

    assert decrypt(unnamed, 0) == SECRET
    assert refused(lambda: decrypt(unnamed, 2)).aws_type == "AccessDeniedException"
    assert decrypt(named, 2) == SECRET
    assert refused(lambda: decrypt(named, 1)).aws_type == "AccessDeniedException"
    assert refused(lambda: decrypt(named, 0)).aws_type == "AccessDeniedException"
