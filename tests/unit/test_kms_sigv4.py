"""SigV4 on the lab KMS: a signature covers host and every x-amz-* header sent (X-Amz-Target above all), so
a signature made for one operation cannot be replayed as another; teelab and boto3 sign them all."""

from __future__ import annotations

import http.client
import json
import time

import boto3
import pytest
from botocore.config import Config
from teelab_guest import kms_sigv4

from harness.kms import KmsServer
from harness.kms.store import Credentials


def post(server: KmsServer, body: bytes, headers: dict[str, str] | list[tuple[str, str]]) -> tuple[int, dict]:
    host, port = server.endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/", skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items() if isinstance(headers, dict) else headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def signed_over(
    server: KmsServer, creds: Credentials, body: bytes, headers: dict[str, str], names: tuple[str, ...]
) -> dict[str, str]:
    """``headers`` (lower-case names) plus X-Amz-Date and an Authorization that signs only ``names``."""
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    sent = {"host": server.endpoint.removeprefix("http://"), "x-amz-date": amz_date, **headers}
    scope = f"{amz_date[:8]}/us-east-1/kms/aws4_request"
    canonical = kms_sigv4.canonical_request("POST", "/", "", sent, names, body)
    signature = kms_sigv4.signature(creds.secret, amz_date, scope, canonical)
    sent["authorization"] = (
        f"{kms_sigv4.ALGORITHM} Credential={creds.access_key}/{scope}, SignedHeaders={';'.join(names)}, "
        f"Signature={signature}"
    )
    return sent


def target(operation: str) -> dict[str, str]:
    return {"content-type": "application/x-amz-json-1.1", "x-amz-target": f"TrentService.{operation}"}


def test_a_describe_signature_cannot_schedule_the_keys_deletion(server: KmsServer) -> None:
    """Issue 9: a signature over host;x-amz-date alone authorised any X-Amz-Target."""
    key = server.create_key()
    creds = server.credentials("sigv4-admin")
    body = json.dumps({"KeyId": key.id}).encode()
    describe = signed_over(server, creds, body, target("DescribeKey"), ("host", "x-amz-date"))
    status, answer = post(server, body, describe)
    assert (status, answer["__type"]) == (400, "IncompleteSignatureException"), answer
    assert "not signed: x-amz-target" in answer["message"]
    hijacked = {**describe, "x-amz-target": "TrentService.ScheduleKeyDeletion"}
    status, answer = post(server, body, hijacked)
    assert (status, answer["__type"]) == (400, "IncompleteSignatureException"), answer
    assert server.store.get_key(key.id, now=time.time()).state == "Enabled"
    # signed as the teelab signer signs it, X-Amz-Target included: DescribeKey works, and only DescribeKey
    proper = kms_sigv4.sign(
        access_key=creds.access_key,
        secret=creds.secret,
        region="us-east-1",
        host=server.endpoint.removeprefix("http://"),
        target="TrentService.DescribeKey",
        body=body,
    )
    assert "x-amz-target" in kms_sigv4.parse_authorization(proper["authorization"]).signed_headers
    status, answer = post(server, body, proper)
    assert status == 200 and answer["KeyMetadata"]["KeyState"] == "Enabled"
    status, answer = post(server, body, {**proper, "x-amz-target": "TrentService.ScheduleKeyDeletion"})
    assert (status, answer["__type"]) == (400, "InvalidSignatureException"), answer
    assert server.store.get_key(key.id, now=time.time()).state == "Enabled"


@pytest.mark.parametrize(
    ("extra", "names", "unsigned"),
    [
        ({}, ("x-amz-date", "x-amz-target"), "host"),
        ({}, ("host", "x-amz-target"), "x-amz-date"),
        ({"x-amz-security-token": "token"}, ("host", "x-amz-date", "x-amz-target"), "x-amz-security-token"),
        ({"x-amz-meta-anything": "1"}, ("host", "x-amz-date", "x-amz-target"), "x-amz-meta-anything"),
    ],
)
def test_host_and_every_x_amz_header_must_be_signed(
    server: KmsServer, extra: dict[str, str], names: tuple[str, ...], unsigned: str
) -> None:
    creds = server.credentials("sigv4-lister")
    headers = signed_over(server, creds, b"{}", {**target("ListKeys"), **extra}, names)
    status, answer = post(server, b"{}", headers)
    assert (status, answer["__type"]) == (400, "IncompleteSignatureException"), answer
    assert answer["message"].endswith(f"not signed: {unsigned}")
    everything = tuple(sorted({*names, "host", "x-amz-date", *extra}))
    status, answer = post(
        server, b"{}", signed_over(server, creds, b"{}", {**target("ListKeys"), **extra}, everything)
    )
    assert status == 200, answer


def test_x_amz_target_sent_twice_is_refused(server: KmsServer) -> None:
    creds = server.credentials("sigv4-twice")
    headers = signed_over(server, creds, b"{}", target("ListKeys"), ("host", "x-amz-date", "x-amz-target"))
    status, answer = post(server, b"{}", [*headers.items(), ("X-Amz-Target", "TrentService.ListKeys")])
    assert (status, answer["__type"]) == (400, "UnknownOperationException"), answer


def test_boto3_signs_what_the_server_requires(server: KmsServer) -> None:
    creds = server.credentials("sigv4-boto3")
    seen: list[str] = []
    kms = boto3.client(
        "kms",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret,
        aws_session_token="a-session-token",  # sent as X-Amz-Security-Token: must be signed too
        config=Config(retries={"max_attempts": 1}),
    )
    kms.meta.events.register(
        "before-send.kms.*", lambda request, **_: seen.append(request.headers["Authorization"].decode())
    )
    assert kms.list_keys()["Keys"] is not None
    signed = kms_sigv4.parse_authorization(seen[0]).signed_headers
    assert {"host", "x-amz-date", "x-amz-target", "x-amz-security-token"} <= set(signed)


def test_signed_header_bytes_that_are_not_utf8_verify_or_fail_as_signatures(server: KmsServer) -> None:
    """Header bytes are signed as sent; bytes that are not UTF-8 used to crash the verifier (HTTP 500)."""
    creds = server.credentials("sigv4-bytes")
    raw = b"caf\xe9 \xff"
    text = raw.decode("utf-8", "surrogateescape")  # what aiohttp makes of them, and what the signer takes
    names = ("host", "x-amz-date", "x-amz-meta-raw", "x-amz-target")
    good = signed_over(server, creds, b"{}", {**target("ListKeys"), "x-amz-meta-raw": text}, names)
    wire = [(k, raw if k == "x-amz-meta-raw" else v) for k, v in good.items()]
    status, answer = post(server, b"{}", wire)
    assert status == 200, answer
    status, answer = post(server, b"{}", [(k, b"\xfe" if k == "x-amz-meta-raw" else v) for k, v in wire])
    assert (status, answer["__type"]) == (400, "InvalidSignatureException"), answer
    for header in ("authorization", "x-amz-date"):
        status, answer = post(
            server, b"{}", [(k, b"\xff" + v.encode() if k == header else v) for k, v in wire]
        )
        assert status == 400, (header, answer)
