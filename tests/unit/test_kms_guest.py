"""The guest client as guests run it: Debian's /usr/bin/python3 with python3-cryptography 38,
python3-asn1crypto and python3-cbor2 from apt (never the virtualenv's packages), against a lab KMS, with
lab-issued evidence."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.attest import LabAuthority
from harness.kms import KmsServer

GUEST_INIT = Path(__file__).parents[2] / "guest-init"
DEBIAN_PYTHON = Path("/usr/bin/python3")
PCR0 = bytes.fromhex("9d" * 48)

# Runs inside the Debian interpreter: prove which packages it uses, make the recipient key, print its public
# key, read the evidence, call Decrypt with a Recipient (and a signed Encrypt), print what came back.
GUEST = r"""
import base64, json, sys
sys.path.insert(0, sys.argv[1])
import asn1crypto, cbor2, cryptography
from teelab_guest.kms_client import KmsCallError, KmsClient, RecipientKey, Transport
print(json.dumps({"cryptography": cryptography.__version__, "cryptography_path": cryptography.__file__,
                  "asn1crypto": asn1crypto.__version__, "cbor2_path": cbor2.__file__}), flush=True)
key = RecipientKey()
print(base64.b64encode(key.public_key_der).decode(), flush=True)
job = json.loads(sys.stdin.readline())
client = KmsClient(Transport.endpoint(job["endpoint"]))
out = {}
secret = client.decrypt(base64.b64decode(job["blob"]), recipient=key,
                        evidence=base64.b64decode(job["evidence"]))
out["secret"] = base64.b64encode(secret).decode()
try:
    client.decrypt(base64.b64decode(job["blob"]), recipient=key, evidence=base64.b64decode(job["other"]))
except KmsCallError as err:
    out["refused"] = err.aws_type
signed = KmsClient(Transport.endpoint(job["endpoint"]), access_key=job["access_key"], secret=job["secret"])
blob = signed.encrypt(job["key"], b"from the guest")
out["round_trip"] = signed.decrypt(blob).decode()
print(json.dumps(out), flush=True)
"""


@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason="needs Debian's /usr/bin/python3")
def test_debian_python_guest_decrypts_with_recipient(server: KmsServer, lab: LabAuthority) -> None:
    creds = server.credentials("guest")
    policy = {
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "kms:Decrypt",
                "Condition": {
                    "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCR0.hex()},
                    "StringEquals": {"teelab:RecipientAttestation:Root": "lab"},
                },
            },
            {"Effect": "Allow", "Principal": {"AWS": creds.arn}, "Action": ["kms:Encrypt", "kms:Decrypt"]},
        ]
    }
    key = server.create_key(policy)
    from harness.kms.material import encrypt_blob

    secret = os.urandom(32)
    blob = encrypt_blob(key.id, server.store.material(key.id), secret, None)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONNOUSERSITE": "1"}
    guest = subprocess.Popen(
        [str(DEBIAN_PYTHON), "-E", "-s", "-c", GUEST, str(GUEST_INIT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert guest.stdout is not None and guest.stdin is not None
        versions = json.loads(guest.stdout.readline())
        assert versions["cryptography"] == "38.0.4", versions
        assert versions["cryptography_path"].startswith("/usr/lib/python3/dist-packages/"), versions
        assert versions["cbor2_path"].startswith("/usr/lib/python3/dist-packages/"), versions
        assert sys.prefix not in versions["cryptography_path"]
        public_key = base64.b64decode(guest.stdout.readline())

        def evidence(pcr0: bytes) -> str:
            doc = lab.attestation_document(
                pcrs={0: pcr0, 1: bytes(48), 2: bytes(48)},
                public_key=public_key,
                user_data=None,
                nonce=os.urandom(16),
                module_id="i-guest-enc",
            )
            return base64.b64encode(doc).decode()

        job = {
            "endpoint": server.endpoint,
            "blob": base64.b64encode(blob).decode(),
            "evidence": evidence(PCR0),
            "other": evidence(bytes(48)),
            "key": key.id,
            "access_key": creds.access_key,
            "secret": creds.secret,
        }
        guest.stdin.write(json.dumps(job) + "\n")
        guest.stdin.flush()
        line = guest.stdout.readline()
        guest.wait(timeout=60)
        assert line, guest.stderr.read() if guest.stderr else ""
        result = json.loads(line)
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.wait()
    assert base64.b64decode(result["secret"]) == secret
    assert result["refused"] == "AccessDeniedException"
    assert result["round_trip"] == "from the guest"
