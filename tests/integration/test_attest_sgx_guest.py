"""Emulated SGX evidence in a booted TCG guest: a guest process gets an SGX quote over report_data it chose
(``get_evidence``, as an enclave asks its quoting library); it verifies with the lab root and is refused
without it; the lab KMS releases a key to the guest only under a key policy naming its MRENCLAVE."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace

import cbor2
import pytest
from teelab_guest.kms_client import KmsClient, Transport

from harness.attest import LAB, Policy, default_lab_dir, verify
from harness.kms import KmsServer, Listen
from harness.lab import GuestBoot, Lab
from harness.qemu.epc import EpcSection
from harness.qemu.objects import MemoryBackendMemfd
from harness.tee.platforms import choose_backend
from harness.tee.sgx import EmulatedSgxBackend, SgxIdentity

pytestmark = pytest.mark.vm

IDENTITY = SgxIdentity(mrenclave=hashlib.sha256(b"the guest's enclave").digest(), mrsigner=b"\x11" * 32)
GET_EVIDENCE = """
import sys, cbor2
from teelab_guest.evidence import get_evidence
e = get_evidence(bytes.fromhex(sys.argv[1]))
sys.stdout.buffer.write(cbor2.dumps({"kind": e.kind, "blob": e.blob, "source": e.source}))
"""
KMS_PORT = 8000
SECRET = b"released to one enclave"


@dataclass
class SgxGuest:
    boot: GuestBoot
    kms: KmsServer

    def run(self, argv: list[str], *, check: bool = True) -> bytes:
        assert self.boot.agent is not None
        return self.boot.agent.exec(argv, check=check, timeout=120).stdout


@pytest.fixture(scope="module")
def sgx_guest(cvm_image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SgxGuest]:
    with Lab() as lab, ExitStack() as stack:
        kms = stack.enter_context(KmsServer.start(tmp_path_factory.mktemp("kms"), Listen(tls=False),
                                                  lab_dir=default_lab_dir()))  # fmt: skip
        host, port = kms.endpoint.split("://")[1].rsplit(":", 1)
        stack.enter_context(lab.vsock_proxy(KMS_PORT, (host, int(port))))
        vsock = lab.vsock.attach("sgx-guest")
        stack.callback(lab.vsock.detach, "sgx-guest")
        memory = MemoryBackendMemfd("ram0", 512, share=True) if vsock.needs_shared_memory else None
        spec = lab.spec_for_image(cvm_image, name="sgx-guest", role="cvm", vcpus=1, memory_mib=512,
                                  memory=memory, devices=tuple(vsock.devices))  # fmt: skip
        tee = stack.enter_context(EmulatedSgxBackend(identity=IDENTITY).attach(spec, lab.host))
        boot = lab.boot(tee.spec, on_launch=tee.after_launch)
        stack.callback(lab.stop, boot.machine)
        yield SgxGuest(boot, kms)


def test_a_guest_gets_an_sgx_quote_over_its_report_data(sgx_guest: SgxGuest) -> None:
    chosen = bytes(range(64))
    got = cbor2.loads(sgx_guest.run(["python3", "-c", GET_EVIDENCE, chosen.hex()]))
    assert (got["kind"], got["source"]) == ("sgx", "emulated")
    pins = {"mrenclave": IDENTITY.mrenclave, "mrsigner": IDENTITY.mrsigner, "report_data": chosen}
    policy = Policy(roots=(LAB,), lab_dir=default_lab_dir(), **pins)  # type: ignore[arg-type]
    verdict = verify(got["blob"], policy)
    assert verdict.ok, verdict.reasons
    assert verify(got["blob"], Policy(lab_dir=default_lab_dir())).codes == {"untrusted-root"}


def _sealed_for(kms: KmsServer, mrenclave: bytes) -> str:
    operator = kms.credentials("operator")
    policy = {
        "Statement": [
            {"Sid": "enclave", "Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt",
             "Condition": {
                 "StringEqualsIgnoreCase": {"teelab:RecipientAttestation:SgxMrEnclave": mrenclave.hex()},
                 "StringEquals": {"teelab:RecipientAttestation:Root": "lab"}}},
            {"Sid": "operator", "Effect": "Allow", "Principal": {"AWS": operator.arn}, "Action": "kms:*"},
        ]
    }  # fmt: skip
    key = kms.create_key(policy, description="sgx guest test")
    with KmsClient(Transport.endpoint(kms.endpoint), access_key=operator.access_key,
                   secret=operator.secret) as client:  # fmt: skip
        return base64.b64encode(client.encrypt(key.id, SECRET)).decode()


def test_the_kms_releases_only_under_a_policy_naming_the_guests_mrenclave(sgx_guest: SgxGuest) -> None:
    def unseal(blob: str) -> dict[str, object]:
        argv = ["python3", "-m", "teelab_guest.unseal", "--kms", f"vsock:2:{KMS_PORT}", "--ciphertext", blob,
                "--plain"]  # fmt: skip
        out = sgx_guest.run(argv, check=False)  # exits 1 when not served; the JSON line says why
        return json.loads(out.decode().strip().splitlines()[-1])

    served = unseal(_sealed_for(sgx_guest.kms, IDENTITY.mrenclave))
    assert served["outcome"] == "served" and served["evidence"] == "sgx", served
    assert served["sha256"] == hashlib.sha256(SECRET).hexdigest()
    other = unseal(_sealed_for(sgx_guest.kms, hashlib.sha256(b"another enclave").digest()))
    assert (other["outcome"], other["error"]) == ("refused", "AccessDeniedException"), other


@pytest.mark.sgx
def test_an_sgx_guest_sees_the_epc_its_spec_gives_it(cvm_image) -> None:
    """On an SGX host, through the real backend (``choose_backend("sgx", mode="real")``): two EPC sections
    (one from each host node where there are two) reach the guest; QEMU's query-sgx lists them at launch
    (``after_launch``) and the guest's kernel counts their sum on its node 0."""
    with Lab() as lab:
        nodes = [section.node for section in lab.host.tee.sgx_epc]
        host_nodes = (nodes[0], nodes[-1])  # two nodes where the host has two, else both from one
        sections = tuple(EpcSection(f"epc{i}", 16, host_node=node) for i, node in enumerate(host_nodes))
        spec = replace(lab.spec_for_image(cvm_image, name="sgx-epc", role="cvm", vcpus=2), epc=sections)
        with choose_backend("sgx", lab.host, "real").attach(spec, lab.host) as tee:
            boot = lab.boot(tee.spec, on_launch=tee.after_launch)
            assert boot.agent is not None
            script = "grep -c -w sgx /proc/cpuinfo; cat /sys/devices/system/node/node0/x86/sgx_total_bytes"
            out = boot.agent.exec(["sh", "-c", script], check=True, timeout=60).stdout.decode().split()
            lab.stop(boot.machine)
    assert int(out[0]) >= 1 and int(out[1]) == 32 << 20
