"""Key rotation: automatic (on a clock the test moves) and on demand; every material version keeps
decrypting its blobs, also after SIGKILL and restart; refusals with AWS's exception names."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from harness.kms import KmsProcess, KmsServer, Listen, Store
from harness.kms.keyring import Keyring
from harness.kms.material import blob_header

DAY = 86400.0


class Calendar:
    """The rotation clock: real time plus however far the test has moved it."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsServer]:
    with KmsServer.start(tmp_path_factory.mktemp("kms") / "kms") as srv:
        yield srv


@pytest.fixture
def calendar(server: KmsServer) -> Iterator[Calendar]:
    calendar = Calendar()
    server.service.rotation_clock = calendar
    yield calendar
    server.service.rotation_clock = server.service.clock


def client(endpoint: str, creds) -> object:
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret,
        config=Config(retries={"max_attempts": 1}),
    )


@pytest.fixture(scope="module")
def kms(server: KmsServer):
    return client(server.endpoint, server.credentials("admin"))


def refused(call, **kwargs: object) -> str:
    with pytest.raises(ClientError) as exc:
        call(**kwargs)
    return exc.value.response["Error"]["Code"]


def test_automatic_rotation_falls_due_on_the_clock(kms, calendar: Calendar) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    assert kms.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"] is False
    kms.enable_key_rotation(KeyId=key, RotationPeriodInDays=90)
    status = kms.get_key_rotation_status(KeyId=key)
    assert status["KeyRotationEnabled"] and status["RotationPeriodInDays"] == 90
    first_due = status["NextRotationDate"].timestamp()
    blobs = {0: kms.encrypt(KeyId=key, Plaintext=b"v0")["CiphertextBlob"]}
    calendar.ahead = 89 * DAY
    assert blob_header(kms.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]).version == 0
    calendar.ahead = 91 * DAY
    blobs[1] = kms.encrypt(KeyId=key, Plaintext=b"v1")["CiphertextBlob"]
    assert blob_header(blobs[1]).version == 1
    calendar.ahead = (91 + 2 * 90) * DAY  # two more periods: both rotations are made, each on its date
    blobs[3] = kms.generate_data_key(KeyId=key, NumberOfBytes=8)["CiphertextBlob"]
    assert blob_header(blobs[3]).version == 3
    rotations = kms.list_key_rotations(KeyId=key)["Rotations"]
    assert [r["RotationType"] for r in rotations] == ["AUTOMATIC"] * 3
    dates = [r["RotationDate"].timestamp() for r in rotations]
    assert dates == pytest.approx([first_due, first_due + 90 * DAY, first_due + 180 * DAY], abs=1)
    assert kms.decrypt(CiphertextBlob=blobs[0])["Plaintext"] == b"v0"
    assert kms.decrypt(CiphertextBlob=blobs[1])["Plaintext"] == b"v1"
    assert len(kms.decrypt(CiphertextBlob=blobs[3])["Plaintext"]) == 8
    kms.disable_key_rotation(KeyId=key)
    calendar.ahead = 2000 * DAY
    assert blob_header(kms.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]).version == 3


def test_on_demand_rotation_and_its_limit(kms) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    blobs = []
    for _ in range(4):
        blobs.append(kms.encrypt(KeyId=key, Plaintext=f"v{len(blobs)}".encode())["CiphertextBlob"])
        assert kms.rotate_key_on_demand(KeyId=key)["KeyId"].endswith(key)
    assert [blob_header(b).version for b in blobs] == [0, 1, 2, 3]
    for version, blob in enumerate(blobs):  # every version decrypts after three (here four) rotations
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == f"v{version}".encode()
    for _ in range(6):
        kms.rotate_key_on_demand(KeyId=key)
    assert refused(kms.rotate_key_on_demand, KeyId=key) == "LimitExceededException"
    page = kms.list_key_rotations(KeyId=key, Limit=4)
    rest = kms.list_key_rotations(KeyId=key, Marker=page["NextMarker"])
    assert page["Truncated"] and len(page["Rotations"]) + len(rest["Rotations"]) == 10
    assert {r["RotationType"] for r in page["Rotations"]} == {"ON_DEMAND"}


def test_rotation_refusals(server: KmsServer, kms) -> None:
    signing = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    for call in (kms.enable_key_rotation, kms.rotate_key_on_demand, kms.get_key_rotation_status):
        assert refused(call, KeyId=signing) == "UnsupportedOperationException"
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    unchecked = boto3.client(  # boto3 would refuse 89 itself
        "kms",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=kms._request_signer._credentials.access_key,
        aws_secret_access_key=kms._request_signer._credentials.secret_key,
        config=Config(retries={"max_attempts": 1}, parameter_validation=False),
    )
    assert refused(unchecked.enable_key_rotation, KeyId=key, RotationPeriodInDays=89) == "ValidationException"
    kms.disable_key(KeyId=key)
    assert refused(kms.enable_key_rotation, KeyId=key) == "DisabledException"
    assert refused(kms.rotate_key_on_demand, KeyId=key) == "DisabledException"


