"""A lab suite, written only with teelab's public pytest fixtures (``kms``, ``parent``, ``enclave``) and
public API: an enclave carved from a parent gets its key from the KMS, an enclave from a tampered image is
refused, and a debug-mode enclave of the right image is refused by a production key policy.

The ``unseal`` enclave (images/enclaves/unseal) asks its parent for the ciphertext and the KMS CA, binds an
RSA key into its attestation document, and calls KMS Decrypt with it as the Recipient in TLS through the
parent's vsock-proxy, trusting only the CA pinned on its measured command line. Run: ``pytest examples/``
or ``pytest examples/ -n 2`` (pytest-xdist): CPUs, hugepages, CIDs and ports come from the host ledger.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from teelab_guest import protocol
from teelab_guest.kms_client import KmsClient, Transport

from harness.enclave.parent_side import serve_unseal_jobs, start_kms_proxy, unseal_outcomes
from harness.enclave.recipes import build_enclave_image
from harness.enclave.variant import with_cmdline_words
from harness.kms.policy import measured_enclave_policy
from harness.kms.tls import ca_certificate_pem, ca_pin, client_context

pytestmark = [pytest.mark.vm, pytest.mark.slow]
SECRET = b"the enclave's database password"


@dataclass
class Deployment:
    """What an operator ships: the enclave image with the KMS CA pinned, and a secret sealed under a key
    whose policy names that image's PCR0."""

    kms: object
    eif: Path
    ciphertext: bytes
    key_id: str
    pcr0: str

    def decisions(self) -> list[tuple[str, str]]:
        """The KMS audit log's Decrypt decisions on the key: (decision, its reasons joined)."""
        rows = self.kms.store.audit(key_id=self.key_id)  # type: ignore[attr-defined]
        return [(r.decision, "; ".join(r.reasons)) for r in rows if r.operation == "Decrypt"]


@pytest.fixture
def deployment(kms, tmp_path: Path) -> Deployment:
    server = kms()  # TLS with its own CA; guests reach it at CID 2 port 8000 through the host's vsock-proxy
    pin = f"{protocol.KMS_CA_KEY}={ca_pin(server.kms_dir)}"
    image = with_cmdline_words(build_enclave_image("unseal").path, [pin], tmp_path / "unseal.eif")
    operator = server.credentials("operator")
    pcr0 = image.measurements.pcr0.hex()
    key = server.create_key(measured_enclave_policy(operator.arn, pcr0))
    endpoint = Transport.endpoint(server.endpoint, tls=client_context(server.kms_dir))
    with KmsClient(endpoint, access_key=operator.access_key, secret=operator.secret) as client:
        ciphertext = client.encrypt(key.id, SECRET)
    return Deployment(server, image.path, ciphertext, key.id, pcr0)


def unseal_in(parent, enclave, deployment: Deployment, eif: Path, **options) -> dict:
    """Carve an enclave from ``eif`` out of ``parent`` and return what it answered its parent."""
    start_kms_proxy(parent)  # the parent passes its enclaves' port 8000 on to the host (CID 2)
    job = serve_unseal_jobs(parent, deployment.ciphertext, ca_certificate_pem(deployment.kms.kms_dir))
    carved = enclave(eif, of=parent, **options)
    return unseal_outcomes(job)[carved.cid]


def test_an_enclave_gets_its_key(parent, enclave, deployment: Deployment) -> None:
    answer = unseal_in(parent(), enclave, deployment, deployment.eif)
    assert answer["outcome"] == "served", answer
    assert answer["sha256"] == hashlib.sha256(SECRET).hexdigest() and answer["tls"] is True
    assert [d for d, _ in deployment.decisions()] == ["allow"]


def test_a_tampered_image_is_refused(parent, enclave, deployment: Deployment, tmp_path: Path) -> None:
    tampered = with_cmdline_words(deployment.eif, ["init=/bin/sh"], tmp_path / "tampered.eif")
    answer = unseal_in(parent(), enclave, deployment, tampered.path)
    assert (answer["outcome"], answer["error"]) == ("refused", "AccessDeniedException"), answer
    ((decision, reasons),) = deployment.decisions()
    assert decision == "deny" and "kms:recipientattestation:pcr0" in reasons.lower()


def test_a_debug_enclave_is_refused_by_a_production_policy(parent, enclave, deployment: Deployment) -> None:
    answer = unseal_in(parent(), enclave, deployment, deployment.eif, debug=True)
    assert (answer["outcome"], answer["error"]) == ("refused", "AccessDeniedException"), answer
    ((decision, reasons),) = deployment.decisions()
    # a debug-mode enclave attests with all-zero PCRs: the policy's PCR0 (and Debug false) cannot hold
    assert (
        decision == "deny"
        and f"pcr0 in ['{deployment.pcr0}'] does not hold for '{'0' * 96}'" in reasons.lower()
    )
