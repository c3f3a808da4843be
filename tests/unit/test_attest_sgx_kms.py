"""The KMS releases to SGX enclaves: a Recipient whose SGX quote binds its nonce and key (report_data, as for
SNP and TDX), key policies on teelab:RecipientAttestation:SgxMrEnclave/SgxMrSigner/SgxIsvProdId/SgxIsvSvn and
Debug, and the collateral cache holding TDX and SGX collateral of one platform side by side."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
from teelab_guest.binding import report_data
from teelab_guest.kms_client import KmsClient, RecipientKey, Transport
from test_kms_recipient import SECRET, allow, anonymous, refused, sealed

from harness.attest import LabAuthority
from harness.kms import KmsServer
from harness.kms.errors import EvidenceRefused
from harness.kms.recipient import AttestVerifier, Recipient

MRENCLAVE = bytes.fromhex("c3" * 32)
MRSIGNER = bytes.fromhex("d4" * 32)
VECTORS = Path(__file__).parents[1] / "vectors"


@pytest.fixture(scope="module")
def admin(server: KmsServer) -> KmsClient:
    creds = server.credentials("admin")
    return KmsClient(Transport.endpoint(server.endpoint), access_key=creds.access_key, secret=creds.secret)


@pytest.fixture(scope="module")
def recipient() -> RecipientKey:
    return RecipientKey()


def test_a_key_is_released_only_to_the_enclave_its_policy_names(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    policy = allow(
        {
            "StringEqualsIgnoreCase": {
                "teelab:RecipientAttestation:SgxMrEnclave": MRENCLAVE.hex(),
                "teelab:RecipientAttestation:SgxMrSigner": MRSIGNER.hex(),
            },
            "NumericEquals": {"teelab:RecipientAttestation:SgxIsvProdId": 7},
            "NumericGreaterThanEquals": {"teelab:RecipientAttestation:SgxIsvSvn": 2},
            "StringEquals": {
                "teelab:RecipientAttestation:Root": "lab",
                "teelab:RecipientAttestation:Kind": "sgx",
            },
            "Bool": {"teelab:RecipientAttestation:Debug": "false"},
        }
    )
    _, blob = sealed(server, admin, policy)
    client = anonymous(server)

    def decrypt(**changes: object) -> bytes:
        nonce = os.urandom(32)
        values = {"mrenclave": MRENCLAVE, "mrsigner": MRSIGNER, "isv_prod_id": 7, "isv_svn": 2} | changes
        quote = lab.sgx_quote(report_data(nonce, recipient.public_key_der), **values)  # type: ignore[arg-type]
        return client.decrypt(blob, recipient=recipient, evidence=quote, nonce=nonce)

    assert decrypt() == SECRET
    assert decrypt(isv_svn=3) == SECRET
    for changes in (
        {"mrenclave": bytes(32)},
        {"mrsigner": bytes(32)},
        {"isv_prod_id": 8},
        {"isv_svn": 1},
        {"debug": True},
    ):
        assert refused(lambda changes=changes: decrypt(**changes)).aws_type == "AccessDeniedException", (
            changes
        )


def test_an_sgx_quote_must_bind_the_recipients_nonce_and_key(
    server: KmsServer, admin: KmsClient, lab: LabAuthority, recipient: RecipientKey
) -> None:
    condition = {"StringEqualsIgnoreCase": {"teelab:RecipientAttestation:SgxMrEnclave": MRENCLAVE.hex()},
                 "StringEquals": {"teelab:RecipientAttestation:Root": "lab"}}  # fmt: skip
    _, blob = sealed(server, admin, allow(condition))
    client = anonymous(server)
    nonce = os.urandom(32)
    quote = lab.sgx_quote(report_data(os.urandom(32), recipient.public_key_der), mrenclave=MRENCLAVE)
    error = refused(lambda: client.decrypt(blob, recipient=recipient, evidence=quote, nonce=nonce))
    assert error.aws_type == "AccessDeniedException"


def test_the_collateral_cache_keeps_tdx_and_sgx_collateral_of_one_platform_apart(
    tmp_path: Path, recipient: RecipientKey
) -> None:
    both = [json.loads((VECTORS / kind / "collateral.json").read_text()) for kind in ("tdx", "sgx")]
    cache = tmp_path / "collateral.json"
    cache.write_text(json.dumps(both))
    given = Recipient((VECTORS / "sgx" / "quote.bin").read_bytes(), recipient.public_key_der, b"nonce")
    at = dt.datetime(2025, 6, 20, tzinfo=dt.UTC).timestamp()
    with pytest.raises(EvidenceRefused) as without:
        AttestVerifier()(given, frozenset(), at)
    assert "collateral-missing" in without.value.message
    with pytest.raises(EvidenceRefused) as checked:
        AttestVerifier(tdx_collateral=cache)(given, frozenset(), at)
    message = checked.value.message  # Intel's collateral is found and checked: its TCB status is named
    assert "binding-mismatch" in message and "collateral-missing" not in message and "tcb-status" in message


def test_a_cache_with_both_kinds_of_one_fmspc_gives_each_quote_its_own(
    lab: LabAuthority, tmp_path: Path
) -> None:
    from harness.attest.collateral_cache import CollateralCache

    tdx, sgx = lab.public.tdx_collateral(), lab.public.sgx_collateral()
    assert json.loads(tdx["tcb_info"])["fmspc"] == json.loads(sgx["tcb_info"])["fmspc"]  # one platform
    for order in ([tdx, sgx], [sgx, tdx]):
        (tmp_path / "cache.json").write_text(json.dumps(order))
        cache = CollateralCache.load(tmp_path / "cache.json")
        assert cache.for_quote(lab.sgx_quote(bytes(64), mrenclave=MRENCLAVE)) == sgx
        assert cache.for_quote(lab.tdx_quote(bytes(64), mrtd=bytes(48))) == tdx