def test_a_blob_is_bound_to_its_version(server: KmsServer, kms) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.rotate_key_on_demand(KeyId=key)
    blob = kms.encrypt(KeyId=key, Plaintext=b"v1")["CiphertextBlob"]
    at = blob_header(blob).length - 1
    for version in (0, 7):  # another real version, and one the key never had
        forged = blob[:at] + bytes([version]) + blob[at + 1 :]
        assert refused(kms.decrypt, CiphertextBlob=forged) == "InvalidCiphertextException"


def test_blobs_made_before_versions_still_decrypt(server: KmsServer, kms) -> None:
    """A TLK1 blob (no version field, as the KMS wrote before rotation) is version 0 of its key."""
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.rotate_key_on_demand(KeyId=key)
    header = b"TLK1" + key.encode()
    nonce = os.urandom(12)
    old = header + nonce + AESGCM(server.store.material(key)).encrypt(nonce, b"from before", header + b"{}")
    assert kms.decrypt(CiphertextBlob=old)["Plaintext"] == b"from before"


def test_rotated_material_survives_sigkill(tmp_path: Path) -> None:
    kms_dir = tmp_path / "kms"
    creds = Store.open(kms_dir).issue_credentials("admin")
    with KmsProcess(kms_dir, Listen(port=0)) as first:
        kms = client(first.endpoint, creds)
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        blobs = [kms.encrypt(KeyId=key, Plaintext=b"before")["CiphertextBlob"]]
        for _ in range(3):
            kms.rotate_key_on_demand(KeyId=key)
            blobs.append(kms.encrypt(KeyId=key, Plaintext=b"after")["CiphertextBlob"])
        first.kill()  # SIGKILL: only what was acknowledged is there
    with KmsProcess(kms_dir, Listen(port=0)) as second:
        kms = client(second.endpoint, creds)
        assert [kms.decrypt(CiphertextBlob=b)["Plaintext"] for b in blobs] == [b"before"] + [b"after"] * 3
        assert len(kms.list_key_rotations(KeyId=key)["Rotations"]) == 3


def test_rotations_under_load_survive_a_sigkill_halfway(tmp_path: Path) -> None:
    """Eight clients encrypt and rotate four keys on demand while the KMS is SIGKILLed; after a restart every
    acknowledged blob decrypts and every acknowledged rotation is listed."""
    kms_dir = tmp_path / "kms"
    creds = Store.open(kms_dir).issue_credentials("admin")
    acknowledged: list[tuple[bytes, bytes]] = []
    rotations: dict[str, int] = {}
    lock = threading.Lock()
    with KmsProcess(kms_dir, Listen(port=0)) as first:
        setup = client(first.endpoint, creds)
        keys = [setup.create_key()["KeyMetadata"]["KeyId"] for _ in range(4)]
        rotations.update(dict.fromkeys(keys, 0))

        def work(worker: int) -> None:
            kms = client(first.endpoint, creds)
            for step in range(200):
                key = keys[(worker + step) % 4]
                plaintext = f"{worker}:{step}".encode()
                try:
                    if step % 7 == 3 and rotations[key] < 10:
                        kms.rotate_key_on_demand(KeyId=key)
                        with lock:
                            rotations[key] += 1
                    blob = kms.encrypt(KeyId=key, Plaintext=plaintext)["CiphertextBlob"]
                except Exception:  # the server is gone (or the key hit its rotation limit): stop
                    return
                with lock:
                    acknowledged.append((blob, plaintext))

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(work, w) for w in range(8)]
            deadline = time.monotonic() + 30
            while len(acknowledged) < 150 and time.monotonic() < deadline:
                time.sleep(0.05)
            first.kill()
            for future in futures:
                future.result()
    assert len(acknowledged) >= 150 and sum(rotations.values()) >= 4
    with KmsProcess(kms_dir, Listen(port=0)) as second:
        kms = client(second.endpoint, creds)
        for blob, plaintext in acknowledged:
            assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == plaintext
        for key, count in rotations.items():
            assert len(kms.list_key_rotations(KeyId=key)["Rotations"]) >= count


def test_rotated_material_goes_with_its_purged_key(server: KmsServer, kms) -> None:
    key = kms.create_key(Tags=[{"TagKey": "t", "TagValue": "v"}])["KeyMetadata"]["KeyId"]
    kms.rotate_key_on_demand(KeyId=key)
    kms.enable_key_rotation(KeyId=key)
    store = server.store
    store.submit(store.set_state(key, "PendingDeletion", 1.0)).result()  # long past due
    assert store.purge_deleted() >= 1
    Keyring(store)  # as the next server start does, after its purge

    def rows(table: str) -> int:
        return store.reader().execute(f"SELECT COUNT(*) FROM {table} WHERE key_id = ?", (key,)).fetchone()[0]

    assert [rows(t) for t in ("key_versions", "key_tags", "key_rotation")] == [0, 0, 0]
