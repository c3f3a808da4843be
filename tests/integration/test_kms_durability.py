"""Load and faults: 100 clients x 50 mixed requests, the KMS SIGKILLed halfway and restarted; everything it
acknowledged is still there, the audit log has a row for every acknowledged request and its chain is whole."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
from pathlib import Path

import aiohttp
from teelab_guest import kms_sigv4

from harness.kms import KmsProcess, Listen, Store

CLIENTS = 100
REQUESTS_EACH = 50


class Acknowledged:
    def __init__(self) -> None:
        self.request_ids: set[str] = set()
        self.keys: set[str] = set()
        self.ciphertexts: list[tuple[str, bytes, bytes]] = []  # key, blob, plaintext
        self.count = 0
        self.failures = 0


async def _call(session: aiohttp.ClientSession, creds: tuple[str, str], op: str, body: dict) -> dict | None:
    payload = json.dumps(body).encode()
    headers = kms_sigv4.sign(
        access_key=creds[0],
        secret=creds[1],
        region="us-east-1",
        host="kms.lab",
        target=f"TrentService.{op}",
        body=payload,
    )
    async with session.post("http://kms.lab/", data=payload, headers=headers) as response:
        data = await response.json(content_type=None)
        assert response.status == 200, (op, response.status, data)
        data["_request_id"] = response.headers["x-amzn-RequestId"]
        return data


def _next_request(
    index: int, rng: random.Random, own: list[str], ack: Acknowledged
) -> tuple[str, dict, bytes]:
    """A client's next operation, its body and (for Encrypt and Decrypt) the plaintext it stands for."""
    choice = rng.random() if own else 0.0
    plaintext = b""
    if choice < 0.15:
        return "CreateKey", {"Description": f"client {index}"}, plaintext
    if choice < 0.55:
        plaintext = os.urandom(rng.randint(1, 512))
        return (
            "Encrypt",
            {"KeyId": rng.choice(own), "Plaintext": base64.b64encode(plaintext).decode()},
            plaintext,
        )
    if choice < 0.75 and ack.ciphertexts:
        _key, blob, plaintext = rng.choice(ack.ciphertexts)
        return "Decrypt", {"CiphertextBlob": base64.b64encode(blob).decode()}, plaintext
    if choice < 0.9:
        return "GenerateDataKey", {"KeyId": rng.choice(own), "KeySpec": "AES_256"}, plaintext
    return "DescribeKey", {"KeyId": rng.choice(own)}, plaintext


def _acknowledge(
    op: str, body: dict, plaintext: bytes, answer: dict, own: list[str], ack: Acknowledged
) -> None:
    """Record what an answered request made durable (and check a Decrypt's plaintext)."""
    if op == "CreateKey":
        own.append(answer["KeyMetadata"]["KeyId"])
        ack.keys.add(own[-1])
    elif op == "Encrypt":
        ack.ciphertexts.append((body["KeyId"], base64.b64decode(answer["CiphertextBlob"]), plaintext))
    elif op == "Decrypt":
        assert base64.b64decode(answer["Plaintext"]) == plaintext
    elif op == "GenerateDataKey":
        blob, key = base64.b64decode(answer["CiphertextBlob"]), base64.b64decode(answer["Plaintext"])
        ack.ciphertexts.append((body["KeyId"], blob, key))


async def _client(
    index: int, sock: Path, creds: tuple[str, str], ack: Acknowledged, halfway: asyncio.Event
) -> None:
    rng = random.Random(index)
    own: list[str] = []
    done = 0
    while done < REQUESTS_EACH:
        op, body, plaintext = _next_request(index, rng, own, ack)
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session:
                answer = await _call(session, creds, op, body)
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            ack.failures += 1
            await asyncio.sleep(0.05)
            continue  # not acknowledged: retried after the restart
        assert answer is not None
        ack.request_ids.add(answer["_request_id"])
        ack.count += 1
        done += 1
        if ack.count == CLIENTS * REQUESTS_EACH // 2:
            halfway.set()
        _acknowledge(op, body, plaintext, answer, own, ack)


async def _load(kms_dir: Path, sock: Path, creds: tuple[str, str]) -> tuple[Acknowledged, int]:
    ack = Acknowledged()
    halfway = asyncio.Event()
    server = KmsProcess(kms_dir, Listen(unix_path=sock)).start()
    clients = [asyncio.create_task(_client(i, sock, creds, ack, halfway)) for i in range(CLIENTS)]
    await halfway.wait()
    server.kill()
    killed_at = ack.count
    await asyncio.sleep(0.3)
    server = KmsProcess(kms_dir, Listen(unix_path=sock)).start()
    try:
        await asyncio.gather(*clients)
    finally:
        server.stop()
    return ack, killed_at


def test_acknowledged_keys_ciphertexts_and_audit_rows_survive_sigkill(tmp_path: Path) -> None:
    kms_dir = tmp_path / "kms"
    store = Store.open(kms_dir)
    issued = store.issue_credentials("load")
    store.close()
    sock = tmp_path / "kms.sock"
    ack, killed_at = asyncio.run(_load(kms_dir, sock, (issued.access_key, issued.secret)))
    assert ack.count == CLIENTS * REQUESTS_EACH
    assert CLIENTS * REQUESTS_EACH // 2 <= killed_at < CLIENTS * REQUESTS_EACH
    assert ack.failures > 0, "the kill should have interrupted some requests"

    store = Store.open(kms_dir)
    try:
        for key_id in ack.keys:
            assert store.get_key(key_id) is not None, key_id
        from harness.kms.material import decrypt_blob

        for key_id, blob, plaintext in ack.ciphertexts:
            assert decrypt_blob(blob, store.material(key_id), None) == plaintext
        audited = {row.request_id for row in store.audit(limit=10**6)}
        missing = ack.request_ids - audited
        assert not missing, f"{len(missing)} acknowledged requests have no audit row"
        rows, _ = (
            store.verify_audit()
        )  # the chain is sealed in the rows' own transactions: a kill cannot split them
        assert rows == len(list(store.audit(limit=10**6)))
    finally:
        store.close()
